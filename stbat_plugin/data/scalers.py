"""Per-channel scalers (tsl-style), fitted on the training slice only.

Both scalers compute ``(x - offset) / scale`` with per-channel statistics over the observed
cells of the data they are fitted on: min-max (``offset = min``, ``scale = max - min``, maps
the fit data to [0, 1] as in the paper) and z-score (``offset = mean``, ``scale = std``). A
scale below ``EPSILON`` (a constant channel) is replaced by 1, so the channel is only shifted.
They work on numpy arrays and torch tensors whose LAST axis is the channel axis.

``log1p`` is the one scaler that is not affine: min-max of ``log(1 + x)`` (fitted on the log
values of the fit data), inverted with ``expm1``. It needs flows ``>= 0`` and refuses others.
Code that needs an affine scaler reads :attr:`Scaler.affine`.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch

EPSILON = 1e-6
ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)
ScalerT = TypeVar("ScalerT", bound="Scaler")


class ScalerError(ValueError):
    """A scaler was misused (not fitted, wrong channel count, nothing observed, ...)."""


class Scaler:
    """Base class: per-channel affine scaling; subclasses define :meth:`_statistics`."""

    name = ""
    #: ``transform`` is ``(x - offset) / scale`` (False: a non-linear map comes first)
    affine = True
    #: the scaler is only defined for values ``>= 0`` (and refuses others)
    requires_nonnegative = False

    def __init__(self) -> None:
        self.offset: np.ndarray | None = None
        self.scale: np.ndarray | None = None

    @property
    def fitted(self) -> bool:
        return self.offset is not None

    def fit(self: ScalerT, flow: np.ndarray, mask: np.ndarray | None = None) -> ScalerT:
        """Fit per-channel statistics on ``flow`` (observed cells only when ``mask`` given).

        Shapes:
            flow: [T, N, C]; mask: [T, N] bool or None.
        """
        flow = np.asarray(flow, dtype=np.float64)
        if flow.ndim != 3:
            raise ScalerError(f"fit expects flow [T, N, C], got shape {flow.shape}.")
        if mask is not None and np.shape(mask) != flow.shape[:2]:
            raise ScalerError(f"mask must be [T, N] = {flow.shape[:2]}, got {np.shape(mask)}.")
        cells = flow.reshape(-1, flow.shape[2])
        if mask is not None:
            cells = cells[np.asarray(mask, dtype=bool).reshape(-1)]
        if cells.shape[0] == 0:
            raise ScalerError("cannot fit a scaler on zero observed cells; check the training "
                              "slice (is it empty, e.g. zero-shot?) and the observed mask.")
        offset, scale = self._statistics(cells)
        self.offset = offset
        self.scale = np.where(scale < EPSILON, 1.0, scale)
        return self

    def _statistics(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _params(self, x: ArrayT) -> tuple[Any, Any]:
        if self.offset is None or self.scale is None:
            raise ScalerError(f"{type(self).__name__} is not fitted: call fit(train_flow, "
                              f"mask) before transform/inverse_transform.")
        if x.shape[-1] != self.offset.shape[0]:
            raise ScalerError(f"last axis must be the {self.offset.shape[0]} channel(s) the "
                              f"scaler was fitted on, got shape {tuple(x.shape)}.")
        if isinstance(x, torch.Tensor):
            dtype = x.dtype if x.is_floating_point() else torch.float32
            return (torch.as_tensor(self.offset, dtype=dtype, device=x.device),
                    torch.as_tensor(self.scale, dtype=dtype, device=x.device))
        dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
        return self.offset.astype(dtype), self.scale.astype(dtype)

    def transform(self, x: ArrayT) -> ArrayT:
        """``(x - offset) / scale``. Shapes: [..., C] -> [..., C]."""
        offset, scale = self._params(x)
        return (x - offset) / scale

    def inverse_transform(self, x: ArrayT) -> ArrayT:
        """``x * scale + offset``, back to original units. Shapes: [..., C] -> [..., C]."""
        offset, scale = self._params(x)
        return x * scale + offset


class MinMaxScaler(Scaler):
    """Maps each channel's fit range ``[min, max]`` to ``[0, 1]``."""

    name = "minmax"

    def _statistics(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        low = cells.min(axis=0)
        return low, cells.max(axis=0) - low


class StandardScaler(Scaler):
    """Z-score: zero mean, unit (population) standard deviation per channel."""

    name = "zscore"

    def _statistics(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return cells.mean(axis=0), cells.std(axis=0)


class Log1pScaler(MinMaxScaler):
    r"""Min-max of :math:`\log(1 + x)`: :math:`(\log(1 + x) - o) / s`, with :math:`o, s` the
    minimum and range of the log values of the fit data; inverse :math:`e^{y s + o} - 1`.

    Not affine (:attr:`affine` is False): an error that is symmetric in scaled units is
    relative in original units. Flows must be ``>= 0``: a negative cell of the fit data
    (observed cells only when a mask is given) or of the data to transform is refused with
    the channel named.
    """

    name = "log1p"
    affine = False
    requires_nonnegative = True

    def fit(self: ScalerT, flow: np.ndarray, mask: np.ndarray | None = None) -> ScalerT:
        """Fit min-max statistics of ``log1p(flow)``. Shapes: flow [T, N, C]; mask [T, N]."""
        flow = np.asarray(flow, dtype=np.float64)
        if flow.ndim == 3 and (mask is None or np.shape(mask) == flow.shape[:2]):  # else: base error
            _refuse_negative(flow if mask is None else flow[np.asarray(mask, dtype=bool)],
                             "fit data")
        return super().fit(np.log1p(np.maximum(flow, 0.0)), mask)

    def transform(self, x: ArrayT) -> ArrayT:
        """``(log1p(x) - offset) / scale``. Shapes: [..., C] -> [..., C]."""
        self._params(x)  # fitted and channel count, before looking at the values
        _refuse_negative(x, "data to transform")
        return super().transform(_log1p(x))

    def inverse_transform(self, x: ArrayT) -> ArrayT:
        """``expm1(x * scale + offset)``, back to original units. Shapes: [..., C] -> [..., C]."""
        return _expm1(super().inverse_transform(x))


def _refuse_negative(x: np.ndarray | torch.Tensor, what: str) -> None:
    """Raise :class:`ScalerError` naming the first channel of ``x [..., C]`` with a value < 0."""
    below: Any = (x < 0).reshape(-1, x.shape[-1]).any(0)  # [C]
    negative = [bool(v) for v in below]
    if any(negative):
        channel = negative.index(True)
        raise ScalerError(f"scaler 'log1p' needs flows >= 0, but channel {channel} of the "
                          f"{what} has negative values (min {float(x[..., channel].min()):g}); "
                          "use --scaler minmax or zscore for data that can be negative.")


def _log1p(x: ArrayT) -> ArrayT:
    if isinstance(x, torch.Tensor):
        return torch.log1p(x if x.is_floating_point() else x.float())
    return np.log1p(x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32))


def _expm1(x: ArrayT) -> ArrayT:
    return torch.expm1(x) if isinstance(x, torch.Tensor) else np.expm1(x)


SCALERS: dict[str, type[Scaler]] = {"minmax": MinMaxScaler, "zscore": StandardScaler,
                                    "log1p": Log1pScaler}


def make_scaler(name: str) -> Scaler:
    """A new, unfitted scaler: ``"minmax"``, ``"zscore"`` or ``"log1p"``."""
    if name not in SCALERS:
        raise ScalerError(f"unknown scaler {name!r}; choose one of {sorted(SCALERS)}.")
    return SCALERS[name]()
