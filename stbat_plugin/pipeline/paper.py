"""The paper's experiments besides Table 2, as resumable commands with a table and a figure.

- :func:`ablation` (Fig. 3): STBaT, its four variants w/o POI / FDP / SimDCL / WLoss, and
  fine-tuning for reference;
- :func:`sensitivity` (Fig. 4): STBaT against D, beta, h and tau, one at a time;
- :func:`scarcity` (Fig. 5): test error as the target's training days grow;
- :func:`efficiency` (Table 3): peak memory and training time of each method, each run in
  its own process on the same data.

Each builds a spec of the experiment harness (:mod:`stbat_plugin.pipeline.experiment`), writes it to
``OUT/spec.toml`` and calls :func:`~stbat_plugin.pipeline.experiment.run_experiment`: rows are
appended to ``OUT/results.jsonl`` as they finish, and rerunning the same command (or
``stbat experiment OUT/spec.toml --out OUT``) resumes. Then the rows become
``OUT/<kind>.md`` (table, command, version, git commit) and ``OUT/<kind>.png``
(:mod:`stbat_plugin.pipeline.plots`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

import stbat_plugin
from stbat_plugin.data.splits import steps_per_day, target_split
from stbat_plugin.data.windows import window_count
from stbat_plugin.pipeline.config import TransferConfig, setting_fields
from stbat_plugin.pipeline.experiment import (
    RESULTS_FILE,
    SPEC_FILE,
    _append_rows,
    git_commit,
    read_results,
    run_experiment,
)
from stbat_plugin.pipeline.io import atomic_write_text
from stbat_plugin.pipeline.method_registry import get_method

__all__ = ["PaperTask", "PaperResult", "TASKS", "BUDGETS", "SWEEPS", "ABLATIONS",
           "ablation", "sensitivity", "scarcity", "efficiency", "spec_text",
           "default_data_dir", "given_options", "command_line"]

log = logging.getLogger(__name__)

#: the data bundled with a source checkout (absent from an installed wheel)
BUNDLED_DATA = Path(__file__).resolve().parents[2] / "data"


@dataclass(frozen=True)
class PaperTask:
    """A cross-city task of the bundled data (the four tasks of the study in docs/results.md).

    ``short_config`` cuts the sources to one month, for the experiments with a smaller budget.
    """

    name: str
    sources: tuple[str, ...]
    target: str
    config: dict[str, Any] = field(default_factory=dict, hash=False)
    short_config: dict[str, Any] = field(default_factory=dict, hash=False)


_SPAN, _MAR = "2019-02-01:2019-03-31", "2019-03-01:2019-03-31"
_MEL, _MEL_MAR = "melbourne_pedestrian=2022-02-01:2022-03-31", "melbourne_pedestrian=2022-03-01:2022-03-31"
TASKS: dict[str, PaperTask] = {t.name: t for t in (
    PaperTask("nyc2mel", ("nyc_bike", "nyc_taxi"), "melbourne_pedestrian", {"source_span": _SPAN},
              {"source_span": _MAR}),
    PaperTask("bike", ("melbourne_pedestrian", "nyc_taxi"), "nyc_bike",
              {"source_span": f"nyc_taxi={_SPAN},{_MEL}", "target_span": "2019-01-01:2019-12-31"},
              {"source_span": f"nyc_taxi={_MAR},{_MEL_MAR}"}),
    PaperTask("mvd", ("nyc_bike", "nyc_taxi", "melbourne_pedestrian"), "montevideo_bus",
              {"source_span": f"nyc_bike={_SPAN},nyc_taxi={_SPAN},{_MEL}",
               "descriptors": "temporal_profile", "val_days": 7, "test_days": 14},
              {"source_span": f"nyc_bike={_MAR},nyc_taxi={_MAR},{_MEL_MAR}"}),
    PaperTask("grid", ("nyc_bike", "nyc_taxi"), "nyc_bike_grid2014",
              {"source_span": _SPAN, "descriptors": "temporal_profile", "val_days": 14,
               "test_days": 28}, {"source_span": _MAR}),
)}

#: the study's budget (examples/experiments/study.toml): a quarter of the paper's widths
STUDY_BUDGET: dict[str, Any] = {"backbone": "graph_stnet",
                                "backbone_kwargs": {"channels": 16, "hidden": 16},
                                "max_epochs": 20, "patience": 3, "finetune_epochs": 30}

#: per experiment: its default budget (TransferConfig fields), task(s), seeds, train days;
#: ``short_sources``: one month of source data (``PaperTask.short_config``)
BUDGETS: dict[str, dict[str, Any]] = {
    "ablation": {"config": dict(STUDY_BUDGET), "tasks": ("nyc2mel",), "seeds": 5,
                 "train_days": (3, 0)},
    # 17 STBaT settings x 2 seeds on a shared 2-core CPU: one month of sources, at most
    # 6 epochs of 20 batches
    "sensitivity": {"config": {**STUDY_BUDGET, "max_epochs": 6, "max_batches_per_epoch": 20},
                    "tasks": ("nyc2mel",), "seeds": 2, "train_days": (3,),
                    "short_sources": True},
    "scarcity": {"config": {**STUDY_BUDGET, "max_epochs": 6, "max_batches_per_epoch": 20,
                            "finetune_epochs": 20},
                 "tasks": ("nyc2mel", "bike"), "seeds": 2, "train_days": (0, 2, 3, 7, 14, 30),
                 "short_sources": True},
    # a fixed number of epochs for every method (patience >= epochs: no early stop)
    "efficiency": {"config": {**STUDY_BUDGET, "max_epochs": 3, "patience": 5,
                              "finetune_epochs": 5},
                   "tasks": ("nyc2mel",), "seeds": 2, "train_days": (3,)},
}

#: the four ablations of Fig. 3: (task-name suffix, switches)
ABLATIONS: tuple[tuple[str, dict[str, bool]], ...] = (
    ("", {}), ("no-poi", {"use_poi": False}), ("no-fdp", {"use_fdp": False}),
    ("no-simdcl", {"use_simdcl": False}), ("no-wloss", {"use_weighted_loss": False}))

#: the hyper-parameters of Fig. 4: field -> (the paper's symbol, values)
SWEEPS: dict[str, tuple[str, tuple[float, ...]]] = {
    "embed_dim": ("D", (8, 16, 32, 64, 128)),
    "beta": ("beta", (0.001, 0.01, 0.1, 1.0)),
    "bandwidth": ("h", (0.25, 0.5, 0.85, 1.25, 2.0)),
    "tau": ("tau", (0.1, 0.3, 1.0, 3.0, 10.0)),
}

SCARCITY_METHODS = ("stbat", "finetune", "target-only", "persistence", "seasonal", "arima")
EFFICIENCY_METHODS = ("finetune", "stbat", "maml", "linear", "target-only")
MEASURE_FILE = "efficiency.jsonl"


@dataclass
class PaperResult:
    """What one of the commands wrote."""

    out: Path
    table_path: Path
    png_path: Path | None
    rows: list[dict[str, Any]]
    markdown: str


# ----------------------------------------------------------------------------- options
def default_data_dir() -> Path:
    """The bundled ``data/`` of a source checkout."""
    if BUNDLED_DATA.is_dir():
        return BUNDLED_DATA
    raise ValueError(f"no --data-dir given and no bundled data folder at {BUNDLED_DATA} (an "
                     "installed package ships without data); pass --data-dir with the city files")


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The TransferConfig flags given on the command line (unset flags are absent)."""
    return {f.name: getattr(args, f.name) for f in setting_fields() if hasattr(args, f.name)}


