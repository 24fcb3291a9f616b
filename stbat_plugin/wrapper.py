"""``BalancedTransfer``: STBaT (RIAM + STBLM) around any shape-preserving backbone."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from stbat_plugin import functional as SF
from stbat_plugin.adapters import resolve_backbone
from stbat_plugin.network import FeedForward, PredictionNetwork
from stbat_plugin.precision import autocast
from stbat_plugin.riam import RIAM, normalize_descriptors

__all__ = ["BalancedTransfer", "Losses", "NonFiniteLossError", "finite_losses"]

log = logging.getLogger(__name__)

DEFAULT_CITY = "default"


@dataclass(frozen=True)
class Losses:
    """Named loss breakdown of one iteration (floats; 0.0 where a term is switched off).

    ``total`` is step 1's objective (``pred + simdcl_weight * simdcl``); ``emb`` is
    RIAM's L_emb of step 2 (``poi_ce + beta * kld``), optimised separately.
    """

    total: float
    pred: float
    simdcl: float = 0.0
    emb: float = 0.0
    poi_ce: float = 0.0
    kld: float = 0.0
    skipped: float = 0.0  # 1.0 when the step was skipped for a non-finite loss

    def as_dict(self) -> dict[str, float]:
        """The terms by name (``skipped`` only when the step was skipped)."""
        out = asdict(self)
        if not self.skipped:
            del out["skipped"]
        return out


class _City(nn.Module):
    """Per-city state: descriptors, valid regions, and the cached imbalance (rho, delta).

    With ``chunk=None`` the similarity is held as the dense ``delta`` ``[n, n]``; with a
    chunk size (large cities) only the embeddings ``phi`` ``[n, D]`` are held, and SimDCL
    recomputes its rows of delta per block of anchors (no ``[n, n]`` tensor).
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
        self.register_buffer("log_density", torch.zeros(m))
        if chunk is None:
            self.register_buffer("delta", torch.zeros(m, m))
        else:
            self.register_buffer("phi", torch.zeros(m, embed_dim))
        self.fresh = False


