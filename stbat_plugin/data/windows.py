"""Sliding input/target windows over one city's (scaled) flow, as a torch ``Dataset``.

Sample ``i`` has its first target step at ``t = t_index``: inputs ``x = flow[t - window : t]``
and targets ``y = flow[t : t + horizon]``, with every target step in ``[start, stop)``. With
``context="inside"`` the inputs must lie in ``[start, stop)`` too (training on a slice sees
only that slice: 72 steps, window 6, horizon 1 -> 66 samples); with ``context="history"`` the
inputs may come from before ``start`` (validation/test: every step of the range is a target
once enough history exists). Samples are views into one shared tensor (nothing is copied at
construction), so a dataset over a long series stays light.

Seasonal lag inputs (``lags``, in steps): for a lag ``L`` the sample also holds
``flow[t - window + 1 - L : t + 1 - L]``, so input step ``j`` of the lag channel holds the
value ``L`` steps before input step ``j + 1`` and its last step the value ``L`` steps before
the first target (the seasonal-naive forecast). A window then needs ``window + L - 1`` steps
of history before ``t`` (inside the range with ``context="inside"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

CONTEXTS = ("inside", "history")


class WindowError(ValueError):
    """Bad window dataset arguments (shapes, ranges, window sizes)."""


def history_steps(window: int, lags: Sequence[int] = ()) -> int:
    """Steps of history a sample needs before its first target: ``window + max(lags) - 1``
    (``window`` without lags)."""
    return window + max(0, max(lags, default=1) - 1)


def _first_target(start: int, history: int, context: str) -> int:
    if context not in CONTEXTS:
        raise WindowError(f"context must be one of {list(CONTEXTS)}, got {context!r}.")
    return start + history if context == "inside" else max(start, history)


def _check_lags(lags: Sequence[int]) -> tuple[int, ...]:
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in lags):
        raise WindowError(f"lags must be whole numbers of steps >= 1, got {list(lags)}.")
    return tuple(int(v) for v in lags)


def window_count(
    num_steps: int, start: int, stop: int, window: int = 6, horizon: int = 1,
    context: str = "inside", lags: Sequence[int] = (),
) -> int:
    """Number of samples of a :class:`WindowDataset` with these arguments (0 if none fit)."""
    if window < 1 or horizon < 1:
        raise WindowError(f"window and horizon must be >= 1, got {window}, {horizon}.")
    if not 0 <= start <= stop <= num_steps:
        raise WindowError(f"need 0 <= start <= stop <= T = {num_steps}, got start={start}, "
                          f"stop={stop}.")
    first = _first_target(start, history_steps(window, _check_lags(lags)), context)
    return max(0, stop - horizon + 1 - first)


class WindowDataset(Dataset):
    """Windows ``{"x", "y", "mask", "t_index"}`` with targets in ``[start, stop)``.

    Args:
        flow: scaled flow, float32 [T, N, C] (unobserved cells hold 0 as stored).
        observed: [T, N] bool, True where the reading is real.
        region_mask: [N] bool, False for regions excluded from the loss/metrics.
        start, stop: target range on the time axis.
        window: input length; horizon: target length.
        context: ``"inside"`` (inputs within the range) or ``"history"`` (inputs may precede).
        covariates: optional ``[T, k]`` per-step covariates (e.g. time of day), returned
            for the input steps as ``"cov"``.
        lags: seasonal lags in steps (e.g. ``(24, 168)`` for one day and one week of hourly
            data), returned as ``"lags"`` (see the module docstring; default: none).

    Shapes:
        x: [window, N, C] float32; y: [horizon, N, C] float32;
        mask: [horizon, N, C] bool = observed at the target & region_mask; t_index: int
        (absolute index of the first target step); cov: [window, k] float32;
        lags: [window, N, C, len(lags)] float32, ``lags[j, ..., i] = flow[t - window + j + 1
        - lags[i]]``.
    """

    def __init__(
        self, flow: np.ndarray | torch.Tensor, observed: np.ndarray | torch.Tensor,
        region_mask: np.ndarray | torch.Tensor, start: int, stop: int, window: int = 6,
        horizon: int = 1, context: str = "inside",
        covariates: np.ndarray | torch.Tensor | None = None, lags: Sequence[int] = (),
    ) -> None:
        self.flow = torch.as_tensor(flow, dtype=torch.float32)
        self.observed = torch.as_tensor(observed, dtype=torch.bool)
        self.region_mask = torch.as_tensor(region_mask, dtype=torch.bool)
        _check_shapes(self.flow, self.observed, self.region_mask)
        self.covariates = None if covariates is None else torch.as_tensor(covariates,
                                                                          dtype=torch.float32)
        if self.covariates is not None and (self.covariates.ndim != 2
                                            or self.covariates.shape[0] != self.flow.shape[0]):
            raise WindowError(f"covariates must be [T, k] with T = {self.flow.shape[0]}, got "
                              f"{tuple(self.covariates.shape)}.")
        self.lags = _check_lags(lags)
        count = window_count(self.flow.shape[0], start, stop, window, horizon, context, self.lags)
        self.window, self.horizon, self.context = window, horizon, context
        self.start, self.stop = start, stop
        first = _first_target(start, history_steps(window, self.lags), context)
        self.t_indices = first + torch.arange(count)

    def __len__(self) -> int:
        return int(self.t_indices.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} windows.")
        t = int(self.t_indices[i])
        y_obs = self.observed[t : t + self.horizon] & self.region_mask
        sample: dict[str, torch.Tensor | int] = {
            "x": self.flow[t - self.window : t],
            "y": self.flow[t : t + self.horizon],
            "mask": y_obs.unsqueeze(-1).expand(-1, -1, self.flow.shape[2]).contiguous(),
            "t_index": t,
        }
        if self.covariates is not None:
            sample["cov"] = self.covariates[t - self.window : t]
        if self.lags:
            sample["lags"] = torch.stack(
                [self.flow[t - self.window + 1 - lag : t + 1 - lag] for lag in self.lags], dim=-1)
        return sample


def _check_shapes(flow: torch.Tensor, observed: torch.Tensor, region_mask: torch.Tensor) -> None:
    if flow.ndim != 3:
        raise WindowError(f"flow must be [T, N, C], got shape {tuple(flow.shape)}.")
    if tuple(observed.shape) != tuple(flow.shape[:2]):
        raise WindowError(f"observed must be [T, N] = {tuple(flow.shape[:2])}, got "
                          f"{tuple(observed.shape)}.")
    if tuple(region_mask.shape) != (flow.shape[1],):
        raise WindowError(f"region_mask must be [N] = ({flow.shape[1]},), got "
                          f"{tuple(region_mask.shape)}.")
