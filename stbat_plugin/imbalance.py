"""The per-city imbalance state of STBaT: descriptors, valid regions, density and similarity.

One :class:`CityImbalance` per source city. Its descriptors and valid regions are the city's
data (saved in ``state_dict``); the log-density (Eq. 6) and the similarity (Eq. 7) are
derived from them by the current RIAM, so they are buffers with ``persistent=False``:
recomputed, never loaded stale. After ``load_state_dict`` a city is marked not
:attr:`~CityImbalance.fresh` and is recomputed on first use.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from stbat_plugin import functional as SF

__all__ = ["CityImbalance"]

#: the derived buffers, recomputed from RIAM (never in ``state_dict``)
DERIVED = ("log_density", "delta", "phi")


class CityImbalance(nn.Module):
    """Descriptors, valid regions and the cached imbalance (rho, delta) of one city.

    With ``chunk=None`` the similarity is held as the dense ``delta`` ``[m, m]``; with a
    chunk size (large cities) only the embeddings ``phi`` ``[m, D]`` are held, and SimDCL
    recomputes its rows of delta per block of anchors (no ``[m, m]`` tensor).

    Args:
        descriptors: normalised region descriptors ``[n, k]`` (rows summing to 1).
        valid: bool ``[n]``, the regions taking part (``m`` of them, at least 2).
        embed_dim: size ``D`` of RIAM's embeddings (default: ``32``).
        chunk: anchor rows per block, or ``None`` for a dense ``delta`` (default: ``None``).

    Shapes:
        descriptors: ``[n, k]``; valid: ``[n]``; log_density: ``[m]``; delta: ``[m, m]``
        (dense) or phi: ``[m, D]`` (chunked).
    """

    descriptors: Tensor
    valid: Tensor
    log_density: Tensor
    delta: Tensor
    phi: Tensor

    def __init__(self, descriptors: Tensor, valid: Tensor, *, embed_dim: int = 32,
                 chunk: int | None = None):
        super().__init__()
        m = int(valid.sum())
        self.chunk = chunk
        self.register_buffer("descriptors", descriptors)
        self.register_buffer("valid", valid)
        self.register_buffer("log_density", torch.zeros(m), persistent=False)
        if chunk is None:
            self.register_buffer("delta", torch.zeros(m, m), persistent=False)
        else:
            self.register_buffer("phi", torch.zeros(m, embed_dim), persistent=False)
        #: whether the derived buffers hold the values of the current RIAM (or of the
        #: last refresh of this city: a city's state may lag RIAM by other cities' steps)
        self.fresh = False

    @torch.no_grad()
    def update(self, phi: Tensor, bandwidth: float, *, density: bool, similarity: bool) -> None:
        """Recompute rho (Eq. 6) and delta (Eq. 7) from the embeddings ``phi`` ``[m, D]``."""
        if density:
            self.log_density.copy_(SF.kde_log_density(phi, bandwidth) if self.chunk is None
                                   else SF.kde_log_density(phi, bandwidth, chunk=self.chunk))
        if similarity and self.chunk is None:
            self.delta.copy_(SF.pattern_similarity(phi))
        elif similarity:
            self.phi.copy_(phi)  # delta rows are recomputed per block by SimDCL
        self.fresh = True

    def region_weights(self) -> Tensor:
        """Region weights ``[n]`` (Eq. 14) from the cached density; 0 outside valid regions."""
        w = torch.zeros(self.valid.shape[0], dtype=self.log_density.dtype,
                        device=self.valid.device)
        w[self.valid] = SF.density_weights(self.log_density)
        return w

    def simdcl(self, d: Tensor, tau: float, anchors: int | None = None) -> Tensor:
        """SimDCL (Eq. 13) of the projected statistics ``d`` ``[m, P]`` against delta."""
        if self.chunk is not None:
            return SF.simdcl_loss_from_embeddings(d, self.phi, tau, chunk=self.chunk,
                                                  anchors=anchors)
        if anchors is None:
            return SF.simdcl_loss(d, self.delta, tau)
        return SF.simdcl_loss(d, self.delta, tau, anchors=anchors)

    def check_regions(self, x: Tensor, city: str) -> None:
        """Refuse a batch ``x`` whose region count is not this city's."""
        n = x.shape[2] if x.dim() == 4 else x.shape[-2] * x.shape[-1]
        if self.valid.shape[0] != n:
            raise ValueError(f"Expected 'region_features' of city {city!r} with one row per "
                             f"region of x, n={n} (got {self.valid.shape[0]} rows); pass the "
                             "descriptors of the regions in x, in the same order")

    def derived_state(self) -> dict[str, Tensor]:
        """Copies of the derived buffers (what ``state_dict`` leaves out)."""
        return {name: buf.detach().clone() for name, buf in self.named_buffers(recurse=False)
                if name in DERIVED}

    def load_derived_state(self, state: dict[str, Tensor]) -> None:
        """Put back :meth:`derived_state` (e.g. to continue a run bit-identically); fresh."""
        own = dict(self.named_buffers(recurse=False))
        for name, value in state.items():
            if name not in DERIVED or name not in own or own[name].shape != value.shape:
                got = list(value.shape)
                raise ValueError(f"Expected derived buffers {[n for n in DERIVED if n in own]} "
                                 f"of this city's shapes (got {name!r} of shape {got}); the "
                                 "state comes from a model with other cities or chunking")
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)
        self.fresh = True

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Load descriptors and valid regions; the derived buffers are recomputed on first use,
        or taken from a ``state_dict`` written before they became non-persistent."""
        super()._load_from_state_dict(state_dict, prefix, *args)
        unexpected_keys: list[str] = args[3]
        own = dict(self.named_buffers(recurse=False))
        with torch.no_grad():
            for name in DERIVED:
                key = prefix + name
                if key in state_dict and name in own and own[name].shape == state_dict[key].shape:
                    own[name].copy_(state_dict[key])
                    if key in unexpected_keys:
                        unexpected_keys.remove(key)
        self.fresh = False
