"""Per-channel scalers (tsl-style), fitted on the training slice only.

Both scalers compute ``(x - offset) / scale`` with per-channel statistics over the observed
cells of the data they are fitted on: min-max (``offset = min``, ``scale = max - min``, maps
the fit data to [0, 1] as in the paper) and z-score (``offset = mean``, ``scale = std``). A
scale below ``EPSILON`` (a constant channel) is replaced by 1, so the channel is only shifted.
They work on numpy arrays and torch tensors whose LAST axis is the channel axis.
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

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: ``{"name", "offset": [...], "scale": [...]}``."""
        if self.offset is None or self.scale is None:
            raise ScalerError(f"{type(self).__name__} is not fitted: nothing to save.")
        return {"name": self.name, "offset": [float(v) for v in self.offset],
                "scale": [float(v) for v in self.scale]}

    @classmethod
    def from_state_dict(cls: type[ScalerT], state: dict[str, Any]) -> ScalerT:
        """Rebuild a fitted scaler from :meth:`state_dict` output."""
        if state.get("name") != cls.name or not {"offset", "scale"} <= set(state):
            raise ScalerError(f"{cls.__name__}.from_state_dict expects a state with name="
                              f"{cls.name!r}, offset and scale; got keys {sorted(state)} "
                              f"name={state.get('name')!r}.")
        scaler = cls()
        scaler.offset = np.asarray(state["offset"], dtype=np.float64)
        scaler.scale = np.asarray(state["scale"], dtype=np.float64)
        return scaler


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


SCALERS: dict[str, type[Scaler]] = {"minmax": MinMaxScaler, "zscore": StandardScaler}


def make_scaler(name: str) -> Scaler:
    """A new, unfitted scaler: ``"minmax"`` or ``"zscore"``."""
    if name not in SCALERS:
        raise ScalerError(f"unknown scaler {name!r}; choose one of {sorted(SCALERS)}.")
    return SCALERS[name]()


def scaler_from_state_dict(state: dict[str, Any]) -> Scaler:
    """Rebuild whichever scaler ``state["name"]`` names."""
    return SCALERS[make_scaler(str(state.get("name"))).name].from_state_dict(state)