class BalancedTransfer(nn.Module):
    r"""Spatio-Temporal Balanced Transfer (STBaT) around a backbone.

    Wraps ``backbone`` (any model mapping ``[b, t, n, c]`` to per-region features
    ``[b, n, d]``; see :func:`stbat_plugin.adapters.resolve_backbone`) with the
    feedforward predictor, the projector and SimDCL (STBLM, Sec. 4.2) and the
    regional pattern autoencoder with density and similarity (RIAM, Sec. 4.1),
    trained by the bidirectional algorithm of Sec. 4.3 (:meth:`train_iteration`).

    Args:
        backbone: the user's model; its code is never edited.
        region_features: ``[n, k]`` descriptors (POI counts or distribution) of one
            city, or ``{city: [n_city, k]}`` for several source cities (RIAM is shared,
            so ``k`` must agree). Required unless both SimDCL and WLoss are off.
        valid_regions: ``{city: bool [n_city]}`` regions taking part in density,
            similarity, SimDCL and KLD (default: all), e.g. without regions that
            never have flow.
        horizon: steps predicted (default: ``1``). out_channels: (default: ``1``).
        feature_dim: size ``d`` of the backbone features (default: the backbone's
            ``feature_dim``).
        tap: name of the submodule whose output (or input) gives the features; with the
            ``tap_*`` options and ``input_rearrange`` of
            :func:`~stbat_plugin.adapters.resolve_backbone` (``tap_input``, ``tap_select``,
            ``tap_calls``, ``tap_rearrange``, ``tap_reduce_time``, ``graph_kwargs``; see
            docs/plugins.md, "Wrapping a model you did not write").
        embed_dim: RIAM embedding size ``D`` (default: ``32``).
        bandwidth: KDE bandwidth ``h`` (default: ``0.85``).
        tau: SimDCL temperature (default: ``1.0``).
        beta: weight of the KLD in :math:`\mathcal{L}_{emb}` (default: ``0.01``).
        simdcl_weight: weight of SimDCL next to the prediction loss (default: ``1.0``;
            the paper gives none).
        use_poi, use_fdp, use_simdcl, use_weighted_loss: the paper's ablations
            (w/o POI, w/o FDP, w/o SimDCL, w/o WLoss); a switched-off term is neither
            built nor computed.
        loss: elementwise prediction loss, ``"mse"``, ``"mae"`` or ``"huber"`` (default: ``"mse"``).
        predictor_hidden, projector_dim: widths (default: ``256`` each, as the paper).
        normalize: per-window input normalisation of the transferable network,
            ``"none"``, ``"revin"`` or ``"last"`` (default: ``"none"``; see
            :func:`stbat_plugin.network.window_norm`).
        linear_skip, window: a linear autoregressive highway from the input window to the
            output (see :class:`~stbat_plugin.network.PredictionNetwork`; default: off).
        min_sigma: floor of both sigmas in the KLD, in feature units (default: ``1e-2``).
        simdcl_chunk: anchor rows per block of SimDCL, the KDE and the similarity, memory
            O(chunk x n) (default: ``None``, automatic: one block up to
            :data:`~stbat_plugin.functional.AUTO_DENSE_MAX` regions, as before, then blocks of
            ~4 M entries; a chunked city holds its embeddings, not an ``[n, n]`` delta).
        simdcl_anchors: SimDCL over this many anchor rows drawn per step, an unbiased
            estimate of the loss and its gradient (default: ``None``, every region, exact).
        registry: backbone registry whose adapter hooks may claim ``backbone``
            (default: the installed plugins).

    Shapes:
        x: ``[b, t, n, c]`` -> prediction ``[b, s, n, c_out]``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        region_features: Tensor | Mapping[str, Tensor] | None = None,
        valid_regions: Mapping[str, Tensor] | None = None,
        horizon: int = 1,
        out_channels: int = 1,
        feature_dim: int | None = None,
        tap: str | None = None,
        tap_rearrange: str | None = None,
        tap_input: bool = False,
        tap_select: int | str | None = None,
        tap_calls: str | None = None,
        tap_reduce_time: str | None = None,
        input_rearrange: str | None = None,
        graph_kwargs: tuple[str, ...] | None = None,
        embed_dim: int = 32,
        bandwidth: float = 0.85,
        tau: float = 1.0,
        beta: float = 0.01,
        simdcl_weight: float = 1.0,
        use_poi: bool = True,
        use_fdp: bool = True,
        use_simdcl: bool = True,
        use_weighted_loss: bool = True,
        loss: str = "mse",
        predictor_hidden: int = 256,
        projector_dim: int = 256,
        min_sigma: float = 1e-2,
        normalize: str = "none",
        linear_skip: bool = False,
        window: int | None = None,
        simdcl_chunk: int | None = None,
        simdcl_anchors: int | None = None,
        registry: Any = None,
    ):
        super().__init__()
        SF.chunk_rows(1, simdcl_chunk)  # validates
        if simdcl_anchors is not None and (isinstance(simdcl_anchors, bool)
                                           or not isinstance(simdcl_anchors, int) or simdcl_anchors < 1):
            raise ValueError(f"simdcl_anchors must be a whole number >= 1 or None for every region "
                             f"(got {simdcl_anchors!r})")
        self.simdcl_chunk, self.simdcl_anchors = simdcl_chunk, simdcl_anchors
        self.embed_dim = int(embed_dim)
        extractor = resolve_backbone(backbone, tap=tap, feature_dim=feature_dim,
                                     tap_rearrange=tap_rearrange, tap_input=tap_input,
                                     tap_select=tap_select, tap_calls=tap_calls,
                                     tap_reduce_time=tap_reduce_time,
                                     input_rearrange=input_rearrange,
                                     graph_kwargs=graph_kwargs, registry=registry)
        self.net = PredictionNetwork(extractor, horizon=horizon, out_channels=out_channels,
                                     hidden=predictor_hidden, normalize=normalize,
                                     linear_skip=linear_skip, window=window)
        d = self.net.feature_dim
        self.bandwidth, self.tau, self.beta = float(bandwidth), float(tau), float(beta)
        self.simdcl_weight, self.loss = float(simdcl_weight), loss
        self.use_simdcl, self.use_weighted_loss = use_simdcl, use_weighted_loss
        self.projector = FeedForward(2 * d, projector_dim, projector_dim) if use_simdcl else None
        self.cities = nn.ModuleDict()
        self.riam: RIAM | None = None
        if not (use_simdcl or use_weighted_loss):
            return  # RIAM would have no consumer: not built
        features = _as_city_mapping(region_features)
        ks = {name: f.shape[-1] for name, f in features.items()}
        if len(set(ks.values())) != 1:
            raise ValueError(
                f"Every city needs descriptors of the same size k, since RIAM is shared (got {ks}); "
                "use the same POI categories everywhere or the temporal-profile fallback for all"
            )
        self.riam = RIAM(next(iter(ks.values())), d, embed_dim=embed_dim, use_poi=use_poi,
                         use_fdp=use_fdp, min_sigma=min_sigma)
        for name, feats in features.items():
            self.add_city(name, feats, None if valid_regions is None else valid_regions.get(name))

    # ------------------------------------------------------------------ set-up
    def add_city(self, name: str, region_features: Tensor, valid: Tensor | None = None) -> None:
        """Register a source city's descriptors ``[n, k]`` (and valid regions ``[n]``)."""
        if self.riam is None:
            raise ValueError("This BalancedTransfer has neither SimDCL nor WLoss: no cities needed")
        if not name or "." in name:
            raise ValueError(f"City name must be non-empty and contain no '.' (got {name!r})")
        p = normalize_descriptors(torch.as_tensor(region_features, dtype=torch.float32))
        k = self.riam.encoder[0].in_features
        if p.shape[1] != k:
            raise ValueError(f"City {name!r}: descriptors have k={p.shape[1]}, RIAM expects k={k}")
        mask = torch.ones(p.shape[0], dtype=torch.bool) if valid is None else \
            torch.as_tensor(valid, dtype=torch.bool)
        if mask.shape != (p.shape[0],) or int(mask.sum()) < 2:
            raise ValueError(
                f"City {name!r}: valid_regions must be a bool vector of length n={p.shape[0]} "
                f"with at least 2 True (got shape {list(mask.shape)}, {int(mask.sum())} True)"
            )
        device = next(self.riam.parameters()).device
        chunk = SF.chunk_rows(int(mask.sum()), self.simdcl_chunk)
        self.cities[name] = _City(p.to(device), mask.to(device), embed_dim=self.embed_dim, chunk=chunk)

    def stblm_parameters(self) -> list[nn.Parameter]:
        """theta_feat, theta_pred and theta_proj: what step 1 of Sec. 4.3 updates."""
        params = list(self.net.parameters())
        return params + (list(self.projector.parameters()) if self.projector is not None else [])

    def riam_parameters(self) -> list[nn.Parameter]:
        """theta_enc and theta_dec: what step 2 of Sec. 4.3 updates."""
        return list(self.riam.parameters()) if self.riam is not None else []

    def configure_optimizers(self, lr: float = 1e-3, riam_lr: float | None = None,
                             weight_decay: float = 0.0) -> tuple[torch.optim.Optimizer, ...]:
        """Adam for STBLM and, when RIAM is trainable, a second Adam for RIAM."""
        opts: tuple[torch.optim.Optimizer, ...] = (
            torch.optim.Adam(self.stblm_parameters(), lr=lr, weight_decay=weight_decay),
        )
        if self.riam is not None and self.riam.trainable:
            opts += (torch.optim.Adam(self.riam_parameters(), lr=riam_lr or lr),)
        return opts

    def transferable(self) -> PredictionNetwork:
        """Backbone + predictor: what is fine-tuned and served on the target city."""
        return self.net

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, **graph: Any) -> Tensor:
        return self.net(x, **graph)

    def city_weights(self, city: str | None = None) -> Tensor:
        """Current region weights ``[n]`` of a city (Eq. 14; 0 outside valid regions)."""
        state = self._city(city)
        self.refresh_imbalance(state)
        return self._region_weights(state)

    @torch.no_grad()
    def refresh_imbalance(self, city: str | _City | None = None) -> None:
        """Recompute rho (Eq. 6) and delta (Eq. 7) of a city from the current RIAM."""
        state = city if isinstance(city, _City) else self._city(city)
        if self.riam is None:
            return
        phi = self.riam(state.descriptors[state.valid])
        if not bool(torch.isfinite(phi).all()):
            raise NonFiniteLossError(
                "RIAM's region embeddings are not finite (its parameters diverged); the "
                "imbalance state was left as it was: lower --lr, or check the descriptors")
        if self.use_weighted_loss:
            state.log_density.copy_(SF.kde_log_density(phi, self.bandwidth) if state.chunk is None
                                    else SF.kde_log_density(phi, self.bandwidth, chunk=state.chunk))
        if self.use_simdcl and state.chunk is None:
            state.delta.copy_(SF.pattern_similarity(phi))
        elif self.use_simdcl:
            state.phi.copy_(phi)  # delta rows are recomputed per block by SimDCL
        state.fresh = True

    # ------------------------------------------------------------------ training
    #: training precision of the forward pass (:mod:`stbat_plugin.precision`): ``"fp32"`` or
    #: ``"bf16"`` (autocast); set by the pipeline from ``TransferConfig.precision``
    precision: str = "fp32"

    #: set by multi-process pre-training (:mod:`stbat_plugin.pipeline.distributed`): averages an
    #: optimiser's gradients over the processes and says whether all of them step
    grad_sync: Callable[[torch.optim.Optimizer, bool], bool] | None = None

    def _synced(self, optimizer: torch.optim.Optimizer, ok: bool = True) -> bool:
        """Between backward and step (``ok``), or instead of them (``ok=False``): True when
        the step is taken (always ``ok`` in one process)."""
        return ok if self.grad_sync is None else self.grad_sync(optimizer, ok)

    def train_iteration(
        self,
        x: Tensor,
        y: Tensor,
        optimizers: tuple[torch.optim.Optimizer, ...],
        *,
        city: str | None = None,
        mask: Tensor | None = None,
        on_nonfinite: str = "raise",
        **graph: Any,
    ) -> Losses:
        """One iteration of the bidirectional algorithm (Sec. 4.3) on a batch of one city.

        Step 1 updates the backbone, predictor and projector with
        ``weighted prediction loss + simdcl_weight * SimDCL``, using the current rho
        and delta. Step 2 updates RIAM with :math:`\\mathcal{L}_{emb}` against the
        detached feature statistics of step 1. Then rho and delta are refreshed.

        Args:
            x: ``[b, t, n, c]`` inputs; y: ``[b, s, n, c_out]`` targets; mask: valid targets.
            optimizers: from :meth:`configure_optimizers` (STBLM first, RIAM second).
            city: which source city the batch comes from (default: the only one).
            on_nonfinite: a loss term that is NaN or inf is never stepped on (nothing is
                written into the parameters or the RIAM state): ``"raise"`` (default) raises
                :class:`NonFiniteLossError` naming the term and the cause (the batch's data or
                a diverging model); ``"skip"`` skips the step and returns ``skipped=1``.
        """
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip' (got {on_nonfinite!r})")
        state = self._city(city) if self.riam is not None else None
        if state is not None:
            _check_regions(state, x, city or next(iter(self.cities)))
        if state is not None and not state.fresh:
            self.refresh_imbalance(state)
        where = f"city {city!r}" if city is not None else "the batch"
        try:
            stblm_loss, parts, stats = self.stblm_loss(x, y, state=state, mask=mask, **graph)
        except SF.NonFiniteInputError as exc:  # NaN features reached SimDCL / the statistics
            nan = torch.tensor(float("nan"))
            finite_losses({"total": nan, "simdcl": nan}, f"{where} ({exc})", on_nonfinite,
                          inputs={"x": x, "y": y}, mask=mask)
            self._synced(optimizers[0], ok=False)
            optimizers[0].zero_grad(set_to_none=True)
            return Losses(total=float("nan"), pred=float("nan"), skipped=1.0)
        if not finite_losses({"total": stblm_loss, **parts}, where, on_nonfinite,
                             inputs={"x": x, "y": y}, mask=mask):
            self._synced(optimizers[0], ok=False)
            optimizers[0].zero_grad(set_to_none=True)
            return Losses(total=float("nan"), pred=float("nan"), skipped=1.0)
        optimizers[0].zero_grad(set_to_none=True)
        stblm_loss.backward()
        if not self._synced(optimizers[0]):  # another process skipped this step
            return Losses(total=float("nan"), pred=float("nan"), skipped=1.0)
        optimizers[0].step()
        if state is not None and self.riam is not None and self.riam.trainable:
            if len(optimizers) < 2:
                raise ValueError("RIAM is trainable: pass (stblm_optimizer, riam_optimizer)")
            emb, emb_parts = self.riam_loss(state, *stats)
            if not finite_losses({"emb": emb, **emb_parts}, where, on_nonfinite):
                self._synced(optimizers[1], ok=False)
                optimizers[1].zero_grad(set_to_none=True)
                return Losses(total=float(stblm_loss.detach()),
                              **{k: float(v.detach()) for k, v in parts.items()}, skipped=1.0)
            optimizers[1].zero_grad(set_to_none=True)
            emb.backward()
            if not self._synced(optimizers[1]):  # another process skipped this step
                return Losses(total=float(stblm_loss.detach()),
                              **{k: float(v.detach()) for k, v in parts.items()}, skipped=1.0)
            optimizers[1].step()
            parts = {**parts, "emb": emb, **emb_parts}
            self.refresh_imbalance(state)
        return Losses(total=float(stblm_loss.detach()),
                      **{k: float(v.detach()) for k, v in parts.items()})

    def stblm_loss(self, x: Tensor, y: Tensor, *, state: _City | None = None,
                   mask: Tensor | None = None, **graph: Any):
        """Step 1's loss; returns ``(loss, parts, (mu, sigma) detached or None)``."""
        with autocast(x.device, self.precision):  # bf16: the forward only; losses in x's dtype
            pred, z = self.net.forward_with_features(x, **graph)
        pred, z = pred.to(x.dtype), z.to(x.dtype)
        weights = self._region_weights(state) if state is not None and self.use_weighted_loss \
            else None
        parts: dict[str, Tensor] = {}
        parts["pred"] = SF.weighted_prediction_loss(pred, y, weights, mask, loss=self.loss)
        total = parts["pred"]
        stats: tuple[Tensor | None, Tensor | None] = (None, None)
        if state is not None and (self.projector is not None or self._uses_fdp):
            mu, sigma = SF.region_feature_stats(z[:, state.valid])
            stats = (mu.detach(), sigma.detach())
            if self.projector is not None:
                d = self.projector(torch.cat([mu, sigma], dim=-1))
                parts["simdcl"] = self._simdcl(d, state)
                total = total + self.simdcl_weight * parts["simdcl"]
        return total, parts, stats

    def _simdcl(self, d: Tensor, state: _City) -> Tensor:
        if state.chunk is not None:
            return SF.simdcl_loss_from_embeddings(d, state.phi, self.tau, chunk=state.chunk,
                                                  anchors=self.simdcl_anchors)
        if self.simdcl_anchors is None:
            return SF.simdcl_loss(d, state.delta, self.tau)
        return SF.simdcl_loss(d, state.delta, self.tau, anchors=self.simdcl_anchors)

    @property
    def _uses_fdp(self) -> bool:
        return self.riam is not None and self.riam.fdp_mu is not None

    def riam_loss(self, state: _City, mu: Tensor | None, sigma: Tensor | None):
        assert self.riam is not None
        return self.riam.loss(state.descriptors[state.valid], mu, sigma, self.beta)

    def _region_weights(self, state: _City) -> Tensor:
        w = torch.zeros(state.valid.shape[0], dtype=state.log_density.dtype,
                        device=state.valid.device)
        w[state.valid] = SF.density_weights(state.log_density)
        return w

    def _city(self, city: str | None) -> _City:
        if self.riam is None:
            raise ValueError("This BalancedTransfer has no RIAM (SimDCL and WLoss are both off)")
        if city is None:
            if len(self.cities) != 1:
                raise ValueError(f"Several cities are registered ({list(self.cities)}): pass city=")
            city = next(iter(self.cities))
        if city not in self.cities:
            raise KeyError(f"Unknown city {city!r}; registered: {list(self.cities)}")
        return self.cities[city]  # type: ignore[return-value]


