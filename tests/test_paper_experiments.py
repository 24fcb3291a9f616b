"""``stbat ablation | sensitivity | scarcity | efficiency`` on the tiny data, tiny budgets.

Each test checks that the markdown table and the PNG are written, that the numbers in
the table are finite, and what the command's own logic adds to the harness (variant
names, paired deltas, best value on validation, the days check, separate processes).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from _cli_helpers import run_cli

import stbat_plugin
from stbat_plugin.pipeline import api, paper
from stbat_plugin.pipeline.config import TransferConfig
from stbat_plugin.pipeline.experiment import load_spec, read_results
from stbat_plugin.pipeline.plots import MAX_PNG_BYTES

TINY = Path(__file__).parents[1] / "data" / "tiny"
REPO = Path(__file__).parents[1]
EXAMPLES = REPO / "examples" / "experiments"
TINY_OPTIONS = {"backbone_kwargs": {"channels": 8, "hidden": 16}, "val_days": 3, "test_days": 4,
                "max_epochs": 1, "finetune_epochs": 1, "max_batches_per_epoch": 2,
                "batch_size": 8, "source_span": "2019-03-25:2019-03-31"}
TINY_FLAGS = ["--backbone-kwargs", '{"channels": 8, "hidden": 16}', "--val-days", "3",
              "--test-days", "4", "--max-epochs", "1", "--finetune-epochs", "1",
              "--max-batches-per-epoch", "2", "--batch-size", "8",
              "--source-span", "2019-03-25:2019-03-31"]
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+\.\d+(?:e[-+]?\d+)?")


def table_numbers(markdown: str) -> list[float]:
    """Every decimal number in the markdown's table lines."""
    return [float(m) for line in markdown.splitlines() if line.startswith("|")
            for m in NUMBER.findall(line)]


def assert_written(result: paper.PaperResult, kind: str) -> str:
    text = (result.out / f"{kind}.md").read_text()
    assert text == result.markdown
    assert f"![{kind}]({kind}.png)" in text
    assert f"stbat-plugin {stbat_plugin.__version__}; git commit" in text
    if (REPO / ".git").exists():
        assert re.search(r"git commit [0-9a-f]{40}\.", text), text[:400]
    png = result.png_path
    assert png == result.out / f"{kind}.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < MAX_PNG_BYTES
    numbers = table_numbers(text)
    assert numbers and all(math.isfinite(v) for v in numbers)
    return text


def table_row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r} in:\n{text}")


# --------------------------------------------------------------------------- ablation (CLI)
@pytest.fixture(scope="module")
def ablation_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation") / "out"
    args = ["ablation", "--out", out, "--data-dir", TINY, "--seeds", "1", "--quiet", *TINY_FLAGS]
    code, stdout, err = run_cli(args)
    assert code == 0, err
    return out, args, stdout


def test_ablation_writes_every_variant_with_paired_deltas(ablation_run):
    out, args, stdout = ablation_run
    text = (out / "ablation.md").read_text()
    assert "wrote" in stdout and str(out / "ablation.md") in stdout
    assert text.count("Command: `stbat ablation --out ") == 1 and "--seeds 1" in text
    assert "--max-batches-per-epoch 2" in text
    rows = [r for r in read_results(out / "results.jsonl") if r["channel"] == "mean"]
    labels = ["stbat", "stbat (w/o POI)", "stbat (w/o FDP)", "stbat (w/o SimDCL)",
              "stbat (w/o WLoss)", "finetune"]
    assert {r["method"] for r in rows} == set(labels)
    assert len(rows) == len(labels) * 2  # few-shot and zero-shot
    for label in labels:  # each variant really ran with its switch off
        row = next(r for r in rows if r["method"] == label)
        config = TransferConfig.from_dict(row["config"])
        assert api.method_label(label.split(" ")[0], config) == label
    full = {r["seed"]: r["rmse"] for r in rows if r["method"] == "stbat" and r["train_days"] == 3}
    wo = {r["seed"]: r["rmse"] for r in rows
          if r["method"] == "stbat (w/o SimDCL)" and r["train_days"] == 3}
    cells = table_row(text, "stbat (w/o SimDCL)")
    assert cells[1] == "1" and cells[3].startswith(f"{wo[0] - full[0]:+.3f}")
    assert cells[4] == f"{int(wo[0] < full[0])}/1"
    result = paper.PaperResult(out, out / "ablation.md", out / "ablation.png", rows, text)
    assert_written(result, "ablation")


