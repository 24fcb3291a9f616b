"""Regional Imbalance Acquisition Module (RIAM, Sec. 4.1 of the paper)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stbat_plugin import functional as SF
from stbat_plugin.network import FeedForward

__all__ = ["RIAM", "normalize_descriptors"]


def normalize_descriptors(p: Tensor) -> Tensor:
    """Rows of non-negative region descriptors (e.g. POI counts) -> distributions.

    Shapes:
        p: ``[n, k]`` -> ``[n, k]``, each row summing to 1 (all-zero rows become uniform).
    """
    if p.dim() != 2:
        raise ValueError(f"Expected region descriptors of shape [n, k] (got {list(p.shape)})")
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError("Region descriptors must be finite and non-negative (e.g. POI counts)")
    total = p.sum(dim=1, keepdim=True)
    uniform = torch.full_like(p, 1.0 / p.shape[1])
    return torch.where(total > 0, p / total.clamp_min(torch.finfo(p.dtype).tiny), uniform)


class RIAM(nn.Module):
    r"""Regional pattern autoencoder with POI classifier and feature-distribution predictor.

    Encoder (Eq. 1): :math:`\phi = FC(ReLU(FC(p)))` with dims ``k -> hidden -> embed_dim``.
    Decoder (Eq. 2-4): POI classifier ``embed_dim -> embed_dim -> k`` (softmax) and
    feature-distribution predictor giving :math:`\hat\mu` and a positive
    :math:`\hat\sigma = \mathrm{softplus}(\cdot) + \sigma_{min}` of size ``feature_dim``.

    Args:
        num_descriptors: ``k``, POI categories (or fallback descriptor size).
        feature_dim: ``J``, the backbone's feature size.
        embed_dim: ``D`` (default: ``32``). hidden: encoder width (default: ``16``).
        decoder_hidden: decoder width (default: ``32``).
        use_poi: build the POI classifier (default: ``True``; ``False`` = "w/o POI").
        use_fdp: build the feature-distribution predictor (default: ``True``; ``False`` = "w/o FDP").
        min_sigma: floor of both sigmas in the KLD (default: ``1e-2``).

    Shapes:
        p: ``[n, k]`` -> phi ``[n, D]``.
    """

    def __init__(self, num_descriptors: int, feature_dim: int, *, embed_dim: int = 32,
                 hidden: int = 16, decoder_hidden: int = 32, use_poi: bool = True,
                 use_fdp: bool = True, min_sigma: float = 1e-2):
        super().__init__()
        self.num_descriptors = int(num_descriptors)
        self.encoder = FeedForward(num_descriptors, hidden, embed_dim)
        self.poi_classifier = (
            FeedForward(embed_dim, decoder_hidden, num_descriptors) if use_poi else None
        )
        self.fdp_mu = FeedForward(embed_dim, decoder_hidden, feature_dim) if use_fdp else None
        self.fdp_sigma = FeedForward(embed_dim, decoder_hidden, feature_dim) if use_fdp else None
        self.min_sigma = float(min_sigma)

    def forward(self, p: Tensor) -> Tensor:
        return self.encoder(p)

    def loss(self, p: Tensor, mu: Tensor | None, sigma: Tensor | None,
             beta: float) -> tuple[Tensor, dict[str, Tensor]]:
        r""":math:`\mathcal{L}_{emb}` (Eq. 5), averaged over regions.

        Args:
            p: normalised descriptors ``[n, k]``.
            mu, sigma: detached feature statistics ``[n, J]`` (Eq. 10); unused without FDP.
            beta: weight of the KLD term.
        """
        phi = self.encoder(p)
        parts: dict[str, Tensor] = {}
        total = phi.new_zeros(())
        if self.poi_classifier is not None:
            log_p_hat = F.log_softmax(self.poi_classifier(phi), dim=-1)
            parts["poi_ce"] = -(p * log_p_hat).sum(dim=-1).mean()
            total = total + parts["poi_ce"]
        if self.fdp_mu is not None and self.fdp_sigma is not None:
            if mu is None or sigma is None:
                raise ValueError("RIAM with the feature-distribution predictor needs mu and sigma")
            mu_hat = self.fdp_mu(phi)
            sigma_hat = F.softplus(self.fdp_sigma(phi)) + self.min_sigma
            kld = SF.feature_kld(mu_hat, sigma_hat, mu, sigma.clamp_min(self.min_sigma))
            parts["kld"] = kld.mean()
            total = total + beta * parts["kld"]
        return total, parts

    @property
    def trainable(self) -> bool:
        """False when both decoder heads are switched off (nothing to learn)."""
        return self.poi_classifier is not None or self.fdp_mu is not None