def command_line(kind: str, options: dict[str, Any], overrides: dict[str, Any],
                 repeat: tuple[str, ...] = ()) -> str:
    """The ``stbat KIND ...`` command that reproduces a run (flags in a fixed order);
    list options named in ``repeat`` are given once per value."""
    flags = {f.name: "--" + (f.metadata.get("flag") or f.name).replace("_", "-")
             for f in setting_fields()}
    parts = ["stbat", kind]
    for key, value in options.items():
        if value is None or value is False or value == []:
            continue
        flag = "--" + key.replace("_", "-")
        if key in repeat:
            parts += [p for v in value for p in (flag, _cli_value(v))]
        else:
            parts += [flag] if value is True else [flag, _cli_value(value)]
    for key, value in overrides.items():
        if isinstance(value, bool):
            parts.append(flags[key] if value else "--no-" + flags[key][2:])
        else:
            parts += [flags[key], _cli_value(value)]
    return shlex.join(parts)


def _cli_value(value: Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


# ----------------------------------------------------------------------------- the spec
def _toml(value: Any) -> str:
    """A TOML value (strings, numbers, booleans, lists and inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if not np.isfinite(value):
            raise ValueError(f"cannot write the non-finite number {value} into a spec")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) into a TOML spec")


def _toml_key(key: Any) -> str:
    key = str(key)
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def spec_text(name: str, data_dir: str, methods: Sequence[str], train_days: Sequence[int],
              seeds: int | list[int], defaults: dict[str, Any], tasks: list[dict[str, Any]],
              comment: str = "") -> str:
    """A spec of :mod:`stbat_plugin.pipeline.experiment` (``None`` values are left out: the default).

    ``tasks``: dicts with ``name``, ``sources``, ``target`` and optional ``config`` and
    ``methods``.
    """
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    lines += ["[experiment]", f"name = {_toml(name)}", f"data_dir = {_toml(data_dir)}",
              f"methods = {_toml(list(methods))}", f"train_days = {_toml(list(train_days))}",
              f"seeds = {_toml(seeds)}", "", "[defaults]"]
    lines += [f"{k} = {_toml(v)}" for k, v in defaults.items() if v is not None]
    for task in tasks:
        lines += ["", "[[task]]", f"name = {_toml(task['name'])}",
                  f"sources = {_toml(list(task['sources']))}", f"target = {_toml(task['target'])}"]
        config = {k: v for k, v in task.get("config", {}).items() if v is not None}
        if config:
            lines.append(f"config = {_toml(config)}")
        if task.get("methods"):
            lines.append(f"methods = {_toml(list(task['methods']))}")
    return "\n".join(lines) + "\n"


def _relative(data_dir: Path, out: Path) -> str:
    """``data_dir`` relative to ``out`` (where the spec lives), so the pair can move."""
    return Path(os.path.relpath(data_dir.resolve(), out.resolve())).as_posix()


def _task(name: str) -> PaperTask:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the bundled tasks are {sorted(TASKS)}")
    return TASKS[name]


def _task_entry(task: PaperTask, kind: str, overrides: dict[str, Any], **extra: Any) -> dict:
    """A ``[[task]]`` of a spec: the task's own settings, the experiment's, then the flags."""
    short = task.short_config if BUDGETS[kind].get("short_sources") else {}
    config = {**task.config, **short, **overrides}
    return {"name": task.name, "sources": task.sources, "target": task.target,
            "config": config, **extra}


def _write_spec(out: Path, text: str) -> Path:
    """``OUT/spec.toml``; a folder holding another experiment is refused."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory; choose another path")
    path = out / SPEC_FILE
    if path.exists():
        if path.read_text() != text:
            raise ValueError(f"--out {out} holds another experiment ({path} differs from what "
                             "these options give); rerun with the options it was started with "
                             "(see the command in its .md file), or choose another --out")
        return path
    if (out / RESULTS_FILE).exists():
        raise ValueError(f"--out {out} has a {RESULTS_FILE} but no {SPEC_FILE}; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path


def _run(kind: str, out: Path, text: str, progress: bool, registry: Any) -> list[dict[str, Any]]:
    spec = _write_spec(out, text)
    run_experiment(spec, out, progress=progress, registry=registry)
    return read_results(out / RESULTS_FILE)


def _comment(kind: str, command: str | None) -> str:
    return (f"Generated by `stbat {kind}`; rerun the same command, or\n"
            f"`stbat experiment OUT/{SPEC_FILE} --out OUT`, to resume.")


# ----------------------------------------------------------------------------- aggregates
class Stat(NamedTuple):
    """Mean, sample standard deviation (0 for one value) and count of some values."""

    mean: float
    std: float
    n: int


def _stat(values: Sequence[float]) -> Stat:
    arr = np.asarray(values, float)
    if arr.size == 0:
        return Stat(float("nan"), float("nan"), 0)
    return Stat(float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0, int(arr.size))


def _fmt(mean: float, std: float) -> str:
    return "-" if not np.isfinite(mean) else f"{mean:.3f} ± {std:.3f}"


def _mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("channel") == "mean"]