def test_ablation_rerun_resumes_and_other_options_are_refused(ablation_run, monkeypatch):
    out, args, _ = ablation_run
    before = (out / "results.jsonl").read_bytes()
    monkeypatch.setattr(api, "run_method", lambda *a, **k: pytest.fail("nothing left to run"))
    code, stdout, err = run_cli(args)
    assert code == 0, err
    assert (out / "results.jsonl").read_bytes() == before
    code, _, err = run_cli([*args[:-1], "2019-03-24:2019-03-31"])  # another source span
    assert code == 2 and "holds another experiment" in err


def test_ablation_refuses_its_own_switches_as_flags(tmp_path):
    code, _, err = run_cli(["ablation", "--out", tmp_path / "o", "--data-dir", TINY, "--no-poi"])
    assert code == 2 and "use_poi" in err and not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- sensitivity
def test_sensitivity_curves_and_best_value_on_validation(tmp_path):
    sweeps = {"embed_dim": [8, 32], "tau": [1.0, 3.0]}
    result = paper.sensitivity(tmp_path / "out", data_dir=TINY, seeds=1, sweeps=sweeps,
                               overrides=TINY_OPTIONS)
    text = assert_written(result, "sensitivity")
    rows = [r for r in result.rows if r["channel"] == "mean"]
    assert sorted({r["task"] for r in rows}) == ["D-8", "base", "tau-3"]  # 32 and 1 are the base
    assert {r["config"]["embed_dim"] for r in rows if r["task"] == "D-8"} == {8}
    assert {r["config"]["tau"] for r in rows if r["task"] == "tau-3"} == {3.0}
    val = {r["task"]: r["info"]["val_rmse"] for r in rows if r["method"] == "stbat"}
    best_d = "8" if val["D-8"] < val["base"] else "32"
    assert "best on validation" in table_row_by_value(text, "D", best_d)[-1]
    assert "default" in table_row_by_value(text, "D", "32")[-1]
    assert "Fine-tuning (reference, same budget)" in text


def table_row_by_value(text: str, symbol: str, value: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:2] == [symbol, value]:
            return cells
    raise AssertionError(f"no row {symbol}={value}")


def test_sweep_flags_are_checked():
    with pytest.raises(ValueError, match="not hyper-parameters"):
        paper.sensitivity("unused", data_dir=TINY, sweeps={"lr": [0.1]})
    code, _, err = run_cli(["sensitivity", "--out", "x", "--sweep", "embed_dim=a"])
    assert code == 2 and "FIELD=V1,V2" in err


# --------------------------------------------------------------------------- scarcity
def test_scarcity_table_has_every_method_and_day(tmp_path):
    methods = ["stbat", "finetune", "target-only", "persistence"]
    result = paper.scarcity(tmp_path / "out", data_dir=TINY, seeds=1, tasks=["nyc2mel"],
                            days=[0, 2, 3], methods=methods, overrides=TINY_OPTIONS)
    text = assert_written(result, "scarcity")
    for m in methods:
        cells = table_row(text, m)
        assert len(cells) == 4
        assert (cells[1] == "-") == (m == "target-only")  # no zero-shot version
    rmse = {(r["method"], r["train_days"]): r["rmse"] for r in result.rows if r["channel"] == "mean"}
    assert table_row(text, "stbat")[2].startswith(f"{rmse[('stbat', 2)]:.3f}")


def test_scarcity_refuses_days_before_running(tmp_path):
    with pytest.raises(ValueError, match=r"\[1\] training day\(s\) give no window of 24\+1"):
        paper.scarcity(tmp_path / "a", data_dir=TINY, tasks=["nyc2mel"], days=[0, 1, 3],
                       overrides=TINY_OPTIONS)
    with pytest.raises(ValueError, match="days are needed"):
        paper.scarcity(tmp_path / "b", data_dir=TINY, tasks=["nyc2mel"], days=[3, 30],
                       overrides=TINY_OPTIONS)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_scarcity_counts_the_lag_inputs_history_before_running(tmp_path):
    """A 6-step window fits in 1 day, but not with the default 1-day lag input (30 steps)."""
    with pytest.raises(ValueError, match=r"\[1\] training day\(s\) give no window of 6\+1 "
                       r"steps and \[1\]-day lag input.*fewer --lag-days"):
        paper.scarcity(tmp_path / "a", data_dir=TINY, tasks=["nyc2mel"], days=[0, 1, 3],
                       overrides={**TINY_OPTIONS, "window": 6})
    assert not (tmp_path / "a").exists()


