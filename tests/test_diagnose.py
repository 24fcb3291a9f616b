"""``stbat diagnose`` on the tiny data: a grid city, a city with coordinates, and a city
with neither (nor POI), each held to naive twins of what the report shows."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from _cli_helpers import run_cli

from stbat_plugin.data import load_city, region_descriptors
from stbat_plugin.pipeline import api
from stbat_plugin.pipeline.config import TransferConfig
from stbat_plugin.pipeline.diagnose import (
    diagnose,
    diagnose_city,
    error_bins,
    quantile_bins,
    region_errors_from_results,
    riam_embedding,
)
from stbat_plugin.pipeline.plots import MAX_PNG_BYTES
from stbat_plugin.pipeline.results import write_results

TINY = Path(__file__).parents[1] / "data" / "tiny"
TINY_OPTIONS = {"backbone_kwargs": {"channels": 8, "hidden": 16}, "val_days": 3, "test_days": 4,
                "max_epochs": 1, "finetune_epochs": 1, "max_batches_per_epoch": 2,
                "batch_size": 8, "source_span": "2019-03-25:2019-03-31"}


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < MAX_PNG_BYTES


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def naive_log_density(phi: np.ndarray, h: float) -> np.ndarray:
    """Eq. 6 with two loops: log of the mean D-dimensional Gaussian kernel over all regions."""
    n, d = phi.shape
    out = np.empty(n)
    for r in range(n):
        total = 0.0
        for i in range(n):
            sq = float(((phi[r] - phi[i]) ** 2).sum())
            total += (2 * math.pi) ** (-d / 2) * math.exp(-sq / (2 * h * h))
        out[r] = math.log(total / (n * h**d))
    return out


# --------------------------------------------------------------------------- grid
def test_grid_city_density_weights_and_pairs_match_naive_twins(tmp_path):
    result = diagnose(TINY, "nyc_bike_grid2014", tmp_path / "out", seed=3, top_pairs=5)
    diag = result.diagnosis
    text = (tmp_path / "out" / "diagnose.md").read_text()
    assert text == result.markdown and "a heatmap on the 16 x 8 grid" in text
    assert "temporal profile" in text  # the grid city has no POI
    assert_png(tmp_path / "out" / "diagnose.png")
    city = load_city(TINY, "nyc_bike_grid2014")
    flow = city.flow.sum(axis=(0, 2))
    assert np.array_equal(diag.valid, flow > 0) and 2 <= diag.valid.sum() < 128
    (desc,), kind = region_descriptors([city], [slice(0, city.num_steps)])
    phi = riam_embedding(desc.values[diag.valid], embed_dim=32, seed=3).double().numpy()
    ld = naive_log_density(phi, 0.85)
    np.testing.assert_allclose(diag.log_density[diag.valid], ld, rtol=1e-6)
    inv = np.exp(-(ld - ld.min()))
    np.testing.assert_allclose(diag.weights[diag.valid], diag.valid.sum() * inv / inv.sum(),
                               rtol=1e-6)
    assert np.isnan(diag.weights[~diag.valid]).all()
    unit = phi / np.linalg.norm(phi, axis=1, keepdims=True)
    idx = np.flatnonzero(diag.valid)
    naive = sorted(((float(unit[a] @ unit[b]), idx[a], idx[b]) for a in range(len(idx))
                    for b in range(a + 1, len(idx))), key=lambda t: -t[0])[:5]
    got = diag.top_pairs(5)
    np.testing.assert_allclose([s for _, _, s in got], [s for s, _, _ in naive], atol=1e-9)
    rows = read_csv(tmp_path / "out" / "diagnose_regions.csv")
    assert len(rows) == 128 and rows[5]["id"] == str(city.region_ids[5])
    valid_rows = [r for r in rows if r["has_flow"] == "True"]
    assert all(math.isfinite(float(r[k])) for r in valid_rows for k in ("log_density", "weight"))
    assert float(valid_rows[0]["volume"]) == pytest.approx(
        flow[int(valid_rows[0]["region"])] / city.num_steps, rel=1e-5)


# --------------------------------------------------------------------------- coordinates
@pytest.fixture(scope="module")
def mel_runs(tmp_path_factory):
    """A tiny transfer run and a checkpoint, both predicting Melbourne."""
    base = tmp_path_factory.mktemp("mel")
    cfg = TransferConfig(**TINY_OPTIONS)
    rows = api.transfer(TINY, ["nyc_bike", "nyc_taxi"], "melbourne_pedestrian", train_days=[3],
                        methods=["stbat", "finetune", "persistence"], seeds=1, config=cfg,
                        progress=False)
    write_results(rows, base / "transfer")
    api.pretrain(TINY, ["nyc_bike", "nyc_taxi"], method="finetune", config=cfg,
                 save=base / "model.ckpt", progress=False)
    return base, rows


def test_coordinates_city_with_results_and_checkpoint(mel_runs, tmp_path):
    base, rows = mel_runs
    out = tmp_path / "out"
    code, stdout, err = run_cli(["diagnose", "--data-dir", TINY, "--city", "melbourne_pedestrian",
                                 "--results", base / "transfer", "--checkpoint",
                                 base / "model.ckpt", "--val-days", "3", "--test-days", "4",
                                 "--out", out, "--quiet"])
    assert code == 0, err
    text = (out / "diagnose.md").read_text()
    assert "scatter on the regions' coordinates" in text and "POI category distribution" in text
    assert "Command: `stbat diagnose --data-dir" in text and "--val-days 3" in text
    for png in ("diagnose.png", "diagnose_errors.png"):
        assert_png(out / png)
        assert f"]({png})" in text
    for label in ("stbat, 3-day", "finetune, 3-day", "persistence, 3-day",
                  "checkpoint (finetune), 0-day"):
        assert f"| {label} | density |" in text and f"| {label} | volume |" in text
    # the binned errors of one method, recomputed by hand from the rows and the CSV
    regions = read_csv(out / "diagnose_regions.csv")
    density = np.array([float(r["log_density"]) for r in regions])
    stbat = next(r for r in rows if r["method"] == "stbat" and r["channel"] == "mean")
    err = np.array([np.nan if v is None else v for v in stbat["regions"]["rmse"]])
    edges = np.quantile(density, [0.25, 0.5, 0.75])
    q1 = [e for d, e in zip(density, err, strict=True) if d < edges[0] and not np.isnan(e)]
    line = next(x for x in text.splitlines() if x.startswith("| stbat, 3-day | density |"))
    assert line.split("|")[3].strip() == f"{np.mean(q1):.3f} (n={len(q1)})"
    numbers = [float(x.split()[0]) for line in text.splitlines() if "| density |" in line
               for x in line.split("|")[3:-1] if x.strip() != "-"]
    assert numbers and all(math.isfinite(v) for v in numbers)


def test_quantile_bins_match_a_naive_twin():
    """21 distinct finite values: the quartile edges are the values of rank 5, 10 and 15,
    and a value equal to an edge belongs to the upper bin."""
    rng = np.random.default_rng(0)
    values = rng.permutation(np.linspace(-1, 1, 21))
    values = np.insert(values, [2, 7], np.nan)
    bins = quantile_bins(values, 4)
    ranks = {v: k for k, v in enumerate(sorted(values[np.isfinite(values)]))}
    for v, b in zip(values, bins, strict=True):
        want = -1 if np.isnan(v) else sum(ranks[v] >= e for e in (5, 10, 15))
        assert b == want


def test_results_of_another_city_are_refused(mel_runs):
    base, _ = mel_runs
    city = load_city(TINY, "nyc_bike")
    with pytest.raises(ValueError, match=r"no per-region rows of city 'nyc_bike'.*melbourne"):
        region_errors_from_results(base / "transfer", city)
    with pytest.raises(ValueError, match="no results.jsonl or results.json"):
        region_errors_from_results(base, city)
    mel = load_city(TINY, "melbourne_pedestrian")
    assert list(region_errors_from_results(base / "transfer", mel, ["stbat"])) == ["stbat, 3-day"]
    with pytest.raises(ValueError, match=r"none of the methods \['maml'\].*'finetune'"):
        region_errors_from_results(base / "transfer", mel, ["maml"])


# --------------------------------------------------------------------------- neither
def _plain_city(folder: Path, flow_scale: float = 1.0, zero_regions: int = 0) -> Path:
    """Melbourne's flow as 2 channels, without coordinates, POI or a grid."""
    with np.load(TINY / "melbourne_pedestrian.npz") as d:
        flow = d["flow"][:, :20, 0] * flow_scale
        arrays = {"flow": np.stack([flow, 2 * flow], axis=-1).astype(np.float32),
                  "timestamps": d["timestamps"], "channels": np.array(["in", "out"])}
    if zero_regions:
        arrays["flow"][:, :zero_regions] = 0
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "plain.npz", **arrays)
    return folder