def _header(title: str, command: str | None, rows: list[dict[str, Any]], extra: str = "") -> str:
    made = sorted({str(r["git_commit"]) for r in rows if r.get("git_commit")})
    commit = ", ".join(made) if made else git_commit()  # what the rows were made with
    first = rows[0] if rows else {}
    config = first.get("config", {})
    keys = ("backbone", "backbone_kwargs", "window", "normalize", "linear_skip", "lag_days",
            "max_epochs",
            "patience", "max_batches_per_epoch", "finetune_epochs", "source_span", "target_span",
            "val_days", "test_days", "descriptors")
    budget = ", ".join(f"{k}={json.dumps(config[k], sort_keys=True)}" for k in keys if k in config)
    parts = [f"# {title}", f"Command: `{command or '(Python API)'}`",
             f"stbat-plugin {stbat_plugin.__version__}; git commit "
             f"{commit or 'unknown (not a git checkout)'}."]
    if budget:
        parts.append(f"Settings (first task): {budget}.")
    if extra:
        parts.append(extra)
    return "\n\n".join(parts)


def _finish(kind: str, out: Path, blocks: list[str], rows: list[dict[str, Any]],
            plot: Any) -> PaperResult:
    """Write the figure (when matplotlib is there) and ``OUT/<kind>.md``."""
    png: Path | None = out / f"{kind}.png"
    try:
        plot(png)
        blocks.append(f"![{kind}]({kind}.png)")
    except ImportError as exc:
        png = None
        blocks.append(f"(No figure: {exc}.)")
    text = "\n\n".join(blocks) + "\n"
    table = atomic_write_text(out / f"{kind}.md", text)
    return PaperResult(out, table, png, rows, text)


# ----------------------------------------------------------------------------- ablation
def ablation(out: str | Path, *, data_dir: str | Path | None = None, task: str = "nyc2mel",
             seeds: int | None = None, train_days: Sequence[int] | None = None,
             overrides: dict[str, Any] | None = None, progress: bool = False,
             registry: Any = None, command: str | None = None, dry_run: bool = False
             ) -> PaperResult:
    """Fig. 3: STBaT, w/o POI, w/o FDP, w/o SimDCL, w/o WLoss, and fine-tuning, per seed.

    Each variant is one ``[[task]]`` of the spec (same data, one switch off), so every row
    is named as :func:`stbat_plugin.pipeline.api.method_label` names it, e.g. ``stbat (w/o POI)``.
    ``dry_run``: only build the spec (returned as ``markdown``; nothing is written).
    """
    out, plan = Path(out), BUDGETS["ablation"]
    data = Path(data_dir) if data_dir is not None else default_data_dir()
    overrides = dict(overrides or {})
    clash = sorted({k for _, sw in ABLATIONS for k in sw} & set(overrides))
    if clash:
        raise ValueError(f"the ablation switches {clash} are set by the ablation itself; drop "
                         "those flags")
    base = _task(task)
    tasks = []
    for suffix, switches in ABLATIONS:
        entry = _task_entry(base, "ablation", {**overrides, **switches},
                            methods=["stbat", "finetune"] if not suffix else ["stbat"])
        entry["name"] = f"{base.name}.{suffix}" if suffix else base.name
        tasks.append(entry)
    days = list(train_days or plan["train_days"])
    text = spec_text("ablation", _relative(data, out), ["stbat"], days, seeds or plan["seeds"],
                     plan["config"], tasks, _comment("ablation", command))
    if dry_run:
        return PaperResult(out, out / SPEC_FILE, None, [], text)
    rows = _run("ablation", out, text, progress, registry)
    entries, table = ablation_table(rows)
    blocks = [_header(f"Ablation (Fig. 3): {base.name}, {' -> '.join([','.join(base.sources), base.target])}",
                      command, rows),
              "Test RMSE (channel mean), mean ± std over seeds; Δ is paired by seed against "
              "full STBaT (negative: the variant is better); wins = seeds where the variant "
              "beats full STBaT.", table]
    from stbat_plugin.pipeline.plots import plot_ablation

    return _finish("ablation", out, blocks, rows, lambda p: plot_ablation(entries, p))


