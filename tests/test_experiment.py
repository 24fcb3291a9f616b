"""``stbat experiment SPEC --out OUT`` and ``stbat report OUT`` on the tiny data.

One module-scoped uninterrupted run (stbat, finetune, persistence; 3 seeds; 3-day and
zero-shot) is the reference of the resume tests: a real ``kill -9`` mid-run, a truncated
last line, a lost results file with the pre-training cache kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import scipy.stats
from _cli_helpers import run_cli

import stbat_plugin
from stbat_plugin.pipeline import api, experiment
from stbat_plugin.pipeline.experiment import load_spec, plan, read_results, run_experiment
from stbat_plugin.pipeline.report import paired_comparisons, report

TINY = Path(__file__).parents[1] / "data" / "tiny"
REPO = Path(__file__).parents[1]

TINY_DEFAULTS = """\
[defaults]
backbone_kwargs = { channels = 8, hidden = 16 }
val_days = 3
test_days = 4
max_epochs = 1
finetune_epochs = 1
max_batches_per_epoch = 2
batch_size = 8
source_span = "2019-03-25:2019-03-31"
"""
NYC2MEL = """\
[[task]]
name = "nyc2mel"
sources = ["nyc_bike", "nyc_taxi"]
target = "melbourne_pedestrian"
"""
METHODS = ["stbat", "finetune", "persistence"]
SEEDS = [0, 1, 2]
DAYS = [3, 0]
CHANNELS = ["pedestrians", "mean"]  # the one Melbourne channel, and the mean row
METRICS = ("rmse", "mae", "regions", "scaler_fit_on", "config", "descriptors")
KEY = ("task", "variant", "method", "train_days", "seed", "channel")


def experiment_header(methods=METHODS, seeds=3, days=DAYS, name="tiny") -> str:
    return (f'[experiment]\nname = "{name}"\ndata_dir = "{TINY}"\nmethods = {json.dumps(methods)}\n'
            f"train_days = {json.dumps(days)}\nseeds = {json.dumps(seeds)}\n")


def write_spec(folder: Path, text: str | None = None) -> Path:
    """``folder/spec.toml`` with ``text`` (default: the reference experiment)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.toml"
    path.write_text(text if text is not None else experiment_header() + TINY_DEFAULTS + NYC2MEL)
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_key(rows: list[dict]) -> dict[tuple, dict]:
    keyed = {tuple(r[k] for k in KEY): r for r in rows}
    assert len(keyed) == len(rows), "duplicate rows"
    return keyed


def assert_same_metrics(got: list[dict], want: list[dict]) -> None:
    """Same (task, variant, method, train_days, seed, channel) rows with identical numbers."""
    got_k, want_k = by_key(got), by_key(want)
    assert got_k.keys() == want_k.keys()
    for key, row in want_k.items():
        for field in METRICS:
            assert got_k[key][field] == row[field], (key, field)
        assert got_k[key]["info"] == row["info"], key  # incl. RIAM density from the cache
        if key[2] == "stbat":
            assert len(row["info"]["region_log_density"]) == 55


def fail(*args, **kwargs):
    raise AssertionError("nothing should be trained or evaluated here")