def test_city_without_coordinates_grid_or_poi_gets_a_rank_plot(tmp_path):
    data = _plain_city(tmp_path / "data")
    result = diagnose(data, "plain", tmp_path / "out")
    assert "**no map**" in result.markdown and "temporal profile" in result.markdown
    assert result.diagnosis.layout == {"kind": "rank"} and result.diagnosis.kind == "temporal_profile"
    assert_png(tmp_path / "out" / "diagnose.png")
    w = result.diagnosis.weights
    assert np.isfinite(w).all() and w.mean() == pytest.approx(1.0)


def test_a_city_with_one_region_of_flow_is_a_clear_error(tmp_path):
    data = _plain_city(tmp_path / "data", zero_regions=19)
    city = load_city(data, "plain")
    with pytest.raises(ValueError, match="1 region\\(s\\) with flow; a density needs at least 2"):
        diagnose_city(city)


def test_error_bins_use_the_valid_regions_only(tmp_path):
    data = _plain_city(tmp_path / "data", zero_regions=4)
    diag = diagnose_city(load_city(data, "plain"))
    diag.errors["m"] = np.arange(20, dtype=float)
    stats = error_bins(diag)
    assert sum(s["regions"] for s in stats if s["by"] == "density") == 16
    order = np.argsort(diag.log_density[4:]) + 4
    assert next(s for s in stats if s["by"] == "density" and s["bin"] == 0)["mean"] == \
        pytest.approx(np.mean(order[:4]))
