"""Masked metrics against naive loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stbat_plugin.pipeline.metrics import MetricError, mae, per_channel_metrics, rmse


def _naive(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    sq, ab, count = 0.0, 0.0, 0
    for idx in np.ndindex(pred.shape):
        if mask[idx]:
            diff = float(pred[idx]) - float(target[idx])
            sq, ab, count = sq + diff * diff, ab + abs(diff), count + 1
    return math.sqrt(sq / count), ab / count


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    pred = rng.uniform(0, 50, (7, 4, 2))
    target = rng.uniform(0, 50, (7, 4, 2))
    mask = rng.uniform(size=(7, 4, 2)) > 0.3
    return pred, target, mask


def test_against_naive_loop(data) -> None:
    pred, target, mask = data
    want_rmse, want_mae = _naive(pred, target, mask)
    assert rmse(pred, target, mask) == pytest.approx(want_rmse)
    assert mae(pred, target, mask) == pytest.approx(want_mae)
    full = np.ones_like(mask)
    assert rmse(pred, target) == pytest.approx(_naive(pred, target, full)[0])
    assert mae(torch.tensor(pred), torch.tensor(target), torch.tensor(mask)) == pytest.approx(
        want_mae)


def test_mask_without_channel_axis_broadcasts(data) -> None:
    pred, target, mask = data
    region_mask = mask[..., 0]
    full = np.repeat(region_mask[..., None], 2, axis=-1)
    assert rmse(pred, target, region_mask) == pytest.approx(_naive(pred, target, full)[0])


def test_per_channel_and_mean(data) -> None:
    pred, target, mask = data
    out = per_channel_metrics(pred, target, mask, ["pickup", "dropoff"])
    for i, name in enumerate(["pickup", "dropoff"]):
        want = _naive(pred[..., i], target[..., i], mask[..., i])
        assert out[name]["rmse"] == pytest.approx(want[0])
        assert out[name]["mae"] == pytest.approx(want[1])
    assert out["mean"]["rmse"] == pytest.approx((out["pickup"]["rmse"]
                                                 + out["dropoff"]["rmse"]) / 2)
    assert set(out["mean"]) == {"rmse", "mae"}


def test_errors(data) -> None:
    pred, target, mask = data
    with pytest.raises(MetricError, match="all False"):
        rmse(pred, target, np.zeros_like(mask))
    with pytest.raises(MetricError, match="channel 'dropoff'"):
        m = mask.copy()
        m[..., 1] = False
        per_channel_metrics(pred, target, m, ["pickup", "dropoff"])
    with pytest.raises(MetricError, match="c = 3 channels"):
        per_channel_metrics(pred, target, mask, ["a", "b", "c"])
    with pytest.raises(MetricError, match="shapes differ"):
        mae(pred, target[:3])