# --------------------------------------------------------------------------- the reference run
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of the reference spec."""
    base = tmp_path_factory.mktemp("reference")
    spec = write_spec(base / "spec")
    summary = run_experiment(spec, base / "out")
    return {"spec": spec, "out": base / "out", "summary": summary,
            "rows": lines(base / "out" / "results.jsonl"),
            "bytes": (base / "out" / "results.jsonl").read_bytes()}


def copy_out(reference, dest: Path) -> Path:
    shutil.copytree(reference["out"], dest)
    return dest


def test_a_run_writes_every_row_with_every_documented_field(reference):
    rows, spec = reference["rows"], reference["spec"]
    expected = {("nyc2mel", "default", m, d, s, ch) for m in METHODS for d in DAYS for s in SEEDS
                for ch in CHANNELS}
    assert set(by_key(rows)) == expected
    sha = hashlib.sha256(spec.read_bytes()).hexdigest()
    for row in rows:
        assert row["options"] == {} and row["spec"] == {"file": "spec.toml", "sha256": sha}
        assert row["version"] == stbat_plugin.__version__
        if (REPO / ".git").exists():  # a checkout: the commit the rows were made with
            assert re.fullmatch(r"[0-9a-f]{40}", row["git_commit"]), row["git_commit"]
        assert row["sources"] == "nyc_bike,nyc_taxi" and row["target"] == "melbourne_pedestrian"
        assert row["config"]["val_days"] == 3 and row["config"]["backbone_kwargs"]["hidden"] == 16
        assert row["descriptors"] == "poi" and isinstance(row["info"], dict)
        assert 0 < row["mae"] <= row["rmse"]
        assert len(row["regions"]["rmse"]) == 55  # Melbourne's regions
    summary = reference["summary"]
    assert (summary.units, summary.units_run, summary.units_skipped) == (9, 9, 0)
    assert summary.rows_written == len(rows)
    out = reference["out"]
    assert (out / "spec.toml").read_bytes() == spec.read_bytes()
    assert sorted(p.name for p in (out / "cache").iterdir()) == sorted(
        f"nyc2mel__default__{m}__seed{s}.pt" for m in ("stbat", "finetune") for s in SEEDS)
    assert "| stbat | 3 |" in (out / "report.md").read_text()


def test_a_rerun_does_nothing_new(reference, tmp_path, monkeypatch):
    out = copy_out(reference, tmp_path / "out")
    monkeypatch.setattr(api, "run_method", fail)
    monkeypatch.setattr(api, "prepare_sources", fail)
    code, stdout, err = run_cli(["experiment", reference["spec"], "--out", out, "--quiet"])
    assert code == 0, err
    assert (out / "results.jsonl").read_bytes() == reference["bytes"]
    assert "ran 0 of 9 unit(s) (9 already done)" in stdout and "| persistence | 3 |" in stdout


def test_the_cache_spares_pre_training_and_gives_the_same_numbers(reference, tmp_path, monkeypatch):
    """Results lost, cache kept: every pre-trained method resumes from its cached network."""
    out = copy_out(reference, tmp_path / "out")
    (out / "results.jsonl").unlink()
    monkeypatch.setattr(api, "_pretrain", fail)
    seen, prepared, targets = [], [], []
    real, real_prepare, real_target = api.run_method, api.prepare_sources, experiment.target_task
    monkeypatch.setattr(api, "prepare_sources", lambda *a: prepared.append(a) or real_prepare(*a))
    monkeypatch.setattr(experiment, "target_task",
                        lambda city, days, cfg: targets.append(days) or real_target(city, days, cfg))
    monkeypatch.setattr(api, "run_method",
                        lambda *a, **kw: seen.append(kw["pretrained"]) or real(*a, **kw))
    summary = run_experiment(reference["spec"], out)
    assert summary.units_run == 9
    assert sum(net is not None for net in seen) == 6  # stbat and finetune, 3 seeds each
    assert len(prepared) == 1 and targets == [3, 0]  # data prepared once for all 9 units
    assert_same_metrics(lines(out / "results.jsonl"), reference["rows"])


def test_git_commit_is_none_without_git(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(experiment.subprocess, "run", no_git)
    assert experiment.git_commit() is None


# --------------------------------------------------------------------------- kill -9
def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_rows(reference, tmp_path):
    out = tmp_path / "out"
    results = out / "results.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "stbat_plugin.pipeline.cli", "experiment",
                                 str(reference["spec"]), "--out", str(out), "--quiet"],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 180
            while not (results.exists() and b"\n" in results.read_bytes()):
                assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
                assert time.monotonic() < deadline, "no result row after 180 s"
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    before = read_results(results)
    assert 0 < len(before) < len(reference["rows"]), "the kill did not land mid-run"
    assert "**Incomplete**" in report(out)
    summary = run_experiment(reference["spec"], out)
    assert "**Incomplete**" not in (out / "report.md").read_text()
    assert summary.rows_written == len(reference["rows"]) - len(before)  # resumed, not restarted
    after = lines(results)
    assert after[:len(before)] == before  # the rows written before the kill are kept as they were
    assert_same_metrics(after, reference["rows"])


# --------------------------------------------------------------------------- damaged files
def test_a_truncated_last_line_is_cut_away_and_nothing_is_rerun(reference, tmp_path, monkeypatch):
    out = copy_out(reference, tmp_path / "out")
    with open(out / "results.jsonl", "ab") as fh:
        fh.write(json.dumps(reference["rows"][0]).encode()[:57])  # a row cut mid-write
    assert read_results(out / "results.jsonl") == reference["rows"]
    monkeypatch.setattr(api, "run_method", fail)
    run_experiment(reference["spec"], out)
    assert (out / "results.jsonl").read_bytes() == reference["bytes"]


def test_an_incomplete_last_batch_reruns_only_its_train_days(reference, tmp_path, monkeypatch):
    out = copy_out(reference, tmp_path / "out")
    text = reference["bytes"].decode().splitlines(keepends=True)
    last = json.loads(text[-1])
    assert (last["method"], last["seed"], last["train_days"], last["channel"]) == (
        "persistence", 2, 0, "mean")  # the plan's last batch
    (out / "results.jsonl").write_text("".join(text[:-1]))  # its "mean" row never written
    calls = []
    real = api.run_method
    monkeypatch.setattr(api, "run_method",
                        lambda m, s, src, targets, *a, **kw: calls.append((m, s, list(targets)))
                        or real(m, s, src, targets, *a, **kw))
    summary = run_experiment(reference["spec"], out)
    # persistence does not depend on the seed: its seed-2 rows are copied from seed 0, not rerun
    assert calls == [] and summary.units_run == 1
    assert_same_metrics(lines(out / "results.jsonl"), reference["rows"])


def test_a_corrupt_line_inside_the_file_is_an_error(reference, tmp_path):
    out = copy_out(reference, tmp_path / "out")
    text = reference["bytes"].decode().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(text[:3] + ["{oops\n"] + text[3:]))
    with pytest.raises(ValueError, match="line 4 is not a JSON object"):
        run_experiment(reference["spec"], out)


def test_another_spec_in_the_same_out_is_refused(reference, tmp_path):
    out = copy_out(reference, tmp_path / "out")
    other = write_spec(tmp_path / "other", experiment_header(seeds=1) + TINY_DEFAULTS + NYC2MEL)
    code, _, err = run_cli(["experiment", other, "--out", out, "--quiet"])
    assert code == 2 and "holds the results of another spec" in err and "choose another --out" in err
    (out / "spec.toml").unlink()
    code, _, err = run_cli(["experiment", reference["spec"], "--out", out, "--quiet"])
    assert code == 2 and "no spec.toml" in err


def test_a_second_run_on_the_same_out_is_refused_while_one_runs(reference, tmp_path, monkeypatch):
    fcntl = pytest.importorskip("fcntl")
    out = copy_out(reference, tmp_path / "out")
    monkeypatch.setattr(api, "run_method", fail)
    with open(out / ".lock", "a") as held:  # as a running `stbat experiment` holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="another `stbat experiment` is running"):
            run_experiment(reference["spec"], out)
    assert run_experiment(reference["spec"], out).units_run == 0  # released: runs again


# --------------------------------------------------------------------------- spec validation
def _spec_with(tmp_path: Path, header: str = "", defaults: str = TINY_DEFAULTS,
               tasks: str = NYC2MEL, extra: str = "") -> Path:
    return write_spec(tmp_path, (header or experiment_header()) + defaults + tasks + extra)


BAD_SPECS = {
    "unknown section": (dict(extra="[grids]\nwindow = [6]\n"), "'grids'"),
    "unknown experiment key": (dict(header=experiment_header() + "seed = 3\n"), "[experiment] 'seed'"),
    "unknown method": (dict(header=experiment_header(methods=["stbat", "nope"])), "methods"),
    "empty methods": (dict(header=experiment_header(methods=[])), "methods"),
    "unknown config field": (dict(defaults=TINY_DEFAULTS + "widnow = 6\n"), "[defaults] 'widnow'"),
    "bad config type": (dict(defaults=TINY_DEFAULTS + 'window = "6"\n'), "[defaults] 'window'"),
    "bad config value": (dict(defaults=TINY_DEFAULTS + 'normalize = "zz"\n'), "normalize"),
    "zero seeds": (dict(header=experiment_header(seeds=0)), "[experiment] seeds"),
    "empty train days": (dict(header=experiment_header(days=[])), "train_days"),
    "source is the target": (dict(tasks=NYC2MEL.replace('"nyc_taxi"', '"melbourne_pedestrian"')),
                             "[[task]] 'nyc2mel' sources"),
    "duplicate task": (dict(tasks=NYC2MEL + NYC2MEL), "duplicate task name 'nyc2mel'"),
    "unknown task key": (dict(tasks=NYC2MEL + "traget = 'x'\n"), "'traget'"),
    "task config field": (dict(tasks=NYC2MEL + "config = { windw = 3 }\n"), "config 'windw'"),
    "empty grid": (dict(extra="[grid]\nwindow = []\n"), "[grid] 'window'"),
    "grid key in defaults": (dict(extra="[grid]\nval_days = [3, 4]\n"), "[grid] 'val_days'"),
    "no zero-shot version": (dict(header=experiment_header(methods=["ha"], days=[0])), "'ha'"),
    "bad span": (dict(tasks=NYC2MEL + 'config = { target_span = "2019-13" }\n'), "target_span"),
    "bad per-city span": (dict(defaults=TINY_DEFAULTS.replace(
        '"2019-03-25:2019-03-31"', '"nyc_bike=2019-03-25:2019-03-31,nyc_taxi=2019-03-32:"')),
        "variant 'default' source_span"),
    "not toml": (dict(extra="[[task\n"), "not valid TOML"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_spec_errors_name_the_file_the_key_and_the_fix(case, tmp_path):
    kwargs, key = BAD_SPECS[case]
    path = _spec_with(tmp_path, **kwargs)
    with pytest.raises(ValueError) as info:
        load_spec(path)
    message = str(info.value)
    assert str(path) in message and key in message, message
    assert ";" in message  # problem; fix


def test_a_bad_spec_fails_the_cli_with_exit_code_2_before_any_run(tmp_path, monkeypatch):
    monkeypatch.setattr(api, "run_method", fail)
    path = _spec_with(tmp_path, header=experiment_header(seeds=-1))
    code, _, err = run_cli(["experiment", path, "--out", tmp_path / "out"])
    assert code == 2 and "[experiment] seeds" in err and not (tmp_path / "out").exists()
    missing = _spec_with(tmp_path, tasks=NYC2MEL.replace("nyc_taxi", "nyc_taxx"))
    code, _, err = run_cli(["experiment", missing, "--out", tmp_path / "out"])
    assert code == 2 and "no city 'nyc_taxx'" in err and "nyc_taxi" in err


# --------------------------------------------------------------------------- the plan
def test_per_city_spans_are_accepted(tmp_path):
    spans = '"nyc_bike=2019-03-25:2019-03-31,nyc_taxi=2019-03-24:2019-03-31"'
    spec = load_spec(_spec_with(tmp_path, defaults=TINY_DEFAULTS.replace(
        '"2019-03-25:2019-03-31"', spans)))
    assert plan(spec)[0].config.source_span == spans.strip('"')


def test_plan_is_grid_x_tasks_x_seeds_x_methods(tmp_path):
    tasks = NYC2MEL + ('[[task]]\nname = "bike2mel"\nsources = ["nyc_bike"]\n'
                       'target = "melbourne_pedestrian"\nmethods = ["stbat", "ha"]\n'
                       'config = { val_days = 4 }\n')
    grid = '[grid]\nnormalize = ["none", "revin"]\nwindow = [6, 12]\n'
    spec = load_spec(_spec_with(tmp_path, header=experiment_header(seeds=[0, 3]), tasks=tasks,
                                extra=grid))
    units = plan(spec)
    assert len(units) == 4 * 2 * 3 + 4 * 2 * 2  # variants x seeds x methods, per task
    labels = ["normalize=none,window=6", "normalize=none,window=12", "normalize=revin,window=6",
              "normalize=revin,window=12"]
    assert [v.label for v in spec.variants()] == labels
    first = units[0]
    assert (first.task.name, first.variant.label, first.seed, first.method) == (
        "nyc2mel", labels[0], 0, "stbat")
    assert {(u.task.name, u.variant.label, u.method, u.seed) for u in units} == {
        (t, v, m, s) for t, ms in (("nyc2mel", METHODS), ("bike2mel", ["stbat", "ha"]))
        for v in labels for m in ms for s in (0, 3)}
    for u in units:
        assert (u.config.normalize, u.config.window) == (u.variant.options["normalize"],
                                                         u.variant.options["window"])
        assert u.config.val_days == (4 if u.task.name == "bike2mel" else 3)
        assert u.train_days == ((3,) if u.method == "ha" else (3, 0))  # no zero-shot HA
    # seed-major: a run stopped early holds every task and variant of the seeds it finished
    assert units[5].cache_name == "nyc2mel__normalize=none,window=12__persistence__seed0.pt"
    seeds = [u.seed for u in units]
    assert seeds == sorted(seeds)
    only = plan(spec, ["bike2mel"], [3])
    assert {(u.task.name, u.seed) for u in only} == {("bike2mel", 3)} and len(only) == 4 * 2
    with pytest.raises(ValueError, match="subset"):
        plan(spec, None, [1])


def test_a_grid_run_with_data_dir_override_and_a_missing_variant_in_the_report(tmp_path):
    header = experiment_header(methods=["persistence"], seeds=1, days=[3], name="grid")
    text = header.replace(f'data_dir = "{TINY}"', 'data_dir = "nowhere"') + TINY_DEFAULTS + NYC2MEL
    spec = write_spec(tmp_path / "spec", text + "[grid]\nwindow = [6, 12]\n")
    assert load_spec(spec).data_dir == (tmp_path / "spec" / "nowhere").resolve()
    code, _, err = run_cli(["experiment", spec, "--out", tmp_path / "out", "--quiet"])
    assert code == 2 and "nowhere" in err and "no city 'nyc_bike'" in err
    code, _, err = run_cli(["experiment", spec, "--out", tmp_path / "out", "--data-dir", TINY,
                            "--quiet"])
    assert code == 0, err
    rows = lines(tmp_path / "out" / "results.jsonl")
    assert {(r["variant"], r["channel"]) for r in rows} == {
        (f"window={w}", ch) for w in (6, 12) for ch in CHANNELS}
    for row in rows:
        assert row["options"] == {"window": row["config"]["window"]}
        assert row["variant"] == f"window={row['config']['window']}"
    write_rows(tmp_path / "out", [r for r in rows if r["variant"] == "window=6"])
    md = report(tmp_path / "out")
    assert md.startswith("# Experiment grid") and "## nyc2mel — window=6" in md
    assert ("## nyc2mel — window=12\n\nNo results yet.\n\n"
            "- every method and setting: 0 of 1 seed(s); missing seed(s) [0]") in md


# --------------------------------------------------------------------------- the report
def hand_rows() -> list[dict]:
    """Known numbers: stbat and finetune on 2 channels x 3 seeds; persistence misses seed 2."""
    rows = []

    def add(method, days, seed, channel, rmse, regions):
        rows.append({"task": "t", "variant": "default", "sources": "a,b", "target": "c",
                     "backbone": "graph_stnet", "descriptors": "poi", "method": method,
                     "train_days": days, "seed": seed, "channel": channel, "rmse": rmse,
                     "mae": rmse / 2, "regions": {"rmse": regions}})

    for seed in (0, 1, 2):
        for days in (3, 0):
            for i, ch in enumerate(("x", "y")):
                base = 10.0 + seed + 2 * i
                s_rmse = base - 1.0 if (seed, i) != (2, 1) else base + 0.5  # 5 wins, 1 loss
                s_reg = [base - 1.0, None, base - 0.25 * seed, base + 0.1 * i]
                f_reg = [base, base, base, None]
                if days == 0:  # zero-shot: identical regions, so no test is possible
                    s_rmse, s_reg = base, f_reg
                add("stbat", days, seed, ch, s_rmse, s_reg)
                add("finetune", days, seed, ch, base, f_reg)
            for method, rmse in (("stbat", 1.0), ("finetune", 2.0), ("persistence", 5.0 + seed)):
                if method == "persistence" and (seed == 2 or days == 0):
                    continue
                add(method, days, seed, "mean", rmse, [])
    return rows


def write_rows(out: Path, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_paired_comparison_numbers_and_scipys_wilcoxon(tmp_path):
    rows = hand_rows()
    few, zero = paired_comparisons(rows)
    assert (few.train_days, few.pairs, few.wins, few.losses, few.ties) == (3, 6, 5, 1, 0)
    assert few.mean_diff == pytest.approx((5 * -1.0 + 0.5) / 6)
    s, f = [], []
    for seed in (0, 1, 2):
        for i in (0, 1):
            base = 10.0 + seed + 2 * i
            for a, b in zip([base - 1.0, None, base - 0.25 * seed, base + 0.1 * i],
                            [base, base, base, None], strict=True):
                if a is not None and b is not None:
                    s.append(a)
                    f.append(b)
    assert few.region_pairs == len(s) == 12
    assert few.pvalue == scipy.stats.wilcoxon(s, f, alternative="two-sided").pvalue
    assert (zero.train_days, zero.wins, zero.losses, zero.ties, zero.mean_diff) == (0, 0, 0, 6, 0.0)
    assert zero.pvalue is None and "only 0 non-zero region pair(s)" in zero.reason


def test_stbat_report_renders_tables_the_test_and_what_is_incomplete(tmp_path):
    out = tmp_path / "out"
    write_rows(out, hand_rows())
    code, stdout, err = run_cli(["report", out])
    assert code == 0, err
    md = (out / "report.md").read_text()
    assert md in stdout and md == report(out)
    assert "## t — default" in md
    assert ("| method | seeds | 3-day (few-shot) RMSE | 3-day (few-shot) MAE | "
            "0-day (zero-shot) RMSE | 0-day (zero-shot) MAE |") in md
    assert "| stbat | 3 | 1.000 ± 0.000 | 0.500 ± 0.000 | 1.000 ± 0.000 | 0.500 ± 0.000 |" in md
    assert "| persistence | 2 | 5.500 ± 0.707 | 2.750 ± 0.354 | - | - |" in md
    pairs = _region_pairs_of(hand_rows(), 3)
    p = scipy.stats.wilcoxon([x for x, _ in pairs], [y for _, y in pairs])
    assert f"| stbat | 3 | 6 | -0.7500 | 5 / 1 / 0 | {p.pvalue:.3g} (n=12) |" in md
    assert "| stbat | 0 | 6 | +0.0000 | 0 / 0 / 6 | n/a (only 0 non-zero region pair(s)" in md
    assert "**Incomplete**" in md and "- persistence 3-day: 2 of 3 seed(s); missing seed(s) [2]" in md


def _region_pairs_of(rows: list[dict], days: int) -> list[tuple[float, float]]:
    keyed = {(r["method"], r["seed"], r["channel"]): r for r in rows if r["train_days"] == days}
    pairs = []
    for (method, seed, ch), row in sorted(keyed.items()):
        if method == "stbat" and ch != "mean":
            other = keyed[("finetune", seed, ch)]["regions"]["rmse"]
            pairs += [(a, b) for a, b in zip(row["regions"]["rmse"], other, strict=True)
                      if a is not None and b is not None]
    return pairs


def test_report_of_a_folder_without_results_is_an_error(tmp_path):
    code, _, err = run_cli(["report", tmp_path])
    assert code == 2 and "results.jsonl does not exist" in err


def test_import_does_not_load_scipy():
    code = ("import sys, stbat_plugin, stbat_plugin.pipeline.experiment, stbat_plugin.pipeline.report, "
            "stbat_plugin.pipeline.cli; print(sorted(m for m in sys.modules if m.startswith('scipy')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_unseeded_methods_run_once_and_are_copied_to_the_other_seeds(reference):
    rows = [r for r in reference["rows"] if r["method"] == "persistence"]
    by_seed = {}
    for r in rows:
        by_seed.setdefault(r["seed"], []).append(r)
    assert sorted(by_seed) == SEEDS
    first = min(SEEDS)
    assert all("copied_from_seed" not in r["info"] for r in by_seed[first])
    for seed in SEEDS[1:]:
        assert all(r["info"]["copied_from_seed"] == first for r in by_seed[seed])
        assert sorted((r["train_days"], r["channel"], r["rmse"]) for r in by_seed[seed]) == \
            sorted((r["train_days"], r["channel"], r["rmse"]) for r in by_seed[first])


def test_tasks_filter_and_a_merged_report(reference, tmp_path):
    """One spec split over two folders with --tasks; `stbat report A B` merges them."""
    spec = load_spec(reference["spec"])
    assert [u.task.name for u in plan(spec, ["nyc2mel"])] == [u.task.name for u in plan(spec)]
    with pytest.raises(ValueError, match="unknown task"):
        plan(spec, ["nyc2mel", "atlantis"])
    code, _, err = run_cli(["experiment", reference["spec"], "--out", tmp_path / "x",
                            "--tasks", "atlantis", "--quiet"])
    assert code == 2 and "atlantis" in err and not (tmp_path / "x" / "results.jsonl").exists()
    a, b = copy_out(reference, tmp_path / "a"), tmp_path / "b"
    b.mkdir()
    shutil.copy(a / "spec.toml", b / "spec.toml")
    rows = lines(a / "results.jsonl")
    half = [r for r in rows if r["seed"] == 0]
    (a / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["seed"] != 0))
    (b / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in half))
    merged = report(a, [b])
    assert merged.replace(f"`{a}/results.jsonl`, `{b}/results.jsonl`", "X") != merged
    assert "**Incomplete**" not in merged and "**Incomplete**" in report(a)


def test_report_shows_where_balancing_helps_with_a_figure(reference, tmp_path):
    out = copy_out(reference, tmp_path / "out")
    md = report(out)
    section = md.split("## Where balancing helps")[1]
    assert "| nyc2mel | default | 3 | density | Q1 |" in section
    assert "| nyc2mel | default | 0 | volume | Q4 |" in section
    png = out / "balance.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and "![" in section
