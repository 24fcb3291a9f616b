"""Sliding windows: counts, alignment with a naive loop, masks, history context."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from stbat_plugin.data import WindowDataset, WindowError, window_count


def _data(t: int = 100, n: int = 5, c: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    flow = rng.uniform(0, 1, (t, n, c)).astype(np.float32)
    observed = rng.uniform(size=(t, n)) > 0.2
    region_mask = np.array([True, False, True, True, True][:n])
    return flow, observed, region_mask


def test_training_count_72_steps_gives_66() -> None:
    flow, observed, region_mask = _data()
    ds = WindowDataset(flow, observed, region_mask, 10, 82, window=6, horizon=1)
    assert len(ds) == 66 == window_count(100, 10, 82, 6, 1, "inside")
    assert ds[0]["t_index"] == 16 and ds[len(ds) - 1]["t_index"] == 81


@pytest.mark.parametrize("context", ["inside", "history"])
@pytest.mark.parametrize(("start", "stop", "window", "horizon"),
                         [(0, 100, 6, 1), (30, 60, 6, 3), (3, 20, 4, 2), (50, 52, 6, 1)])
def test_alignment_against_naive_loop(context: str, start: int, stop: int, window: int,
                                      horizon: int) -> None:
    flow, observed, region_mask = _data()
    ds = WindowDataset(flow, observed, region_mask, start, stop, window, horizon, context)
    expected = []
    for t in range(len(flow)):
        inputs_ok = t - window >= (start if context == "inside" else 0)
        if inputs_ok and t >= start and t + horizon <= stop:
            expected.append(t)
    assert [ds[i]["t_index"] for i in range(len(ds))] == expected
    assert len(ds) == window_count(len(flow), start, stop, window, horizon, context)
    for i, t in enumerate(expected):
        sample = ds[i]
        np.testing.assert_array_equal(sample["x"].numpy(), flow[t - window : t])
        np.testing.assert_array_equal(sample["y"].numpy(), flow[t : t + horizon])
        want = (observed[t : t + horizon] & region_mask)[..., None].repeat(2, axis=-1)
        np.testing.assert_array_equal(sample["mask"].numpy(), want)
        assert sample["x"].dtype == torch.float32 and sample["mask"].dtype == torch.bool


def test_history_context_uses_inputs_before_start() -> None:
    flow, observed, region_mask = _data()
    ds = WindowDataset(flow, observed, region_mask, 50, 60, window=6, context="history")
    assert len(ds) == 10 and ds[0]["t_index"] == 50
    np.testing.assert_array_equal(ds[0]["x"].numpy(), flow[44:50])
    inside = WindowDataset(flow, observed, region_mask, 50, 60, window=6, context="inside")
    assert len(inside) == 4


def test_empty_ranges_and_loader() -> None:
    flow, observed, region_mask = _data()
    assert len(WindowDataset(flow, observed, region_mask, 40, 40)) == 0
    assert len(WindowDataset(flow, observed, region_mask, 40, 45)) == 0
    batch = next(iter(DataLoader(WindowDataset(flow, observed, region_mask, 0, 100),
                                 batch_size=8)))
    assert batch["x"].shape == (8, 6, 5, 2) and batch["mask"].shape == (8, 1, 5, 2)
    assert batch["t_index"].tolist() == list(range(6, 14))


def test_shares_memory_and_validates() -> None:
    flow, observed, region_mask = _data()
    ds = WindowDataset(flow, observed, region_mask, 0, 100)
    assert ds.flow.data_ptr() == torch.from_numpy(flow).data_ptr()
    with pytest.raises(WindowError, match="context"):
        WindowDataset(flow, observed, region_mask, 0, 100, context="future")
    with pytest.raises(WindowError, match="observed must be"):
        WindowDataset(flow, observed[:, :3], region_mask, 0, 100)
    with pytest.raises(WindowError, match="stop <= T"):
        WindowDataset(flow, observed, region_mask, 0, 101)
    with pytest.raises(IndexError):
        ds[len(ds)]


@pytest.mark.parametrize("context", ["inside", "history"])
@pytest.mark.parametrize(("start", "stop", "window", "lags"),
                         [(0, 100, 6, (1,)), (30, 90, 4, (5, 12)), (40, 60, 3, (24,)),
                          (10, 30, 6, (30,))])
def test_lag_inputs_against_naive_loop(context: str, start: int, stop: int, window: int,
                                       lags: tuple[int, ...]) -> None:
    """Input step j of the lag-L channel of a window whose first target is T holds
    flow[T - window + j + 1 - L]; every input (lags included) of an "inside" window lies in
    [start, stop), of a "history" window at index >= 0."""
    flow, observed, region_mask = _data()
    ds = WindowDataset(flow, observed, region_mask, start, stop, window, 1, context, lags=lags)
    low = start if context == "inside" else 0
    expected = [t for t in range(start, stop)
                if t - window >= low and t - window + 1 - max(lags) >= low]
    assert [ds[i]["t_index"] for i in range(len(ds))] == expected
    assert len(ds) == window_count(len(flow), start, stop, window, 1, context, lags)
    for i, t in enumerate(expected):
        got = ds[i]["lags"].numpy()
        assert got.shape == (window, 5, 2, len(lags))
        for j in range(window):
            for k, lag in enumerate(lags):
                for n in range(5):
                    for c in range(2):
                        assert got[j, n, c, k] == flow[t - window + j + 1 - lag, n, c]
        np.testing.assert_array_equal(got[-1], np.stack([flow[t - lag] for lag in lags], -1))
        np.testing.assert_array_equal(ds[i]["x"].numpy(), flow[t - window : t])


def test_a_lag_needs_its_history_inside_a_training_slice() -> None:
    flow, observed, region_mask = _data()
    # 72 steps, window 6, lag 24: the first target needs 6 + 23 steps before it
    assert window_count(100, 10, 82, 6, 1, "inside", (24,)) == 72 - 29
    assert window_count(100, 10, 82, 6, 1, "inside", ()) == 66
    assert window_count(100, 10, 40, 6, 1, "inside", (30,)) == 0
    assert "lags" not in WindowDataset(flow, observed, region_mask, 0, 100)[0]
    with pytest.raises(WindowError, match="lags must be whole numbers of steps >= 1"):
        WindowDataset(flow, observed, region_mask, 0, 100, lags=(0,))