def _ablation_order(label: str) -> tuple[int, str]:
    names = ["stbat"] + [f"stbat (w/o {n})" for n in ("POI", "FDP", "SimDCL", "WLoss")]
    return (names.index(label) if label in names else len(names) + (label != "finetune"), label)


def ablation_table(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Plot entries and the markdown table of ablation rows (channel mean)."""
    rows = _mean_rows(rows)
    by: dict[tuple[str, int], dict[int, float]] = defaultdict(dict)
    for r in rows:
        by[(r["method"], r["train_days"])][r["seed"]] = r["rmse"]
    labels = sorted({m for m, _ in by}, key=_ablation_order)
    days = sorted({d for _, d in by}, reverse=True)
    head = "| variant | " + " | ".join(f"{d}-day seeds | {d}-day RMSE | Δ vs STBaT | wins" for d in days)
    lines = [head + " |", "|---" * (1 + 4 * len(days)) + "|"]
    entries = []
    for label in labels:
        cells = []
        for d in days:
            vals = by.get((label, d), {})
            mean, std, n = _stat(list(vals.values()))
            ref = by.get(("stbat", d), {})
            paired = [vals[s] - ref[s] for s in sorted(vals.keys() & ref.keys())]
            dmean, dstd, _ = _stat(paired)
            delta = "-" if label == "stbat" or not paired else f"{dmean:+.3f} ± {dstd:.3f}"
            wins = "-" if label == "stbat" or not paired else f"{sum(p < 0 for p in paired)}/{len(paired)}"
            cells += [str(n), _fmt(mean, std), delta, wins]
            if n:
                entries.append({"label": label, "days": d, "mean": mean, "std": std, "n": n,
                                "delta": dmean if paired else None})
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return entries, "\n".join(lines)


# ----------------------------------------------------------------------------- sensitivity
def _value_name(value: float) -> str:
    return f"{value:g}"


def sensitivity(out: str | Path, *, data_dir: str | Path | None = None, task: str = "nyc2mel",
                seeds: int | None = None, sweeps: dict[str, Sequence[float]] | None = None,
                overrides: dict[str, Any] | None = None, progress: bool = False,
                registry: Any = None, command: str | None = None, dry_run: bool = False
                ) -> PaperResult:
    """Fig. 4: STBaT's few-shot error against D, beta, h and tau, one at a time.

    The spec has a ``base`` task (library defaults; STBaT and fine-tuning for reference)
    and one task per other value of each swept field (STBaT only), named e.g. ``D-8``.
    ``sweeps`` (field -> values) replaces :data:`SWEEPS` when given. The best value of each
    is the one with the lowest mean target-VALIDATION RMSE; test RMSE is what is plotted.
    """
    out, plan = Path(out), BUDGETS["sensitivity"]
    data = Path(data_dir) if data_dir is not None else default_data_dir()
    overrides = dict(overrides or {})
    chosen = _sweeps(sweeps)
    base = _task(task)
    base_entry = _task_entry(base, "sensitivity", overrides, methods=["stbat", "finetune"])
    base_entry["name"] = "base"
    base_config = TransferConfig.from_dict({**plan["config"], **base_entry["config"]})
    tasks = [base_entry]
    for fld, values in chosen.items():
        for value in values:
            if value != getattr(base_config.stbat, fld):
                entry = _task_entry(base, "sensitivity", {**overrides, fld: value})
                entry["name"] = f"{SWEEPS[fld][0]}-{_value_name(value)}"
                tasks.append(entry)
    text = spec_text("sensitivity", _relative(data, out), ["stbat"], plan["train_days"],
                     seeds or plan["seeds"], plan["config"], tasks,
                     _comment("sensitivity", command))
    if dry_run:
        return PaperResult(out, out / SPEC_FILE, None, [], text)
    rows = _run("sensitivity", out, text, progress, registry)
    found = sensitivity_table(rows, chosen, base_config)
    blocks = [_header(f"Sensitivity (Fig. 4): {base.name}, few-shot", command, rows),
              "STBaT, one hyper-parameter varied at a time (the others at their default). "
              "Target-validation RMSE (what the best value is chosen on) and test RMSE, channel "
              "mean, mean ± std over seeds.", found.markdown]
    if found.reference is not None:
        blocks.append(f"Fine-tuning (reference, same budget): test RMSE "
                      f"{_fmt(found.reference['mean'], found.reference['std'])}.")
    defaults = {SWEEPS[f][0]: float(getattr(base_config.stbat, f)) for f in chosen}
    from stbat_plugin.pipeline.plots import plot_sensitivity

    return _finish("sensitivity", out, blocks, rows, lambda p: plot_sensitivity(
        found.points, p, reference=found.reference, defaults=defaults, best=found.best))


def _sweeps(sweeps: dict[str, Sequence[float]] | None) -> dict[str, tuple[float, ...]]:
    if sweeps is None:
        return {k: v for k, (_, v) in SWEEPS.items()}
    unknown = sorted(set(sweeps) - set(SWEEPS))
    if unknown or not sweeps:
        raise ValueError(f"sweep fields {unknown or '(none)'} are not hyper-parameters of Fig. 4; "
                         f"choose from {list(SWEEPS)}")
    for k, values in sweeps.items():
        if not values or len(set(values)) != len(values):
            raise ValueError(f"sweep {k}: give distinct values, e.g. {k}={SWEEPS[k][1]}")
    return {k: tuple(v) for k, v in sweeps.items()}


class SensitivityTable(NamedTuple):
    """What :func:`sensitivity_table` finds in the rows."""

    points: list[dict[str, Any]]  # one per swept value: test mean / std, validation mean, n
    reference: dict[str, Any] | None  # fine-tuning's test RMSE, None without those rows
    best: dict[str, float]  # symbol -> the value with the lowest validation RMSE
    markdown: str


def sensitivity_table(rows: list[dict[str, Any]], sweeps: Mapping[str, Sequence[float]],
                      base: TransferConfig) -> SensitivityTable:
    """Plot points, the fine-tuning reference, the best value per symbol (on validation) and
    the markdown table of sensitivity rows (channel mean, few-shot)."""
    rows = [r for r in _mean_rows(rows) if r["train_days"] > 0]
    by_task: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    ref: list[float] = []
    for r in rows:
        if r["method"] == "finetune":
            ref.append(r["rmse"])
        elif r["method"] == "stbat":
            by_task[r["task"]]["test"].append(r["rmse"])
            by_task[r["task"]]["val"].append(r.get("info", {}).get("val_rmse", float("nan")))
    points: list[dict[str, Any]] = []
    best: dict[str, float] = {}
    lines = ["| parameter | value | seeds | target-val RMSE | test RMSE | |",
             "|---|---|---|---|---|---|"]
    for fld, values in sweeps.items():
        symbol = SWEEPS[fld][0]
        found: list[tuple[float, Stat, Stat]] = []  # (value, validation, test)
        for value in values:
            name = "base" if value == getattr(base.stbat, fld) else f"{symbol}-{_value_name(value)}"
            got = by_task.get(name)
            if not got:
                continue
            test, val = _stat(got["test"]), _stat(got["val"])
            found.append((value, val, test))
            points.append({"param": symbol, "value": float(value), "mean": test.mean,
                           "std": test.std, "val_mean": val.mean, "n": test.n})
        if not found:
            continue
        best_value = min(found, key=lambda f: f[1].mean)[0]
        best[symbol] = float(best_value)
        for value, val, test in found:
            note = ", ".join(n for n, on in (("default", value == getattr(base.stbat, fld)),
                                               ("**best on validation**", value == best_value)) if on)
            lines.append(f"| {symbol} | {_value_name(value)} | {test.n} | {_fmt(val.mean, val.std)} | "
                         f"{_fmt(test.mean, test.std)} | {note} |")
    mean, std, n = _stat(ref)
    reference = {"mean": mean, "std": std, "label": "finetune"} if n else None
    return SensitivityTable(points, reference, best, "\n".join(lines))


# ----------------------------------------------------------------------------- scarcity
def scarcity(out: str | Path, *, data_dir: str | Path | None = None,
             tasks: Sequence[str] | None = None, days: Sequence[int] | None = None,
             methods: Sequence[str] = SCARCITY_METHODS, seeds: int | None = None,
             overrides: dict[str, Any] | None = None, progress: bool = False,
             registry: Any = None, command: str | None = None, dry_run: bool = False
             ) -> PaperResult:
    """Fig. 5: test error as the target's training days grow (0 = zero-shot).

    Every setting is checked before anything runs: the target must hold the largest
    number of days plus its validation and test days, and the smallest positive number
    must give at least one training window. The paper's 1 day is not in the default
    list, since 24 steps give no window of the default 24 + 1 steps.
    """
    out, plan = Path(out), BUDGETS["scarcity"]
    data = Path(data_dir) if data_dir is not None else default_data_dir()
    overrides = dict(overrides or {})
    days = list(days if days is not None else plan["train_days"])
    if not days or any(d < 0 for d in days) or len(set(days)) != len(days):
        raise ValueError(f"--days must be distinct integers >= 0 (got {days})")
    for m in methods:
        get_method(m)
    entries = [_task_entry(_task(t), "scarcity", overrides) for t in (tasks or plan["tasks"])]
    for entry in entries:
        _check_days(data, entry, days, {**plan["config"], **entry["config"]})
    text = spec_text("scarcity", _relative(data, out), list(methods), sorted(days),
                     seeds or plan["seeds"], plan["config"], entries, _comment("scarcity", command))
    if dry_run:
        return PaperResult(out, out / SPEC_FILE, None, [], text)
    rows = _run("scarcity", out, text, progress, registry)
    points, table = scarcity_table(rows)
    blocks = [_header("Data scarcity (Fig. 5)", command, rows),
              "Test RMSE (channel mean), mean ± std over seeds, against the target's training "
              "days (0 = zero-shot). Classical methods without a zero-shot version have no "
              "0-day value.", table]
    from stbat_plugin.pipeline.plots import plot_scarcity

    return _finish("scarcity", out, blocks, rows, lambda p: plot_scarcity(points, p))


def _check_days(data: Path, entry: dict[str, Any], days: list[int], config: dict[str, Any]) -> None:
    """Refuse, before any run, train-days the target cannot hold or that give no window."""
    from stbat_plugin.pipeline import api

    cfg = TransferConfig.from_dict(config)
    city = api.load(data, entry["target"], cfg.target_span)
    per_day = steps_per_day(city.interval_minutes)
    target_split(city.num_steps, per_day, max(days), cfg.val_days, cfg.test_days,
                 name=f"task {entry['name']!r}: target city {city.name!r}")
    lags = [d * per_day for d in cfg.lag_days]
    short = [d for d in days if 0 < d and window_count(
        d * per_day, 0, d * per_day, cfg.window, cfg.horizon, "inside", lags=lags) == 0]
    if short:
        lag_note = f" and {cfg.lag_days}-day lag input(s)" if lags else ""
        raise ValueError(f"task {entry['name']!r}: {short} training day(s) give no window of "
                         f"{cfg.window}+{cfg.horizon} steps{lag_note} ({per_day} steps a day); "
                         "drop them from --days, use a smaller --window"
                         + (" or fewer --lag-days" if lags else ""))


def scarcity_table(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Plot points and markdown tables (one per task: methods x train-days)."""
    from stbat_plugin.pipeline.results import _order

    rows = _mean_rows(rows)
    cells: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in rows:
        cells[(r["task"], r["method"], r["train_days"])].append(r["rmse"])
    points, blocks = [], []
    for task in dict.fromkeys(r["task"] for r in rows):
        days = sorted({d for t, _, d in cells if t == task})
        methods = sorted({m for t, m, _ in cells if t == task}, key=_order)
        first = next(r for r in rows if r["task"] == task)
        lines = [f"**{task}** ({first['sources']} -> {first['target']}), test RMSE:", "",
                 "| method | " + " | ".join(f"{d} days" for d in days) + " |",
                 "|---" * (1 + len(days)) + "|"]
        for m in methods:
            vals = []
            for d in days:
                mean, std, n = _stat(cells.get((task, m, d), []))
                vals.append(_fmt(mean, std))
                if n:
                    points.append({"task": task, "method": m, "days": d, "mean": mean, "std": std})
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
        blocks.append("\n".join(lines))
    return points, "\n\n".join(blocks)


# ----------------------------------------------------------------------------- efficiency
def efficiency(out: str | Path, *, data_dir: str | Path | None = None, task: str = "nyc2mel",
               methods: Sequence[str] = EFFICIENCY_METHODS, seeds: int | None = None,
               overrides: dict[str, Any] | None = None, progress: bool = False,
               plugins: Sequence[str] = (), command: str | None = None) -> PaperResult:
    """Table 3: peak memory and training time of each method, one process per measurement.

    Each (method, seed) runs the same one-task spec with only that method, in a child
    process (``python -m stbat_plugin.pipeline.paper child ...``); its peak memory is the child's
    own peak resident set size (:func:`_own_peak_mb`), its training time the rows' pre-training plus
    fine-tuning seconds. A child that only loads the data gives the memory floor. Every
    method trains the same number of epochs: ``patience`` must be at least ``max_epochs``
    and ``finetune_epochs``. Measurements go to ``OUT/efficiency.jsonl``; a rerun measures
    only what is missing (an interrupted measurement is discarded and taken again).
    """
    out, plan = Path(out), BUDGETS["efficiency"]
    data = Path(data_dir) if data_dir is not None else default_data_dir()
    overrides = dict(overrides or {})
    methods = list(methods)
    bad = [m for m in methods if not get_method(m).pretrains and m != "target-only"]
    if bad:
        raise ValueError(f"efficiency measures trained methods; {bad} train nothing (choose from "
                         "methods that pre-train, and target-only)")
    entry = _task_entry(_task(task), "efficiency", overrides)
    cfg = TransferConfig.from_dict({**plan["config"], **entry["config"]})
    if cfg.patience < max(cfg.max_epochs, cfg.finetune_epochs):
        raise ValueError(f"efficiency compares methods over the same number of epochs: give "
                         f"--patience >= {max(cfg.max_epochs, cfg.finetune_epochs)} (max_epochs "
                         f"{cfg.max_epochs}, finetune_epochs {cfg.finetune_epochs}), got "
                         f"{cfg.patience}")
    seed_list = list(range(seeds or plan["seeds"]))
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    done = {(m["method"], m["seed"]) for m in _read_jsonl(out / MEASURE_FILE)}
    todo = [("(data only)", 0)] + [(m, s) for s in seed_list for m in methods]
    for method, seed in todo:
        if (method, seed) in done:
            continue
        label = "data" if method == "(data only)" else method
        folder = runs / f"{label}-seed{seed}"
        text = spec_text(f"efficiency-{label}", _relative(data, folder),
                         ["persistence"] if label == "data" else [method], list(plan["train_days"]),
                         [seed], plan["config"], [entry], _comment("efficiency", command))
        if folder.exists():  # an interrupted measurement: its time and memory are lost
            shutil.rmtree(folder)
        _write_spec(folder, text)
        measure = _measure(folder, data_only=label == "data", plugins=plugins, progress=progress)
        measure.update(method=method, seed=seed)
        _append_rows(out / MEASURE_FILE, [measure])
    measures = _read_jsonl(out / MEASURE_FILE)
    found = efficiency_table(measures, methods)
    rows = [r for m in measures for r in m.get("rows", [])]
    blocks = [_header(f"Efficiency (Table 3): {entry['name']}", command, rows,
                      f"Every method pre-trains {cfg.max_epochs} epoch(s) and fine-tunes "
                      f"{cfg.finetune_epochs} epoch(s) on 3 target days; each (method, seed) in "
                      "its own process, one after another, on the same data."),
              "Peak memory = the process's maximum resident set size (everything: Python, torch, "
              "data, training); training time = pre-training + fine-tuning seconds from the "
              "result rows; ratios against fine-tuning.", found.markdown]
    if found.baseline_mb is not None:
        blocks.append(f"A process that only loads the data, prepares the tasks and builds the "
                      f"network (no training) peaks at {found.baseline_mb:.0f} MB.")
    from stbat_plugin.pipeline.plots import plot_efficiency

    return _finish("efficiency", out, blocks, rows,
                   lambda p: plot_efficiency(found.entries, p, baseline_mb=found.baseline_mb))


def _measure(folder: Path, *, data_only: bool, plugins: Sequence[str], progress: bool
             ) -> dict[str, Any]:
    """Run one child process on ``folder/spec.toml``; its peak memory and times."""
    cmd = [sys.executable, "-m", "stbat_plugin.pipeline.paper", "child", str(folder / SPEC_FILE),
           str(folder)] + (["--data-only"] if data_only else []) + (["--progress"] if progress
                                                                   else [])
    for p in plugins:
        cmd += ["--plugin", p]
    start = time.perf_counter()
    with open(folder / "child.out", "wb") as fo, open(folder / "child.err", "wb") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe)
        try:
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        err = (folder / "child.err").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the measurement process for {folder} failed (exit "
                           f"{proc.returncode}); its stderr ends with:\n{err}")
    rows = [] if data_only else _mean_rows(read_results(folder / RESULTS_FILE))
    info = json.loads((folder / "child.out").read_text().strip().splitlines()[-1] or "{}")
    return {"peak_mb": info["peak_mb"], "peak_from": info["peak_from"],
            "wall_seconds": wall,
            "pretrain_seconds": sum(r["pretrain_seconds"] for r in rows),
            "finetune_seconds": sum(r["seconds"] for r in rows),
            "cuda_peak_mb": info.get("cuda_peak_mb"), "rows": rows}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete lines of a JSON-lines file (a torn last line is ignored)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().split("\n")[:-1]:
        if line.strip():
            out.append(json.loads(line))
    return out


