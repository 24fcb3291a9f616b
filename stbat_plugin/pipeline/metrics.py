"""Masked RMSE / MAE on numpy arrays or torch tensors, and the paper's per-channel report.

Masks select the cells that count (observed targets of valid regions). A mask may have the
prediction's full shape, or the shape without the trailing channel axis (``[..., n]`` for
``[..., n, c]`` predictions, broadcast over channels), or any shape numpy broadcasts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


class MetricError(ValueError):
    """Metrics cannot be computed (shape mismatch, nothing selected by the mask)."""


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _broadcast_mask(mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Bool mask of ``shape``; a mask missing only the trailing channel axis is expanded."""
    m = _numpy(mask).astype(bool)
    if m.ndim == len(shape) - 1 and m.shape == shape[:-1]:
        m = m[..., None]
    try:
        return np.broadcast_to(m, shape)
    except ValueError as exc:
        raise MetricError(f"mask shape {m.shape} does not broadcast to {shape}.") from exc


def _errors(pred: Any, target: Any, mask: Any = None) -> np.ndarray:
    """Errors ``pred - target`` at the selected cells (1-D float64)."""
    p, t = _numpy(pred), _numpy(target)
    if p.shape != t.shape:
        raise MetricError(f"pred and target shapes differ: {p.shape} vs {t.shape}.")
    if mask is None:
        return (p - t).reshape(-1)
    m = _broadcast_mask(mask, p.shape)
    if not m.any():
        raise MetricError("the mask selects no cell (all False): no observed target to score; "
                          "check the observed flags, region mask and evaluation range.")
    return (p - t)[m]


def rmse(pred: Any, target: Any, mask: Any = None) -> float:
    """Root mean squared error over the masked cells. Shapes: pred, target [...]."""
    err = _errors(pred, target, mask)
    return float(np.sqrt(np.mean(err**2)))


def mae(pred: Any, target: Any, mask: Any = None) -> float:
    """Mean absolute error over the masked cells. Shapes: pred, target [...]."""
    err = _errors(pred, target, mask)
    return float(np.mean(np.abs(err)))


def per_channel_metrics(
    pred: Any, target: Any, mask: Any, channels: Sequence[str]
) -> dict[str, dict[str, float]]:
    """RMSE and MAE per channel plus their mean over channels (the paper's reported number).

    Inputs are in ORIGINAL units (inverse-transformed).

    Shapes:
        pred, target: [..., n, c]; mask: [..., n, c], [..., n] or broadcastable, or None.

    Returns:
        ``{channel: {"rmse", "mae"}, ..., "mean": {"rmse", "mae"}}``.
    """
    p, t = _numpy(pred), _numpy(target)
    if p.ndim < 2 or p.shape[-1] != len(channels):
        raise MetricError(f"pred must be [..., n, c] with c = {len(channels)} channels "
                          f"{list(channels)}, got shape {p.shape}.")
    if "mean" in channels:
        raise MetricError("a channel may not be named 'mean' (reserved for the average).")
    m = np.ones(p.shape, dtype=bool) if mask is None else _broadcast_mask(mask, p.shape)
    out: dict[str, dict[str, float]] = {}
    for i, name in enumerate(channels):
        if not m[..., i].any():
            raise MetricError(f"channel {name!r}: the mask selects no cell (all False).")
        out[name] = {"rmse": rmse(p[..., i], t[..., i], m[..., i]),
                     "mae": mae(p[..., i], t[..., i], m[..., i])}
    out["mean"] = {key: float(np.mean([out[c][key] for c in channels]))
                   for key in ("rmse", "mae")}
    return out


def per_region_errors(pred: Any, target: Any, mask: Any) -> dict[str, list[float | None]]:
    """RMSE, MAE and cell count of every region over all leading axes, in one channel.

    Regions with no selected cell get ``None`` (JSON has no NaN).

    Shapes:
        pred, target, mask: ``[..., n]`` -> lists of length ``n``.
    """
    p, t = _numpy(pred), _numpy(target)
    m = _broadcast_mask(mask, p.shape)
    err = np.where(m, p - t, 0.0).reshape(-1, p.shape[-1])
    count = m.reshape(-1, p.shape[-1]).sum(axis=0)
    safe = np.maximum(count, 1)
    rmse_n = np.sqrt((err**2).sum(axis=0) / safe)
    mae_n = np.abs(err).sum(axis=0) / safe
    return {"rmse": [float(v) if c else None for v, c in zip(rmse_n, count, strict=True)],
            "mae": [float(v) if c else None for v, c in zip(mae_n, count, strict=True)],
            "count": [int(c) for c in count]}
