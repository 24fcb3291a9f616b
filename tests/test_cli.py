"""The ``stbat`` command line end to end, in-process, on the tiny data and small synthetic cities.

One module-scoped ``stbat transfer`` run (every method, two seeds, few-shot and zero-shot)
is shared by the result-file tests; bad inputs are written next to copies of good files.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from _cli_helpers import run_cli
from _data_synth import TINY, city_arrays, hourly_stamps

from stbat_plugin.pipeline import classical
from stbat_plugin.pipeline.method_registry import METHODS

SMALL_NET = '{"channels": 8, "hidden": 16}'
TINY_RUN = ["--val-days", "3", "--test-days", "4", "--max-epochs", "1", "--finetune-epochs", "1",
            "--max-batches-per-epoch", "2", "--batch-size", "8", "--quiet"]
SHORT_SOURCES = ["--source-span", "2019-03-25:2019-03-31"]  # last week of the NYC files
ROW_KEYS = {"method", "sources", "target", "train_days", "channel", "seed", "rmse", "mae",
            "backbone", "descriptors", "config", "scaler_fit_on"}
ZERO_SHOT_METHODS = {"stbat", "finetune", "maml", "linear", "persistence", "seasonal"}
ALL_METHODS = ["stbat", "finetune", "target-only", "ha", "arima", "maml", "linear", "persistence", "seasonal"]


def synth_city(directory: Path, name: str = "synth_town", num_regions: int = 5,
               days: int = 21, seed: int = 0, **extra) -> Path:
    """A small hourly city with a daily rhythm, POI and coordinates (written as ``name.npz``)."""
    rng = np.random.default_rng(seed)
    t = np.arange(days * 24)
    level = rng.uniform(20, 80, num_regions)
    rhythm = 1.0 + 0.8 * np.sin(2 * np.pi * (t[:, None] - 8) / 24)
    flow = rng.poisson(level[None, :] * rhythm)[..., None].astype(np.float32)
    arrays = city_arrays(
        flow=flow, timestamps=hourly_stamps(len(t), "2021-05-03T00:00"),
        poi=rng.integers(1, 20, (num_regions, 14)).astype(np.float32),
        poi_categories=np.array([f"cat{k}" for k in range(14)]),
        coords=np.column_stack([40.7 + 0.01 * np.arange(num_regions),
                                -74.0 + 0.01 * np.arange(num_regions)]),
        channels=np.array(["trips"]),
    )
    arrays.update(extra)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / f"{name}.npz", **arrays)
    return directory / f"{name}.npz"


def data_dir_with(tmp: Path, *names: str) -> Path:
    """A data folder holding copies of the named tiny files."""
    tmp.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(TINY / f"{name}.npz", tmp / f"{name}.npz")
    return tmp


# --------------------------------------------------------------------------- the full run
@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """``stbat transfer`` NYC bike+taxi -> Melbourne, all six methods, 3 and 0 days, 2 seeds."""
    out = tmp_path_factory.mktemp("transfer") / "out"
    with pytest.MonkeyPatch.context() as mp:
        # ARIMA fits ~1 s per series: fit two here (the rest use persistence); the
        # synthetic-city test below runs it on every series.
        mp.setattr(classical, "arima_forecast",
                   functools.partial(classical.arima_forecast, max_series=2))
        code, stdout, stderr = run_cli(
            ["transfer", "--data-dir", TINY, "--source", "nyc_bike,nyc_taxi",
             "--target", "melbourne_pedestrian", "--train-days", "3,0",
             "--methods", ",".join(ALL_METHODS), "--seeds", "2", "--out", out,
             "--backbone-kwargs", SMALL_NET, *SHORT_SOURCES, *TINY_RUN])
    assert code == 0, stderr
    rows = json.loads((out / "results.json").read_text())
    return {"out": out, "stdout": stdout, "rows": rows, "md": (out / "results.md").read_text()}


def test_transfer_writes_one_row_per_method_seed_days_and_channel(full_run):
    rows = full_run["rows"]
    assert isinstance(rows, list) and rows
    for row in rows:
        assert ROW_KEYS <= set(row), sorted(ROW_KEYS - set(row))
        assert math.isfinite(row["rmse"]) and math.isfinite(row["mae"]), row
        assert 0 < row["mae"] <= row["rmse"], row  # MAE <= RMSE always; counts are never exact
        assert row["sources"] == "nyc_bike,nyc_taxi" and row["target"] == "melbourne_pedestrian"
        assert row["backbone"] == "graph_stnet" and row["descriptors"] == "poi"
        assert row["scaler_fit_on"] == ("val" if row["train_days"] == 0 else "train")
        assert row["config"]["val_days"] == 3 and row["config"]["backbone_kwargs"]["hidden"] == 16
    got = {(r["method"], r["train_days"], r["channel"], r["seed"]) for r in rows}
    expected = {(m, d, ch, s) for m in ALL_METHODS for d in (3, 0) for ch in ("pedestrians", "mean")
                for s in (0, 1) if d == 3 or m in ZERO_SHOT_METHODS}
    assert got == expected
    assert len(rows) == len(expected)  # no duplicate rows


def test_one_channel_mean_equals_the_channel(full_run):
    by_key = {(r["method"], r["train_days"], r["seed"], r["channel"]): r for r in full_run["rows"]}
    for (m, d, s, ch), row in by_key.items():
        if ch == "mean":
            assert row["rmse"] == pytest.approx(by_key[(m, d, s, "pedestrians")]["rmse"])


def test_seeds_change_deep_methods_but_not_classical_ones(full_run):
    mean = {(r["method"], r["train_days"], r["seed"]): r["rmse"] for r in full_run["rows"]
            if r["channel"] == "mean"}
    for method in ("ha", "arima"):
        assert mean[(method, 3, 0)] == mean[(method, 3, 1)]  # deterministic baselines
    for method in ("stbat", "target-only"):
        assert mean[(method, 3, 0)] != mean[(method, 3, 1)]  # another seed, another network


def _md_table(md: str) -> list[list[str]]:
    """Cells of the first markdown table of ``md`` (header first, separator dropped)."""
    lines = []
    for line in md.splitlines():
        if line.startswith("|"):
            lines.append([c.strip() for c in line.strip("|").split("|")])
        elif lines:
            break
    return [lines[0], *lines[2:]]


def test_results_md_is_the_paper_style_table(full_run):
    md = full_run["md"]
    assert md.startswith("# nyc_bike,nyc_taxi -> melbourne_pedestrian")
    header, *body = _md_table(md)
    assert header == ["method", "3-day (few-shot) RMSE", "3-day (few-shot) MAE",
                      "0-day (zero-shot) RMSE", "0-day (zero-shot) MAE"]
    assert [r[0] for r in body] == [m for m in METHODS if m in ALL_METHODS]  # paper order
    rows = full_run["rows"]
    for cells in body:
        method = cells[0]
        for col, (days, metric) in enumerate([(3, "rmse"), (3, "mae"), (0, "rmse"), (0, "mae")], 1):
            values = [r[metric] for r in rows if r["method"] == method
                      and r["train_days"] == days and r["channel"] == "mean"]
            if not values:
                assert cells[col] == "-", (method, days)
                assert method not in ZERO_SHOT_METHODS
                continue
            mean, std = (float(v) for v in cells[col].split(" ± "))
            assert mean == pytest.approx(np.mean(values), abs=1e-3)
            assert std == pytest.approx(np.std(values, ddof=1), abs=1e-3)  # two seeds
    assert "### channel `pedestrians`" in md
    # the table is printed too, and where the files went
    assert "| stbat |" in full_run["stdout"] and "results.json" in full_run["stdout"]


def test_transfer_out_folder_holds_the_run_and_its_rows(full_run):
    assert sorted(p.name for p in full_run["out"].iterdir()) == [
        ".lock", "results.json", "results.jsonl", "results.md", "run.json"]
    rows = json.loads((full_run["out"] / "results.json").read_text())
    lines = (full_run["out"] / "results.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows


# --------------------------------------------------------------------------- other cities
def test_arima_and_the_whole_pipeline_on_a_small_synthetic_city(tmp_path, caplog):
    """Any city works as a target: 5 regions, 1 channel, POI and coords, 21 days; full ARIMA."""
    data = data_dir_with(tmp_path / "data", "nyc_bike")
    synth_city(data)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="stbat_plugin.pipeline.classical"):
        code, _, err = run_cli(
            ["transfer", "--data-dir", data, "--source", "nyc_bike", "--target", "synth_town",
             "--train-days", "3,0", "--methods", "stbat,arima,ha", "--out", out,
             "--backbone-kwargs", SMALL_NET, *SHORT_SOURCES, *TINY_RUN])
    assert code == 0, err
    rows = json.loads((out / "results.json").read_text())
    mean = {(r["method"], r["train_days"]): r for r in rows if r["channel"] == "mean"}
    assert set(mean) == {("stbat", 3), ("stbat", 0), ("arima", 3), ("ha", 3)}
    assert all(math.isfinite(r["rmse"]) and r["rmse"] > 0 for r in rows)
    log = caplog.text
    assert "5 series" in log and "fits failed" not in log  # ARIMA fitted every series
    # a daily-rhythm series: ARIMA and HA beat predicting the overall mean level by far
    flow = np.load(data / "synth_town.npz")["flow"]
    naive = float(np.sqrt(np.mean((flow[-4 * 24:] - flow[-4 * 24:].mean()) ** 2)))
    assert mean[("arima", 3)]["rmse"] < naive and mean[("ha", 3)]["rmse"] < naive


def test_grid_backbone_on_two_periods_of_the_grid_city(tmp_path):
    """ST-net (grid) on nyc_bike_grid2014: no POI, so descriptors fall back to temporal profiles."""
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["transfer", "--data-dir", TINY, "--backbone", "stnet",
         "--backbone-kwargs", '{"channels": 4, "hidden": 8, "num_blocks": 1}',
         "--source", "nyc_bike_grid2014", "--source-span", "2014-08-27:2014-09-05",
         "--target", "nyc_bike_grid2014", "--target-span", "2014-09-06:2014-09-30",
         "--train-days", "3,0", "--methods", "stbat,ha", "--out", out,
         *TINY_RUN[:-1], "--max-batches-per-epoch", "1", "--quiet"])
    assert code == 0, err
    rows = json.loads((out / "results.json").read_text())
    assert {(r["method"], r["train_days"]) for r in rows} == {("stbat", 3), ("stbat", 0), ("ha", 3)}
    for row in rows:
        assert row["descriptors"] == "temporal_profile" and row["backbone"] == "stnet"
        assert math.isfinite(row["rmse"]) and math.isfinite(row["mae"])
    assert {r["channel"] for r in rows} == {"pickup", "dropoff", "mean"}


def test_grid_backbone_on_a_graph_city_is_a_clear_error(tmp_path):
    code, _, err = run_cli(
        ["transfer", "--data-dir", TINY, "--backbone", "stnet", "--source", "nyc_bike",
         "--target", "melbourne_pedestrian", "--methods", "stbat", "--out", tmp_path / "out",
         *SHORT_SOURCES, *TINY_RUN])
    assert code == 2
    assert "grid" in err and "graph_stnet" in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- listings
def test_datasets_lists_the_four_tiny_cities():
    code, out, _ = run_cli(["datasets", "--data-dir", TINY])
    assert code == 0
    for name, n, t, c in [("melbourne_pedestrian", 55, 672, 1), ("nyc_bike", 69, 672, 2),
                          ("nyc_bike_grid2014", 128, 1295, 2), ("nyc_taxi", 69, 672, 2)]:
        assert f"| {name} | {n} | {t} | {c} |" in out, name
    assert len([ln for ln in out.splitlines() if ln.startswith("| ")]) == 1 + 4


def test_backbones_lists_the_builtin_backbones_with_their_distribution():
    code, out, _ = run_cli(["backbones"])
    assert code == 0
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    for name, layout in (("stnet", "grid"), ("graph_stnet", "graph")):
        assert name in lines, out
        assert layout in lines[name].split() and "stbat-plugin" in lines[name]


# --------------------------------------------------------------------------- bad inputs
def _transfer(data: Path, out: Path, *extra: str, target: str = "melbourne_pedestrian",
              source: str = "nyc_bike") -> tuple[int, str, str]:
    return run_cli(["transfer", "--data-dir", data, "--source", source, "--target", target,
                    "--methods", "stbat,ha", "--out", out, "--backbone-kwargs", SMALL_NET,
                    *SHORT_SOURCES, *TINY_RUN, *extra])


def _assert_clean_error(code: int, err: str, out: Path, *words: str) -> None:
    assert code == 2, err
    assert err.startswith("stbat transfer: error:") or "\nstbat transfer: error:" in err, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists() or not any(out.iterdir()), "a failed run left files behind"


def test_unknown_city_lists_the_available_ones(tmp_path):
    out = tmp_path / "out"
    code, _, err = _transfer(TINY, out, target="atlantis")
    _assert_clean_error(code, err, out, "atlantis", "melbourne_pedestrian", "nyc_taxi")


@pytest.mark.parametrize("case, words", [
    ("missing_key", ["timestamps", "missing"]),
    ("nan_flow", ["NaN"]),
    ("poi_wrong_n", ["poi"]),
    ("too_short", ["bad_city", "days", "--val-days"]),
])
def test_bad_target_file_is_a_clear_error(tmp_path, case, words):
    data = data_dir_with(tmp_path / "data", "nyc_bike", "melbourne_pedestrian")
    if case == "missing_key":
        synth_city(data, "bad_city", timestamps=None)
    elif case == "nan_flow":
        flow = np.load(synth_city(data, "bad_city"))["flow"]
        flow[30, 2, 0] = np.nan
        synth_city(data, "bad_city", flow=flow)
    elif case == "poi_wrong_n":
        synth_city(data, "bad_city", poi=np.ones((4, 14), np.float32))
    else:  # 5 days cannot hold 3 train + 3 val + 4 test days
        synth_city(data, "bad_city", days=5)
    out = tmp_path / "out"
    code, _, err = _transfer(data, out, "--train-days", "3", target="bad_city")
    _assert_clean_error(code, err, out, *words)
    if case == "poi_wrong_n":
        assert re.search(r"\b5\b", err) and re.search(r"\b4\b", err)  # expected vs found N


def test_bad_source_file_is_a_clear_error(tmp_path):
    data = data_dir_with(tmp_path / "data", "melbourne_pedestrian")
    flow = np.load(synth_city(data, "bad_city"))["flow"]
    flow[3, 0, 0] = np.nan
    synth_city(data, "bad_city", flow=flow)
    out = tmp_path / "out"
    code, _, err = run_cli(["transfer", "--data-dir", data, "--source", "bad_city",
                            "--target", "melbourne_pedestrian", "--out", out, *TINY_RUN])
    _assert_clean_error(code, err, out, "bad_city", "NaN")


def test_unknown_method_lists_the_known_ones(tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli(["transfer", "--data-dir", TINY, "--source", "nyc_bike",
                            "--target", "melbourne_pedestrian", "--methods", "stbat,prophet",
                            "--out", out, *TINY_RUN])
    _assert_clean_error(code, err, out, "prophet", "target-only", "arima")


def test_unknown_backbone_suggests_close_names(tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli(["transfer", "--data-dir", TINY, "--source", "nyc_bike",
                            "--target", "melbourne_pedestrian", "--backbone", "graph_stnt",
                            "--out", out, *SHORT_SOURCES, *TINY_RUN])
    _assert_clean_error(code, err, out, "graph_stnt", "did you mean", "'graph_stnet'")


@pytest.mark.parametrize("days", ["abc", "3,x", "-1"])
def test_bad_train_days_is_a_usage_error(tmp_path, days):
    out = tmp_path / "out"
    code, _, err = run_cli(["transfer", "--data-dir", TINY, "--source", "nyc_bike",
                            "--target", "melbourne_pedestrian", "--train-days", days,
                            "--out", out, *TINY_RUN])
    _assert_clean_error(code, err, out, "--train-days", days)


def test_bad_backbone_kwargs_is_a_usage_error(tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli(["transfer", "--data-dir", TINY, "--source", "nyc_bike",
                            "--target", "melbourne_pedestrian", "--backbone-kwargs", "{hidden: 4}",
                            "--out", out, *TINY_RUN])
    _assert_clean_error(code, err, out, "--backbone-kwargs", "JSON")


def test_unknown_backbone_keyword_is_a_usage_error_not_a_bug(tmp_path):
    # the backbone's TypeError is turned into a ValueError where the keywords are used
    out = tmp_path / "out"
    code, _, err = run_cli(["transfer", "--data-dir", TINY, "--source", "nyc_bike",
                            "--target", "melbourne_pedestrian", "--backbone-kwargs",
                            '{"hiden": 4}', "--out", out, *SHORT_SOURCES, *TINY_RUN])
    _assert_clean_error(code, err, out, "hiden", "--backbone-kwargs")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("bug", [TypeError("unsupported operand type(s) for +: 'int' and 'str'"),
                                 AttributeError("'NoneType' object has no attribute 'shape'"),
                                 IndexError("list index out of range"),
                                 RuntimeError("mat1 and mat2 shapes cannot be multiplied")])
def test_a_bug_deep_in_a_run_exits_1_and_is_never_shown_as_a_user_error(bug, tmp_path,
                                                                        monkeypatch):
    from stbat_plugin.pipeline import api, cli

    def fails(*args, **kwargs):
        raise bug

    monkeypatch.setattr(api, "transfer", fails)
    assert cli.user_error_message(bug) is None
    argv = ["transfer", "--data-dir", TINY, "--source", "nyc_bike", "--target",
            "melbourne_pedestrian", "--out", tmp_path / "out", *TINY_RUN]
    code, out, err = run_cli(argv)
    assert code == 1 and out == ""
    assert err.strip() == (f"stbat transfer: internal error: {type(bug).__name__}: {bug} "
                           "(rerun with --debug for the traceback; please report it)")
    code, _, err = run_cli(["--debug", *argv])
    assert code == 1 and "Traceback (most recent call last)" in err and "fails" in err


def test_a_long_internal_error_is_one_short_line_without_debug(tmp_path, monkeypatch):
    from stbat_plugin.pipeline import api

    text = "shape mismatch\n" + "\n".join(f"  tensor {i}: [{i}, 3]" for i in range(200))

    def fails(*args, **kwargs):
        raise RuntimeError(text)

    monkeypatch.setattr(api, "transfer", fails)
    argv = ["transfer", "--data-dir", TINY, "--source", "nyc_bike", "--target",
            "melbourne_pedestrian", "--out", tmp_path / "out", *TINY_RUN]
    code, _, err = run_cli(argv)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "RuntimeError: shape mismatch tensor 0: [0, 3]" in err and "..." in err
    assert len(err) < 500
    code, _, err = run_cli(["--debug", *argv])
    assert code == 1 and "tensor 199: [199, 3]" in err  # the whole message with --debug


def test_out_that_is_a_file_fails_before_running(tmp_path, monkeypatch):
    from stbat_plugin.pipeline import api

    def no_run(*a, **k):
        raise AssertionError("the run started although --out is unusable")

    monkeypatch.setattr(api, "run_method", no_run)
    monkeypatch.setattr(api, "prepare_sources", no_run)
    out = tmp_path / "results"
    out.write_text("not a folder")
    code, _, err = _transfer(TINY, out)
    assert code == 2 and "not a directory" in err
    assert out.read_text() == "not a folder"


def test_failed_run_keeps_previous_results_intact(tmp_path):
    """A failing run writes nothing: an earlier results.json stays as it was, no temp file appears."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('[{"old": true}]')
    code, _, err = _transfer(TINY, out, target="atlantis")
    assert code == 2, err
    assert (out / "results.json").read_text() == '[{"old": true}]'
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """The results are written through a temp file + os.replace: a crash mid-write leaves no trace."""
    from stbat_plugin.pipeline import io as _io
    from stbat_plugin.pipeline import results

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('[{"old": true}]')

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_io.os, "replace", disk_full)
    rows = [{"method": "ha", "sources": "a", "target": "b", "train_days": 3, "channel": "mean",
             "seed": 0, "rmse": 1.0, "mae": 0.5}]
    with pytest.raises(OSError):
        results.write_results(rows, out)
    assert (out / "results.json").read_text() == '[{"old": true}]'
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


@pytest.mark.parametrize("backbone", ["pdformer", "gwnet", "stgcn", "graph_stnet"])
def test_transfer_with_every_graph_backbone(tmp_path, backbone):
    """`stbat transfer --backbone X` works for each built-in graph backbone on bundled real data."""
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["transfer", "--data-dir", TINY, "--backbone", backbone, "--source", "nyc_taxi",
         *SHORT_SOURCES, "--target", "melbourne_pedestrian", "--train-days", "3,0",
         "--methods", "stbat,finetune", "--out", out, *TINY_RUN])
    assert code == 0, err
    rows = json.loads((out / "results.json").read_text())
    assert {(r["method"], r["train_days"]) for r in rows} == {
        ("stbat", 3), ("stbat", 0), ("finetune", 3), ("finetune", 0)}
    assert all(r["backbone"] == backbone and math.isfinite(r["rmse"]) for r in rows)