def _check_regions(state: _City, x: Tensor, city: str) -> None:
    n = x.shape[2] if x.dim() == 4 else x.shape[-2] * x.shape[-1]
    if state.valid.shape[0] != n:
        raise ValueError(f"Expected 'region_features' of city {city!r} with one row per region of "
                         f"x, n={n} (got {state.valid.shape[0]} rows); pass the descriptors of the "
                         "regions in x, in the same order")


def _as_city_mapping(region_features: Any) -> dict[str, Tensor]:
    if region_features is None:
        raise ValueError(
            "STBaT needs region_features (POI counts [n, k], or {city: [n, k]}) for RIAM; "
            "pass them, or switch both use_simdcl and use_weighted_loss off"
        )
    if isinstance(region_features, Mapping):
        if not region_features:
            raise ValueError("region_features is an empty mapping: give at least one city")
        return {str(k): torch.as_tensor(v) for k, v in region_features.items()}
    return {DEFAULT_CITY: torch.as_tensor(region_features)}


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; nothing was stepped on."""


_TERMS = {"total": "total loss", "pred": "prediction loss", "simdcl": "SimDCL loss",
          "emb": "RIAM loss L_emb", "poi_ce": "RIAM POI cross-entropy (CE)",
          "kld": "RIAM feature-distribution KLD"}


def finite_losses(parts: dict[str, Tensor], where: str, on_nonfinite: str = "raise", *,
                  inputs: dict[str, Tensor] | None = None, mask: Tensor | None = None) -> bool:
    """True when every loss term is finite. Otherwise False (``on_nonfinite="skip"``), or
    :class:`NonFiniteLossError` naming the terms and the likely cause: non-finite values in
    the batch's ``inputs`` (where they count: ``y`` under ``mask``) point at the data, finite
    inputs at a diverging model."""
    bad = [k for k, v in parts.items() if not math.isfinite(float(v.detach()))]
    if not bad:
        return True
    if on_nonfinite == "skip":
        log.warning("%s: non-finite %s; step skipped", where, ", ".join(bad))
        return False
    names = [_TERMS.get(k, k) for k in bad if k != "total"] or [_TERMS["total"]]
    cause = "the model diverged: lower --lr (or --finetune-lr), or use on_nonfinite='skip'"
    for name, t in (inputs or {}).items():
        values = t if (name != "y" or mask is None) else t[mask.expand_as(t).bool()]
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            cause = (f"the batch's {name} holds NaN or inf values, so the data is the cause: "
                     "check the city file (unobserved cells must be 0 with observed=False)")
            break
        if values.is_floating_point() and values.numel() and float(values.abs().max()) > 1e15:
            cause = (f"the batch's {name} holds values of {float(values.abs().max()):.3g}: "
                     "check the city file and its scaling")
            break
    raise NonFiniteLossError(f"{where}: {', '.join(names)} became "
                             f"{[float(parts[k].detach()) for k in bad]}; nothing was updated. "
                             f"Cause: {cause}")