class EfficiencyTable(NamedTuple):
    """What :func:`efficiency_table` finds in the measurements."""

    entries: list[dict[str, Any]]  # one per method: peak memory, training time, runs
    baseline_mb: float | None  # peak memory of the data-only process, None if not measured
    markdown: str


def efficiency_table(measures: list[dict[str, Any]], methods: Sequence[str]
                     ) -> EfficiencyTable:
    """Plot entries, the data-only memory floor and the markdown table."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for m in measures:
        by[m["method"]].append(m)
    base = by.get("(data only)")
    baseline = float(np.mean([m["peak_mb"] for m in base])) if base else None
    entries: list[dict[str, Any]] = []
    for method in methods:
        ms = by.get(method)
        if not ms:
            continue
        peak = _stat([m["peak_mb"] for m in ms])
        train = _stat([m["pretrain_seconds"] + m["finetune_seconds"] for m in ms])
        pre = _stat([m["pretrain_seconds"] for m in ms])
        entries.append({"method": method, "peak_mb": peak.mean, "peak_mb_std": peak.std,
                        "seconds": train.mean, "seconds_std": train.std, "pretrain": pre.mean,
                        "n": peak.n})
    if not entries:
        return EfficiencyTable(entries, baseline, "No measurement yet.")
    ref: dict[str, Any] = next((e for e in entries if e["method"] == "finetune"), entries[0])
    lines = [f"| method | runs | peak memory (MB) | x {ref['method']} | above data-only (MB) | "
             f"training time (s) | x {ref['method']} | of which pre-training (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for e in entries:
        above = "-" if baseline is None else str(round(e["peak_mb"] - baseline))
        lines.append(f"| {e['method']} | {e['n']} | {e['peak_mb']:.0f} ± {e['peak_mb_std']:.0f} | "
                     f"{e['peak_mb'] / ref['peak_mb']:.2f} | {above} | "
                     f"{e['seconds']:.1f} ± {e['seconds_std']:.1f} | "
                     f"{e['seconds'] / ref['seconds']:.2f} | {e['pretrain']:.1f} |")
    return EfficiencyTable(entries, baseline, "\n".join(lines))


# ----------------------------------------------------------------------------- the CLI
def parse_sweep(text: str) -> tuple[str, tuple[float, ...]]:
    """``FIELD=V1,V2,...`` (e.g. ``embed_dim=8,32``) of ``stbat sensitivity --sweep``."""
    name, sep, values = text.partition("=")
    try:
        parsed = tuple(float(v) for v in values.split(",") if v.strip())
    except ValueError:
        parsed = ()
    if not sep or name.strip() not in SWEEPS or not parsed:
        raise argparse.ArgumentTypeError(f"expected FIELD=V1,V2 with FIELD one of {list(SWEEPS)}, "
                                         f"e.g. embed_dim=8,32 (got {text!r})")
    field_type = int if name.strip() == "embed_dim" else float
    return name.strip(), tuple(field_type(v) for v in parsed)


def run_command(args: argparse.Namespace) -> PaperResult:
    """``stbat ablation|sensitivity|scarcity|efficiency``: parsed CLI arguments -> the run."""
    from stbat_plugin._registry import registry_with_plugins

    kind, overrides = args.command, given_options(args)
    options: dict[str, Any] = {"out": args.out, "data_dir": args.data_dir, "seeds": args.seeds}
    common = {"data_dir": args.data_dir, "seeds": args.seeds, "overrides": overrides,
              "progress": not args.quiet}
    if kind == "scarcity":
        options.update(tasks=args.tasks, days=args.days, methods=args.methods)
    else:
        options["task"] = args.task
    if kind == "sensitivity":
        options["sweep"] = args.sweep
    if kind == "efficiency":
        options["methods"] = args.methods
    if kind == "sensitivity" and args.sweep:
        options["sweep"] = [f"{k}={','.join(_value_name(v) for v in vals)}" for k, vals in args.sweep]
    command = command_line(kind, options, overrides, repeat=("sweep",))
    if kind == "efficiency":
        return efficiency(args.out, task=args.task, methods=args.methods, plugins=args.plugin,
                          command=command, **common)
    common["registry"] = registry_with_plugins(args.plugin)
    if kind == "ablation":
        return ablation(args.out, task=args.task, command=command, **common)
    if kind == "sensitivity":
        return sensitivity(args.out, task=args.task, command=command,
                           sweeps=dict(args.sweep) if args.sweep else None, **common)
    return scarcity(args.out, tasks=args.tasks, days=args.days, methods=args.methods,
                    command=command, **common)


# ----------------------------------------------------------------------------- the child
#: ``ru_maxrss`` unit: bytes on macOS, KiB on Linux
_RSS_UNIT = 1 if sys.platform == "darwin" else 1024


def _own_peak_mb() -> tuple[float, str]:
    """This process's peak resident set size in MB, and where it was read.

    ``VmHWM`` of ``/proc/self/status`` (Linux) is the peak of this process's own memory
    map. ``ru_maxrss`` is the fallback: after ``fork`` + ``exec`` it also counts the parent's
    resident memory at the fork, so it can only over-state a child's peak.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "VmHWM"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _RSS_UNIT / 2**20, "ru_maxrss"


