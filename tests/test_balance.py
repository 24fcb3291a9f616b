"""Binning STBaT vs fine-tuning region errors by density and volume."""

from __future__ import annotations

import numpy as np
import pytest

from stbat_plugin.pipeline.balance import balance_bins, balance_table, plot_balance


def _rows(seed: int, density, volume, stbat, fine):
    base = {"task": "t", "variant": "default", "train_days": 3, "seed": seed, "channel": "mean"}
    info = {"region_log_density": density, "region_volume": volume}
    return [{**base, "method": "stbat", "info": info, "regions": {"rmse": stbat}},
            {**base, "method": "finetune", "info": {"region_volume": volume},
             "regions": {"rmse": fine}}]


def test_bins_follow_density_quantiles_and_pair_by_seed():
    density = [-3.0, -2.0, -1.0, 0.0, None]  # region 4 invalid: left out
    volume = [10.0, 20.0, 30.0, 40.0, 50.0]
    rows = _rows(0, density, volume, [1, 2, 3, 4, 9], [2, 2, 2, 2, 9])
    rows += _rows(1, density, volume, [3, 2, 3, 4, 9], [2, 2, 2, 2, 9])
    rows.append({**rows[0], "channel": "c1"})  # per-channel rows are ignored
    stats = balance_bins(rows, by="density", bins=2)
    assert [(s.bin, s.regions) for s in stats] == [(0, 4), (1, 4)]
    low, high = stats
    assert low.stbat == pytest.approx((1 + 2 + 3 + 2) / 4) and low.finetune == pytest.approx(2)
    assert high.stbat == pytest.approx((3 + 4 + 3 + 4) / 4)
    assert low.stbat_wins == pytest.approx(0.25)  # region 0 of seed 0 only
    assert high.diff == pytest.approx(1.5)
    table = balance_table(stats)
    assert "| t | default | 3 | density | Q1 | 4 |" in table and "+1.500" in table


def test_volume_bins_and_missing_density_are_handled():
    rows = _rows(0, None, [1.0, 2.0, 3.0, 4.0], [1, 1, 5, 5], [2, 2, 2, 2])
    assert balance_bins(rows, by="density", bins=2) == []  # no density: nothing to bin
    stats = balance_bins(rows, by="volume", bins=2)
    assert [s.stbat for s in stats] == [1.0, 5.0]
    with pytest.raises(ValueError, match="'by'"):
        balance_bins(rows, by="size")


def test_plot_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(3):
        d = rng.normal(size=20).tolist()
        rows += _rows(seed, d, rng.uniform(1, 9, 20).tolist(), rng.uniform(1, 2, 20).tolist(),
                      rng.uniform(1, 2, 20).tolist())
    stats = balance_bins(rows, "density") + balance_bins(rows, "volume")
    path = plot_balance(stats, tmp_path / "balance.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    with pytest.raises(ValueError, match="no STBaT"):
        plot_balance([], tmp_path / "empty.png")
