"""Run settings of the cross-city pipeline: one typed, JSON-serialisable dataclass."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from stbat_plugin.options import STBaTOptions

__all__ = ["TransferConfig", "ADAPTATION_ONLY", "CALIBRATIONS", "STBAT_FIELDS", "int_list",
           "float_list", "setting_fields"]

#: the STBaT settings (:class:`~stbat_plugin.options.STBaTOptions`), nested as
#: ``TransferConfig.stbat`` and flat in files, rows, specs and flags (``simdcl_weight``)
STBAT_FIELDS = tuple(f.name for f in fields(STBaTOptions))

#: per-region output calibrations on the target's training days (``TransferConfig.calibrate``)
CALIBRATIONS = ("none", "affine", "auto")


_NOTHING = object()


def _opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
         flag: str | None = None, parse: Callable[[str], Any] | None = None,
         adapt_only: bool = False, saved_absent: Any = _NOTHING) -> Any:
    """A settings field with its CLI help (the CLI flags are generated from these fields).

    ``parse`` turns the flag's text into the value (default: from the field's type);
    ``adapt_only`` marks a setting that changes only the adaptation to the target, never
    pre-training (a cached pre-trained network is reused across its values);
    ``saved_absent`` is the value a config SAVED by an earlier version (a checkpoint, a run
    folder) meant when it lacks the key, for a setting whose default has changed since
    (:meth:`TransferConfig.from_saved`).
    """
    meta = {"help": help, "choices": choices, "flag": flag, "parse": parse,
            "adapt_only": adapt_only, "saved_absent": saved_absent}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def _items(text: str) -> list[str]:
    """``"1,7"`` -> ``["1", "7"]``; ``""`` or ``"none"`` -> ``[]``."""
    text = text.strip()
    return [] if text.lower() in ("", "none") else [p.strip() for p in text.split(",")]


def int_list(text: str) -> list[int]:
    """Parse a comma-separated list of whole numbers, e.g. ``"1,7"`` (``"none"``: empty)."""
    return [int(p) for p in _items(text)]


def float_list(text: str) -> list[float]:
    """Parse a comma-separated list of numbers, e.g. ``"1e-4,1e-3"`` (``"none"``: empty)."""
    return [float(p) for p in _items(text)]


@dataclass
class TransferConfig:
    """Every number of the protocol (paper Sec. 5.1) and of training, as a parameter.

    Defaults follow the paper where it gives a value (1-step horizon, source train:val 2:1,
    target 3 days / 60 days / 60 days, min-max scaling, patience 5, ST-net widths, D=32,
    h=0.85, beta=0.01, tau=1). The input pipeline was chosen on target VALIDATION data
    (docs/results.md): a 24-step window instead of the paper's 6, RevIN-style
    normalisation around the last value, a linear autoregressive skip, and a 1-day seasonal
    lag input (so a target needs at least 2 training days in few-shot). The paper's setting
    is ``window=6, normalize="none", linear_skip=False, lag_days=[]``.
    """

    backbone: str = _opt("graph_stnet", "registered backbone name")
    backbone_kwargs: dict[str, Any] = _opt(
        dict, 'JSON keyword arguments of the backbone, e.g. \'{"hidden": 64}\'')
    window: int = _opt(24, "input steps t of each window (the paper: 6; 24 chosen on validation, "
                       "docs/results.md)")
    horizon: int = _opt(1, "steps s predicted")
    normalize: str = _opt("revin-last", "per-window, per-region input normalisation, undone on the "
                          "output: none, revin (window mean/std), last (residual to the last "
                          "value) or revin-last (both)",
                          choices=("none", "revin", "last", "revin-last"))
    time_features: bool = _opt(False, "add time-of-day and day-of-week sin/cos input channels")
    lag_days: list[int] = _opt(lambda: [1], "seasonal lag inputs, in days, e.g. 1,7 (default 1, "
                               "chosen on validation, docs/results.md): per lag L one more "
                               "input channel per region whose step j holds the series L days "
                               "before step j+1, so its last step holds the value L days before "
                               "the target (the seasonal-naive forecast); training windows then "
                               "need L days more history inside the training days (none: no "
                               "lag inputs)", parse=int_list, saved_absent=[])
    linear_skip: bool = _opt(True, "add a linear map of the normalised input window to the "
                             "deep network's output (an LSTNet-style autoregressive highway)")
    val_days: int = _opt(60, "target validation days (before the test days)")
    test_days: int = _opt(60, "target test days (the last days of the series)")
    source_train_ratio: int = _opt(2, "source train part of the chronological train:val split")
    source_val_ratio: int = _opt(1, "source validation part of the train:val split")
    scaler: str = _opt("minmax", "per-channel scaler, fitted on training data only: min-max, "
                       "z-score, or log1p (min-max of log(1 + flow), inverted with expm1; "
                       "flows must be >= 0)", choices=("minmax", "zscore", "log1p"))
    batch_size: int = _opt(32, "windows per batch")
    lr: float = _opt(1e-3, "pre-training learning rate (Adam)")
    max_epochs: int = _opt(50, "pre-training epochs (upper bound; early stopping on validation)")
    patience: int = _opt(5, "early-stopping patience (epochs without validation improvement)")
    finetune_lr: float = _opt(1e-3, "target fine-tuning (and target-only) learning rate",
                              adapt_only=True)
    finetune_epochs: int = _opt(50, "target fine-tuning epochs (upper bound)", adapt_only=True)
    finetune_lr_grid: list[float] = _opt(
        list, "fine-tuning (and target-only) learning rates to try, e.g. 1e-4,3e-4,1e-3: each "
        "adapts the same pre-trained weights with the same seed and the one with the lowest "
        "target-validation RMSE is kept (none: --finetune-lr only)", parse=float_list,
        adapt_only=True)
    calibrate: str = _opt("none", "per-region output calibration fitted on the target's "
                          "training windows after fine-tuning: y = a*pred + b per region and "
                          "channel in scaled units, shrunk toward a=1, b=0; 'auto' keeps it "
                          "only if target-validation RMSE improves. Target-only parameters, "
                          "never transferred; zero-shot has none", choices=CALIBRATIONS,
                          adapt_only=True)
    calibrate_shrinkage: float = _opt(24.0, "calibration: weight lambda of the pull toward "
                                      "a=1, b=0, in windows (lambda*((a-1)^2 + b^2) next to the "
                                      "sum of squared errors over the training windows)",
                                      adapt_only=True)
    max_batches_per_epoch: int | None = _opt(None, "cap on pre-training batches per epoch")
    source_span: str | None = _opt(None, "cut the source series, e.g. 2019-01-01:2019-06-30, or "
                                   "per city: nyc_taxi=2019-01-01:2019-04-30,melb=2022-01-01:")
    target_span: str | None = _opt(None, "cut the target series")
    descriptors: str = _opt("auto", "region descriptors of RIAM: POI or the temporal-profile "
                            "fallback", choices=("auto", "poi", "temporal_profile"))
    device: str = _opt("cpu", "torch device, e.g. cpu or cuda:0")
    precision: str = _opt("fp32", "training precision: fp32, or bf16 autocast of the forward "
                          "passes (losses, optimisers, validation and test stay float32)",
                          choices=("fp32", "bf16"))
    on_nonfinite: str = _opt("raise", "a NaN/inf loss: raise an error naming the term and the "
                             "cause, or skip that step (nothing is ever updated with it)",
                             choices=("raise", "skip"))
    # STBaT: the settings of BalancedTransfer, declared once (STBaTOptions); one flag each
    stbat: STBaTOptions = _opt(lambda: STBaTOptions(simdcl_weight=0.01),
                               "the STBaT settings (STBaTOptions), with simdcl_weight 0.01, "
                               "chosen on target validation (docs/results.md)")
    # MAML (first-order)
    maml_inner_lr: float = _opt(1e-2, "MAML: inner-loop learning rate")
    maml_inner_steps: int = _opt(3, "MAML: inner-loop steps")

    def __post_init__(self) -> None:
        positive = ("window", "horizon", "val_days", "test_days", "batch_size", "max_epochs",
                    "patience", "source_train_ratio", "source_val_ratio")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.max_batches_per_epoch is not None and self.max_batches_per_epoch < 1:
            raise ValueError(f"max_batches_per_epoch must be >= 1 or None for no cap (got "
                             f"{self.max_batches_per_epoch}); 0 would skip pre-training")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2: Eq. 10 needs two samples per batch")
        if not isinstance(self.stbat, STBaTOptions):
            raise ValueError(f"stbat must be an STBaTOptions (got {type(self.stbat).__name__}); "
                             "build the config from a dict with TransferConfig.from_dict")
        for name in ("finetune_epochs", "maml_inner_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        self._check_lists()
        for name, low, strict in (("lr", 0.0, True), ("finetune_lr", 0.0, True),
                                  ("calibrate_shrinkage", 0.0, True),
                                  ("maml_inner_lr", 0.0, True)):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < low or (strict and value == low):
                bound = f"> {low}" if strict else f">= {low}"
                raise ValueError(f"{name} must be a finite number {bound} (got {value!r}); "
                                 f"set --{name.replace('_', '-')}")
        if not isinstance(self.backbone_kwargs, dict):
            raise ValueError(f"backbone_kwargs must be a JSON object / dict (got "
                             f"{self.backbone_kwargs!r}), e.g. '{{\"hidden\": 64}}'")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {list(choices)} "
                                 f"(got {getattr(self, f.name)!r})")

    def _check_lists(self) -> None:
        """``lag_days``: distinct whole days >= 1, stored sorted; ``finetune_lr_grid``:
        distinct finite rates > 0, in the given order (ties go to the first)."""
        lags = self.lag_days
        if not isinstance(lags, (list, tuple)) or any(
                isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in lags) \
                or len(set(lags)) != len(lags):
            raise ValueError(f"lag_days must be distinct whole numbers of days >= 1 (got "
                             f"{lags!r}); e.g. --lag-days 1,7, or leave it out for none")
        self.lag_days = sorted(lags)
        grid = self.finetune_lr_grid
        if not isinstance(grid, (list, tuple)) or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                or v <= 0 for v in grid) or len(set(grid)) != len(grid):
            raise ValueError(f"finetune_lr_grid must be distinct finite learning rates > 0 "
                             f"(got {grid!r}); e.g. --finetune-lr-grid 1e-4,1e-3, or leave it "
                             "out to use --finetune-lr")
        self.finetune_lr_grid = [float(v) for v in grid]

    def to_dict(self) -> dict[str, Any]:
        """The settings as one flat JSON-able dict (the STBaT settings by their own names, as
        in flags, spec files, result rows and checkpoints)."""
        out = asdict(self)
        out.update(out.pop("stbat"))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransferConfig:
        """The config of a flat dict (:meth:`to_dict`, a spec file, the flags given), or of one
        with the STBaT settings nested under ``"stbat"``; missing keys take the defaults.

        Raises:
            ValueError: an unknown key (naming the known ones), or an STBaT setting given
                both flat and nested.
        """
        data = dict(data)
        nested = data.pop("stbat", None)
        flat = {k: data.pop(k) for k in STBAT_FIELDS if k in data}
        known = [f.name for f in setting_fields()]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"Unknown config keys {unknown}; known: {sorted(known)}")
        nested = asdict(nested) if isinstance(nested, STBaTOptions) else dict(nested or {})
        both = sorted(set(nested) & set(flat))
        if both:
            raise ValueError(f"STBaT settings {both} are given twice, flat and under 'stbat'; "
                             "give each once")
        stbat = dataclasses.replace(_stbat_default(), **nested, **flat)
        return cls(**data, stbat=stbat)

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> TransferConfig:
        """The config of a dict SAVED by :meth:`to_dict` (a checkpoint, ``run.json``), possibly
        by an earlier version: a key it lacks takes the value it had then (the field's
        ``saved_absent``, e.g. no lag inputs), not today's default; the rest as
        :meth:`from_dict`."""
        data = dict(data)
        for f in fields(cls):
            absent = f.metadata.get("saved_absent", _NOTHING)
            if absent is not _NOTHING and f.name not in data:
                data[f.name] = copy.deepcopy(absent)
        return cls.from_dict(data)

    if not TYPE_CHECKING:  # the flat names of earlier versions, read and set with a warning
        def __getattr__(self, name: str) -> Any:
            if name in STBAT_FIELDS and "stbat" in self.__dict__:
                _warn_flat(name)
                return getattr(self.stbat, name)
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

        def __setattr__(self, name: str, value: Any) -> None:
            if name in STBAT_FIELDS:
                _warn_flat(name)
                name, value = "stbat", dataclasses.replace(self.stbat, **{name: value})
            object.__setattr__(self, name, value)

    def model_signature(self) -> dict[str, Any]:
        """Settings a checkpoint must agree on to be loaded for adaptation."""
        return {"backbone": self.backbone, "backbone_kwargs": self.backbone_kwargs,
                "window": self.window, "horizon": self.horizon, "scaler": self.scaler,
                "normalize": self.normalize, "time_features": self.time_features,
                "linear_skip": self.linear_skip, "lag_days": list(self.lag_days)}

    @property
    def input_channels(self) -> int:
        """Channels of the network input: the series, one per seasonal lag, plus 4 calendar
        covariates if enabled (in that order)."""
        return 1 + len(self.lag_days) + (4 if self.time_features else 0)


#: settings that change only the adaptation to the target (a pre-training is shared by them)
ADAPTATION_ONLY = tuple(f.name for f in fields(TransferConfig) if f.metadata.get("adapt_only"))


def _stbat_default() -> STBaTOptions:
    factory: Any = next(f for f in fields(TransferConfig) if f.name == "stbat").default_factory
    return factory()


def setting_fields() -> list[dataclasses.Field]:
    """Every setting by its flat name: the fields of :class:`TransferConfig`, with ``stbat``
    replaced by the fields of :class:`~stbat_plugin.options.STBaTOptions` (what the flags,
    spec files and result rows name)."""
    out: list[dataclasses.Field] = []
    for f in fields(TransferConfig):
        out += list(fields(STBaTOptions)) if f.name == "stbat" else [f]
    return out


def _warn_flat(name: str) -> None:
    warnings.warn(f"TransferConfig.{name} is deprecated: use TransferConfig.stbat.{name}, "
                  f"TransferConfig(stbat=STBaTOptions({name}=...)) or TransferConfig.from_dict",
                  DeprecationWarning, stacklevel=3)


def _accept_flat_stbat(init: Callable[..., None]) -> Callable[..., None]:
    """``TransferConfig(simdcl_weight=...)`` of earlier versions: the STBaT settings given
    flat are put into ``stbat``, with a ``DeprecationWarning``."""
    @functools.wraps(init)
    def __init__(self: TransferConfig, *args: Any, **kwargs: Any) -> None:
        flat = {k: kwargs.pop(k) for k in STBAT_FIELDS if k in kwargs}
        if flat:
            warnings.warn(f"TransferConfig({', '.join(f'{k}=...' for k in flat)}) is "
                          "deprecated: give TransferConfig(stbat=STBaTOptions(...)) or use "
                          "TransferConfig.from_dict", DeprecationWarning, stacklevel=2)
            kwargs["stbat"] = dataclasses.replace(kwargs.get("stbat") or _stbat_default(),
                                                  **flat)
        init(self, *args, **kwargs)

    return __init__


setattr(TransferConfig, "__init__", _accept_flat_stbat(TransferConfig.__init__))  # noqa: B010