def _child(argv: list[str]) -> int:
    """``python -m stbat_plugin.pipeline.paper child SPEC OUT [--data-only]``: one measurement."""
    p = argparse.ArgumentParser(prog="python -m stbat_plugin.pipeline.paper")
    p.add_argument("what", choices=["child"])
    p.add_argument("spec")
    p.add_argument("out")
    p.add_argument("--data-only", action="store_true")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--plugin", action="append", default=[])
    args = p.parse_args(argv)
    import torch

    from stbat_plugin._registry import registry_with_plugins
    from stbat_plugin.pipeline.experiment import load_spec

    registry = registry_with_plugins(args.plugin)
    spec = load_spec(args.spec)
    if spec.data_dir is None:
        raise ValueError(f"{args.spec}: no data_dir")
    if args.data_only:
        from stbat_plugin.pipeline import api
        from stbat_plugin.pipeline.tasks import target_task

        task = spec.tasks[0]
        config = spec.config(task, spec.variants()[0])
        from stbat_plugin.pipeline.methods import build_network

        api.prepare_sources(spec.data_dir, list(task.sources), config)
        for d in task.train_days:
            target_task(api.load(spec.data_dir, task.target, config.target_span), d, config)
        build_network(config, registry)  # imports the backbone's plugin and libraries
    else:
        run_experiment(args.spec, args.out, progress=args.progress, registry=registry)
    info: dict[str, Any] = dict(zip(("peak_mb", "peak_from"), _own_peak_mb(), strict=True))
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        info["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(info))
    return 0


if __name__ == "__main__":  # pragma: no cover (run as the child of `efficiency`)
    raise SystemExit(_child(sys.argv[1:]))