# --------------------------------------------------------------------------- efficiency
def test_efficiency_measures_each_method_in_its_own_process(tmp_path):
    out = tmp_path / "out"
    options = {**TINY_OPTIONS, "patience": 1}
    result = paper.efficiency(out, data_dir=TINY, seeds=1, methods=["stbat"], overrides=options)
    text = assert_written(result, "efficiency")
    measures = [json.loads(line) for line in (out / "efficiency.jsonl").read_text().splitlines()]
    assert [(m["method"], m["seed"]) for m in measures] == [("(data only)", 0), ("stbat", 0)]
    floor, stbat = measures
    for m in measures:  # each child's own peak (a fresh interpreter), not the parent's
        assert 50 < m["peak_mb"] < 4000 and m["peak_from"] in ("VmHWM", "ru_maxrss")
    assert stbat["pretrain_seconds"] > 0 and stbat["rows"][0]["method"] == "stbat"
    assert stbat["rows"][0]["config"]["max_epochs"] == 1
    assert f"| stbat | 1 | {stbat['peak_mb']:.0f} ± 0 | 1.00 | " \
           f"{stbat['peak_mb'] - floor['peak_mb']:.0f} |" in text
    assert (out / "runs" / "stbat-seed0" / "results.jsonl").is_file()
    again = paper.efficiency(out, data_dir=TINY, seeds=1, methods=["stbat"], overrides=options)
    assert again.markdown == text  # a rerun measures nothing again
    with pytest.raises(ValueError, match="--patience >= 3"):
        paper.efficiency(tmp_path / "o2", data_dir=TINY, overrides={**options, "max_epochs": 3})


# --------------------------------------------------------------------------- specs
@pytest.mark.parametrize("kind", ["ablation", "sensitivity", "scarcity"])
def test_the_example_specs_are_what_the_commands_generate(kind):
    """examples/experiments/paper_KIND.toml: the spec of the documented run, kept in sync."""
    path = EXAMPLES / f"paper_{kind}.toml"
    result = getattr(paper, kind)(EXAMPLES, data_dir=REPO / "data", dry_run=True)
    assert path.read_text() == result.markdown, (
        f"regenerate {path} with paper.{kind}({str(EXAMPLES)!r}, data_dir='data', "
        "dry_run=True).markdown")
    spec = load_spec(path)
    assert spec.data_dir == (REPO / "data").resolve()


def test_spec_text_round_trips_through_the_harness(tmp_path):
    text = paper.spec_text("t", "../data", ["stbat"], [3, 0], 2,
                           {"backbone_kwargs": {"channels": 8, "a.b c": "x\"y"}, "beta": 1e-3,
                            "source_span": None},
                           [{"name": "a.b", "sources": ["x"], "target": "y",
                             "config": {"use_poi": False, "tau": 10.0}}])
    (tmp_path / "spec.toml").write_text(text)
    spec = load_spec(tmp_path / "spec.toml")
    config = spec.config(spec.tasks[0], spec.variants()[0])
    assert config.stbat.beta == 1e-3 and config.stbat.tau == 10.0 and config.stbat.use_poi is False
    assert config.backbone_kwargs == {"channels": 8, "a.b c": 'x"y'} and config.source_span is None
    assert spec.seeds == [0, 1] and spec.tasks[0].train_days == (3, 0)


def test_default_data_dir_is_the_bundled_data_folder():
    # the pipeline moved one folder down (stbat_plugin/pipeline): the default must still be
    # the checkout's data/, not the stbat_plugin.data package
    root = Path(__file__).resolve().parents[1]
    assert paper.default_data_dir() == root / "data"
    assert (paper.default_data_dir() / "nyc_taxi.npz").is_file()


def test_stat_names_mean_std_and_count():
    stat = paper._stat([1.0, 2.0, 4.0])
    assert (stat.mean, stat.n) == (pytest.approx(7 / 3), 3)
    assert stat.std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert paper._stat([5.0]) == (5.0, 0.0, 1)
    empty = paper._stat([])
    assert empty.n == 0 and math.isnan(empty.mean)
