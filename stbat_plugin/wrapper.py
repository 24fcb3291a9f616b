"""``BalancedTransfer``: STBaT (RIAM + STBLM) around any shape-preserving backbone."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from stbat_plugin import functional as SF
from stbat_plugin.adapters import resolve_backbone
from stbat_plugin.imbalance import CityImbalance
from stbat_plugin.losses import Losses, NonFiniteLossError, StepOneLoss, finite_losses
from stbat_plugin.network import FeedForward, PredictionNetwork
from stbat_plugin.options import STBaTOptions, options_doc
from stbat_plugin.precision import autocast
from stbat_plugin.riam import RIAM, normalize_descriptors

__all__ = ["BalancedTransfer", "Losses", "StepOneLoss", "NonFiniteLossError", "finite_losses"]

DEFAULT_CITY = "default"


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
        predictor_hidden: width of the predictor's hidden layer (default: ``256``, as the paper).
        normalize: per-window input normalisation of the transferable network,
            ``"none"``, ``"revin"`` or ``"last"`` (default: ``"none"``; see
            :func:`stbat_plugin.network.window_norm`).
        linear_skip, window: a linear autoregressive highway from the input window to the
            output (see :class:`~stbat_plugin.network.PredictionNetwork`; default: off).
        lag_channels: seasonal lag input channels per forecast channel, normalised like the
            series (see :class:`~stbat_plugin.network.PredictionNetwork`; default: ``0``).
        registry: backbone registry whose adapter hooks may claim ``backbone``
            (default: the installed plugins).
        options: the STBaT settings as one :class:`~stbat_plugin.options.STBaTOptions`
            (default: ``None``, its defaults); each of its fields may also be given as a
            keyword argument (over ``options``, when both are given):

<STBaTOptions fields>

        The use_* switches are the paper's ablations (w/o POI, w/o FDP, w/o SimDCL,
        w/o WLoss); a switched-off term is neither built nor computed. The options are
        checked on construction and readable as attributes (``model.tau``, read-only).

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
        predictor_hidden: int = 256,
        normalize: str = "none",
        linear_skip: bool = False,
        window: int | None = None,
        lag_channels: int = 0,
        registry: Any = None,
        options: STBaTOptions | None = None,
        **settings: Any,
    ):
        super().__init__()
        self.options = opts = _options(options, settings)
        extractor = resolve_backbone(backbone, tap=tap, feature_dim=feature_dim,
                                     tap_rearrange=tap_rearrange, tap_input=tap_input,
                                     tap_select=tap_select, tap_calls=tap_calls,
                                     tap_reduce_time=tap_reduce_time,
                                     input_rearrange=input_rearrange,
                                     graph_kwargs=graph_kwargs, registry=registry)
        self.net = PredictionNetwork(extractor, horizon=horizon, out_channels=out_channels,
                                     hidden=predictor_hidden, normalize=normalize,
                                     linear_skip=linear_skip, window=window,
                                     lag_channels=lag_channels)
        d = self.net.feature_dim
        self.projector = FeedForward(2 * d, opts.projector_dim, opts.projector_dim) \
            if opts.use_simdcl else None
        self.cities = nn.ModuleDict()
        self.riam: RIAM | None = None
        if not (opts.use_simdcl or opts.use_weighted_loss):
            return  # RIAM would have no consumer: not built
        features = _as_city_mapping(region_features)
        ks = {name: f.shape[-1] for name, f in features.items()}
        if len(set(ks.values())) != 1:
            raise ValueError(
                f"Every city needs descriptors of the same size k, since RIAM is shared (got {ks}); "
                "use the same POI categories everywhere or the temporal-profile fallback for all"
            )
        self.riam = RIAM(next(iter(ks.values())), d, embed_dim=opts.embed_dim,
                         use_poi=opts.use_poi, use_fdp=opts.use_fdp, min_sigma=opts.min_sigma)
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
        k = self.riam.num_descriptors
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
        chunk = SF.chunk_rows(int(mask.sum()), self.options.simdcl_chunk)
        self.cities[name] = CityImbalance(p.to(device), mask.to(device),
                                          embed_dim=self.options.embed_dim, chunk=chunk)

    #: which optimiser trains each child module (Sec. 4.3): ``"stblm"`` (step 1) or ``"riam"``
    #: (step 2); ``None`` for a child that holds no parameters. A child with parameters that
    #: is not listed is refused by :meth:`parameter_groups`, never left untrained: a subclass
    #: that adds one declares it, ``OPTIMISED_BY = {**BalancedTransfer.OPTIMISED_BY, "x": "stblm"}``.
    OPTIMISED_BY: ClassVar[Mapping[str, str | None]] = {
        "net": "stblm", "projector": "stblm", "riam": "riam", "cities": None}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The parameters of each optimiser, by which child module owns them (:attr:`OPTIMISED_BY`).

        Raises:
            ValueError: a parameter whose owner is not in :attr:`OPTIMISED_BY` (or is listed
                as holding none), naming it and the fix.
        """
        groups: dict[str, list[nn.Parameter]] = {"stblm": [], "riam": []}
        stray = [name for name, _ in self.named_parameters(recurse=False)]
        for name, child in self.named_children():
            params = list(child.parameters())
            group = self.OPTIMISED_BY.get(name)
            if group in groups:
                groups[group] += params
            elif params:
                stray.append(name)
        if stray:
            raise ValueError(
                f"{type(self).__name__} has parameters in {stray} that no optimiser owns "
                f"(expected every child with parameters in OPTIMISED_BY, got "
                f"{dict(self.OPTIMISED_BY)}); declare them: OPTIMISED_BY = "
                f"{{**BalancedTransfer.OPTIMISED_BY, {stray[0]!r}: 'stblm'}} (or 'riam')")
        return groups

    def stblm_parameters(self) -> list[nn.Parameter]:
        """theta_feat, theta_pred and theta_proj: what step 1 of Sec. 4.3 updates."""
        return self.parameter_groups()["stblm"]

    def riam_parameters(self) -> list[nn.Parameter]:
        """theta_enc and theta_dec: what step 2 of Sec. 4.3 updates."""
        return self.parameter_groups()["riam"]

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
        return state.region_weights()

    @torch.no_grad()
    def refresh_imbalance(self, city: str | CityImbalance | None = None) -> None:
        """Recompute rho (Eq. 6) and delta (Eq. 7) of a city from the current RIAM."""
        state = city if isinstance(city, CityImbalance) else self._city(city)
        if self.riam is None:
            return
        phi = self.riam(state.descriptors[state.valid])
        if not bool(torch.isfinite(phi).all()):
            raise NonFiniteLossError(
                "RIAM's region embeddings are not finite (its parameters diverged); the "
                "imbalance state was left as it was: lower --lr, or check the descriptors")
        state.update(phi, self.options.bandwidth, density=self.options.use_weighted_loss,
                     similarity=self.options.use_simdcl)

    def imbalance_state(self) -> dict[str, dict[str, Tensor]]:
        """The derived state (rho, delta or phi) of every city that has it computed.

        ``state_dict`` leaves it out, since it is recomputed from RIAM; a run that must go on
        bit-identically saves it too (a city's state lags RIAM by the steps of the other
        cities since its own last step) and puts it back with :meth:`load_imbalance_state`.
        """
        cities: dict[str, Any] = dict(self.cities)
        return {name: city.derived_state() for name, city in cities.items() if city.fresh}

    def load_imbalance_state(self, state: Mapping[str, Mapping[str, Tensor]]) -> None:
        """Put back :meth:`imbalance_state` (after ``load_state_dict``)."""
        for name, buffers in state.items():
            self._city(name).load_derived_state(dict(buffers))

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
            state.check_regions(x, city or next(iter(self.cities)))
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

    def stblm_loss(self, x: Tensor, y: Tensor, *, state: CityImbalance | None = None,
                   mask: Tensor | None = None, **graph: Any) -> StepOneLoss:
        """Step 1's loss, its terms and the detached statistics for step 2 (:class:`StepOneLoss`)."""
        with autocast(x.device, self.precision):  # bf16: the forward only; losses in x's dtype
            pred, z = self.net.forward_with_features(x, **graph)
        pred, z = pred.to(x.dtype), z.to(x.dtype)
        opts = self.options
        weights = state.region_weights() if state is not None and opts.use_weighted_loss else None
        parts: dict[str, Tensor] = {}
        parts["pred"] = SF.weighted_prediction_loss(pred, y, weights, mask, loss=opts.loss,
                                                    huber_delta=opts.huber_delta)
        total = parts["pred"]
        stats: tuple[Tensor | None, Tensor | None] = (None, None)
        if state is not None and (self.projector is not None or self._uses_fdp):
            mu, sigma = SF.region_feature_stats(z[:, state.valid])
            stats = (mu.detach(), sigma.detach())
            if self.projector is not None:
                d = self.projector(torch.cat([mu, sigma], dim=-1))
                parts["simdcl"] = state.simdcl(d, opts.tau, opts.simdcl_anchors)
                total = total + opts.simdcl_weight * parts["simdcl"]
        return StepOneLoss(total, parts, stats)

    @property
    def _uses_fdp(self) -> bool:
        return self.riam is not None and self.riam.fdp_mu is not None

    def riam_loss(self, state: CityImbalance, mu: Tensor | None,
                  sigma: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """Step 2's :math:`\\mathcal{L}_{emb}` (Eq. 5) of a city and its terms."""
        if self.riam is None:
            raise ValueError("This BalancedTransfer has no RIAM (SimDCL and WLoss are both off)")
        return self.riam.loss(state.descriptors[state.valid], mu, sigma, self.options.beta)

    def _city(self, city: str | None) -> CityImbalance:
        if self.riam is None:
            raise ValueError("This BalancedTransfer has no RIAM (SimDCL and WLoss are both off)")
        if city is None:
            if len(self.cities) != 1:
                raise ValueError(f"Several cities are registered ({list(self.cities)}): pass city=")
            city = next(iter(self.cities))
        if city not in self.cities:
            raise KeyError(f"Unknown city {city!r}; registered: {list(self.cities)}")
        return self.cities[city]  # type: ignore[return-value]


def _option_property(name: str) -> property:
    return property(lambda self: getattr(self.options, name),
                    doc=f"``options.{name}`` (read-only: a setting is fixed on construction).")


def _document_options() -> None:
    """The options of :class:`STBaTOptions` in the signature and docstring of the wrapper,
    and readable as its attributes: declared once, in the dataclass."""
    init: Any = BalancedTransfer.__init__
    sig = inspect.signature(init)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                 annotation=f.type) for f in dataclasses.fields(STBaTOptions)]
    init.__signature__ = sig.replace(parameters=params)
    BalancedTransfer.__doc__ = (BalancedTransfer.__doc__ or "").replace(
        "<STBaTOptions fields>", options_doc(indent=" " * 12))
    for f in dataclasses.fields(STBaTOptions):
        setattr(BalancedTransfer, f.name, _option_property(f.name))


_document_options()


def _options(options: STBaTOptions | None, settings: dict[str, Any]) -> STBaTOptions:
    """``options`` with the setting keyword arguments over it (both checked)."""
    known = [f.name for f in dataclasses.fields(STBaTOptions)]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        explicit = [n for n in inspect.signature(BalancedTransfer.__init__).parameters
                    if n not in ("self", "settings")]
        close = {n: difflib.get_close_matches(n, known + explicit, n=1) for n in unknown}
        hint = "; ".join(f"{n!r}: did you mean {c[0]!r}?" for n, c in close.items() if c)
        raise TypeError(f"BalancedTransfer got unexpected keyword argument(s) {unknown}"
                        f"{' (' + hint + ')' if hint else ''}; its settings are {known} "
                        f"(STBaTOptions) and {explicit}")
    if options is None:
        return STBaTOptions(**settings)
    if not isinstance(options, STBaTOptions):
        raise TypeError(f"Expected 'options' to be an STBaTOptions (got {type(options).__name__}); "
                        "e.g. options=STBaTOptions(tau=0.5), or pass the settings as keywords")
    return dataclasses.replace(options, **settings) if settings else options


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
