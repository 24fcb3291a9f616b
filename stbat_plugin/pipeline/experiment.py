"""Experiments from a TOML spec: tasks x grid variants x methods x seeds, resumable.

``stbat experiment SPEC --out OUT`` runs every unit of work of a spec and appends its
result rows to ``OUT/results.jsonl`` as soon as they exist (one ``write`` + ``fsync`` per
batch), so a killed run loses at most the batch in progress; rerunning the same command
skips what is done. Pre-trained networks are cached in ``OUT/cache/``, so a run killed
during fine-tuning does not pre-train again. Variants that differ only in settings of the
adaptation to the target (``config.ADAPTATION_ONLY``: calibration, the fine-tuning learning
rate(s) and epochs) share one cached pre-training per (task, method, seed).

The spec::

    [experiment]
    name = "study"
    data_dir = "../data"          # relative to the spec file's folder; --data-dir overrides
    methods = ["stbat", "finetune", "persistence"]
    train_days = [3, 0]
    seeds = 5                     # a count (seeds 0..4) or a list [0, 3]
    [defaults]                    # TransferConfig fields for every task
    backbone_kwargs = { channels = 32, hidden = 64 }
    [grid]                        # optional: every combination is one variant
    normalize = ["none", "revin"]
    [[task]]
    name = "nyc2mel"
    sources = ["nyc_bike", "nyc_taxi"]
    target = "melbourne_pedestrian"
    config = { source_span = "2019-01-01:2019-04-30" }   # per-task overrides
    # methods = [...], train_days = [...]                # optional per-task overrides
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import stbat_plugin
from stbat_plugin.data import span_of
from stbat_plugin.pipeline import api
from stbat_plugin.pipeline.config import ADAPTATION_ONLY, TransferConfig, setting_fields
from stbat_plugin.pipeline.io import atomic_write, atomic_write_text, exclusive_folder
from stbat_plugin.pipeline.method_registry import get_method
from stbat_plugin.pipeline.preflight import preflight_methods
from stbat_plugin.pipeline.results import append_rows as _append_rows
from stbat_plugin.pipeline.results import read_results
from stbat_plugin.pipeline.runfolder import check_writable
from stbat_plugin.pipeline.tasks import CityTask, target_task

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ExperimentSpec", "TaskSpec", "Variant", "Unit", "ExperimentSummary", "load_spec",
           "plan", "run_experiment", "read_results", "RESULTS_FILE", "SPEC_FILE"]

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
SPEC_FILE = "spec.toml"
_SECTIONS = ("experiment", "defaults", "grid", "task")
_EXPERIMENT_KEYS = ("name", "data_dir", "methods", "train_days", "seeds")
_TASK_KEYS = ("name", "sources", "target", "config", "methods", "train_days")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CONFIG_FIELDS = {f.name: str(f.type) for f in setting_fields()}


# ----------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class TaskSpec:
    """One cross-city task of a spec: sources -> target, with its methods and settings."""

    name: str
    sources: tuple[str, ...]
    target: str
    methods: tuple[str, ...]
    train_days: tuple[int, ...]
    config: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Variant:
    """One combination of the ``[grid]`` values; ``label`` is e.g. ``normalize=revin,window=24``."""

    label: str
    options: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass
class ExperimentSpec:
    """A validated spec: every (task, variant) config has already been built once."""

    path: Path
    name: str
    data_dir: Path | None
    seeds: list[int]
    defaults: dict[str, Any]
    grid: dict[str, list[Any]]
    tasks: list[TaskSpec]
    sha256: str

    def variants(self) -> list[Variant]:
        """Every combination of the grid values, in spec order (``default`` without a grid)."""
        if not self.grid:
            return [Variant("default", {})]
        keys = list(self.grid)
        return [Variant(",".join(f"{k}={_show(v)}" for k, v in zip(keys, combo, strict=True)),
                        dict(zip(keys, combo, strict=True)))
                for combo in itertools.product(*self.grid.values())]

    def config(self, task: TaskSpec, variant: Variant) -> TransferConfig:
        """The run settings of a task in a variant: defaults, then the task's, then the grid's."""
        return TransferConfig.from_dict({**self.defaults, **task.config, **variant.options})


@dataclass(frozen=True)
class Unit:
    """One unit of work: a method and seed on a task and variant, over its train-days."""

    task: TaskSpec
    variant: Variant
    method: str
    seed: int
    train_days: tuple[int, ...]
    config: TransferConfig = field(hash=False)

    @property
    def label(self) -> str:
        """The method as the result rows name it (``stbat (w/o POI)`` for an ablation)."""
        return api.method_label(self.method, self.config)

    def key(self, days: int) -> tuple[str, str, str, int, int]:
        """``(task, variant, method, train_days, seed)``: what identifies a batch of rows."""
        return (self.task.name, self.variant.label, self.label, days, self.seed)

    @property
    def cache_name(self) -> str:
        """File name of this unit's pre-trained network in ``OUT/cache``: named by the
        variant's options that pre-training sees (adaptation-only options are left out, so
        variants that differ only in them share the file)."""
        options = {k: v for k, v in self.variant.options.items() if k not in ADAPTATION_ONLY}
        label = self.variant.label if options == self.variant.options else (
            ",".join(f"{k}={_show(v)}" for k, v in options.items()) or "default")
        variant = re.sub(r"[^A-Za-z0-9._=,+-]", "_", label)
        if variant != label:  # keep names of different variants apart
            variant += "-" + hashlib.sha256(label.encode()).hexdigest()[:8]
        return f"{self.task.name}__{variant}__{self.method}__seed{self.seed}.pt"


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True,
                                                           separators=(",", ":"))


def _error(path: Path, key: str, problem: str, fix: str) -> ValueError:
    """A spec error naming the file, the key, what was wrong and how to fix it."""
    return ValueError(f"spec {path}: {key}: {problem}; {fix}")


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and validate a TOML spec; every (task, variant) config is built once.

    Raises:
        ValueError: naming the file, the key and the fix, for any problem of the spec.
        OSError: the file cannot be read.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"spec {path}: not valid TOML ({exc}); see the format in "
                         "stbat_plugin/pipeline/experiment.py") from exc
    _check_keys(path, "the spec", doc, _SECTIONS, "top-level sections")
    exp = _table(path, doc, "experiment", required=True)
    _check_keys(path, "[experiment]", exp, _EXPERIMENT_KEYS, "keys")
    defaults = _config_table(path, "[defaults]", _table(path, doc, "defaults"))
    grid = _grid(path, _table(path, doc, "grid"), defaults)
    tasks = _tasks(path, doc.get("task"), exp, grid)
    spec = ExperimentSpec(path, _name(path, exp.get("name", path.stem)), _data_dir(path, exp),
                          _seeds(path, exp.get("seeds", 1)), defaults, grid, tasks,
                          hashlib.sha256(raw).hexdigest())
    _check_configs(spec)
    return spec


def _check_keys(path: Path, where: str, table: dict[str, Any], known: tuple[str, ...],
                what: str) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise _error(path, f"{where} {key!r}", f"unknown key (known {what}: {list(known)})",
                         f"{hint}remove or rename it")


def _table(path: Path, doc: dict[str, Any], name: str, required: bool = False) -> dict[str, Any]:
    value = doc.get(name)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise _error(path, f"[{name}]", f"expected a table, got {value!r}",
                     f"add a [{name}] section with its keys")
    return value


def _name(path: Path, value: Any, key: str = "[experiment] name") -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise _error(path, key, f"expected a name of letters, digits, '_', '.' or '-', got "
                     f"{value!r}", 'use e.g. "nyc2mel" (names become file names)')
    return value


def _data_dir(path: Path, exp: dict[str, Any]) -> Path | None:
    value = exp.get("data_dir")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _error(path, "[experiment] data_dir", f"expected a folder path, got {value!r}",
                     'use e.g. data_dir = "../data" (relative to the spec file)')
    return (path.parent / value).resolve()


def _seeds(path: Path, value: Any) -> list[int]:
    fix = "use a count like seeds = 5 (seeds 0..4) or a list like seeds = [0, 3]"
    if _is_int(value):
        if value < 1:
            raise _error(path, "[experiment] seeds", f"expected a count >= 1, got {value}", fix)
        return list(range(value))
    if isinstance(value, list) and value and all(_is_int(v) and 0 <= v < 2**32 for v in value):
        if len(set(value)) != len(value):
            raise _error(path, "[experiment] seeds", f"duplicate seeds in {value}", fix)
        return list(value)
    raise _error(path, "[experiment] seeds", f"expected a count >= 1 or a non-empty list of "
                 f"seeds from 0 to {2**32 - 1}, got {value!r}", fix)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _config_table(path: Path, where: str, table: dict[str, Any]) -> dict[str, Any]:
    """Check that every key of ``table`` is a TransferConfig field with a value of its type."""
    for key, value in table.items():
        if key not in _CONFIG_FIELDS:
            close = difflib.get_close_matches(key, list(_CONFIG_FIELDS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise _error(path, f"{where} {key!r}", "not a TransferConfig field",
                         f"{hint}known fields: {sorted(_CONFIG_FIELDS)}")
        if not _type_ok(_CONFIG_FIELDS[key], value):
            raise _error(path, f"{where} {key!r}", f"expected a value of type "
                         f"{_CONFIG_FIELDS[key]}, got {value!r}", "give a value of that type")
    return dict(table)


_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,),
                                       "bool": (bool,), "dict": (dict,)}


def _type_ok(annotation: str, value: Any) -> bool:
    """Whether ``value`` fits an annotation like ``int``, ``str | None`` or ``dict[str, Any]``."""
    for part in annotation.split("|"):
        base = part.strip().split("[")[0]
        allowed = _TYPES.get(base)
        if base == "None":
            continue
        if allowed is None:
            return True  # an annotation this check does not know: TransferConfig judges
        if isinstance(value, bool) and base != "bool":
            continue
        if isinstance(value, allowed):
            return True
    return False


def _grid(path: Path, table: dict[str, Any], defaults: dict[str, Any]) -> dict[str, list[Any]]:
    fix = 'give a non-empty list of distinct values, e.g. normalize = ["none", "revin"]'
    for key, values in table.items():
        if not isinstance(values, list) or not values:
            raise _error(path, f"[grid] {key!r}", f"expected a non-empty list, got {values!r}", fix)
        if len({_show(v) for v in values}) != len(values):
            raise _error(path, f"[grid] {key!r}", f"duplicate values in {values}", fix)
        if key in defaults:
            raise _error(path, f"[grid] {key!r}", "also set in [defaults], where it would never "
                         "apply", f"remove {key!r} from [defaults]")
        for value in values:
            _config_table(path, "[grid]", {key: value})
    return dict(table)


def _tasks(path: Path, raw: Any, exp: dict[str, Any], grid: dict[str, list[Any]]
           ) -> list[TaskSpec]:
    if not isinstance(raw, list) or not raw:
        raise _error(path, "[[task]]", f"expected at least one [[task]] table, got {raw!r}",
                     'add [[task]] with name, sources = ["..."] and target = "..."')
    tasks: list[TaskSpec] = []
    for i, entry in enumerate(raw):
        task = _task(path, f"[[task]] #{i + 1}", entry, exp, grid)
        if any(t.name == task.name for t in tasks):
            raise _error(path, f"[[task]] #{i + 1} name", f"duplicate task name {task.name!r}",
                         "give every task its own name")
        tasks.append(task)
    return tasks


def _task(path: Path, where: str, entry: Any, exp: dict[str, Any],
          grid: dict[str, list[Any]]) -> TaskSpec:
    if not isinstance(entry, dict):
        raise _error(path, where, f"expected a table, got {entry!r}", "write it as [[task]]")
    _check_keys(path, where, entry, _TASK_KEYS, "task keys")
    name = _name(path, entry.get("name"), f"{where} name")
    where = f"[[task]] {name!r}"
    sources = _names(path, f"{where} sources", entry.get("sources"), 'sources = ["nyc_bike"]')
    target = entry.get("target")
    if not isinstance(target, str) or not target:
        raise _error(path, f"{where} target", f"expected a city name, got {target!r}",
                     'use e.g. target = "melbourne_pedestrian"')
    if target in sources:
        raise _error(path, f"{where} sources", f"the target {target!r} is also a source",
                     "remove it from sources (a transfer task predicts an unseen city)")
    config = _config_table(path, f"{where} config", _table(path, entry, "config"))
    for key in config:
        if key in grid:
            raise _error(path, f"{where} config {key!r}", "also a [grid] key, where the grid "
                         "value would always win", f"remove {key!r} from the task's config")
    methods = _methods(path, where, entry.get("methods", exp.get("methods")))
    days = _train_days(path, where, entry.get("train_days", exp.get("train_days")))
    return TaskSpec(name, tuple(sources), target, tuple(methods), tuple(days), config)


def _names(path: Path, key: str, value: Any, example: str) -> list[str]:
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, str) and v for v in value)):
        raise _error(path, key, f"expected a non-empty list of names, got {value!r}",
                     f"use e.g. {example}")
    if len(set(value)) != len(value):
        raise _error(path, key, f"duplicate names in {value}", "list each name once")
    return list(value)


def _methods(path: Path, where: str, value: Any) -> list[str]:
    key = f"{where} methods (or [experiment] methods)"
    names = _names(path, key, value, 'methods = ["stbat", "finetune"]')
    for name in names:
        try:
            get_method(name)
        except ValueError as exc:
            raise _error(path, key, str(exc), "fix the method name") from None
    return names


def _train_days(path: Path, where: str, value: Any) -> list[int]:
    key = f"{where} train_days (or [experiment] train_days)"
    days = [value] if _is_int(value) else value
    if (not isinstance(days, list) or not days
            or not all(_is_int(d) and d >= 0 for d in days) or len(set(days)) != len(days)):
        raise _error(path, key, f"expected distinct integers >= 0, got {value!r}",
                     "use e.g. train_days = [3, 0] (3-day few-shot and zero-shot)")
    return list(days)


def _check_configs(spec: ExperimentSpec) -> None:
    """Build every (task, variant) config and check its methods and spans, before any run."""
    for task, variant in itertools.product(spec.tasks, spec.variants()):
        where = f"[[task]] {task.name!r}, variant {variant.label!r}"
        try:
            config = spec.config(task, variant)
            api._check_methods(list(task.methods), list(task.train_days), config)
        except ValueError as exc:  # the types were checked when the spec was read
            raise _error(spec.path, where, str(exc), "fix the value in [defaults], [grid] or "
                         "the task's config") from None
        for key, cities in (("source_span", task.sources), ("target_span", [task.target])):
            try:
                for city in cities:
                    span_of(getattr(config, key), city)
            except ValueError as exc:
                raise _error(spec.path, f"{where} {key}", str(exc), "fix the span in "
                             "[defaults], [grid] or the task's config") from None


# ----------------------------------------------------------------------------- the plan
def plan(spec: ExperimentSpec, tasks: list[str] | None = None,
         seeds: list[int] | None = None) -> list[Unit]:
    """Every unit of work, in run order: seed, task, variant, method.

    Seeds come first, so that a run stopped early holds every task and variant for the
    seeds it finished (a balanced partial result), not some tasks only.

    A unit covers the train-days its method can run (zero-shot only where it supports it).
    ``tasks`` keeps only the named tasks and ``seeds`` only these seeds of the spec (e.g.
    to share a spec between processes).
    """
    names = [t.name for t in spec.tasks]
    unknown = sorted(set(tasks or ()) - set(names))
    if unknown:
        raise ValueError(f"spec {spec.path}: unknown task(s) {unknown} in --tasks; the spec has "
                         f"{names}")
    if seeds is not None and (not seeds or not set(seeds) <= set(spec.seeds)):
        raise ValueError(f"spec {spec.path}: --seeds {seeds} must be a non-empty subset of the "
                         f"spec's seeds {spec.seeds}")
    units = []
    chosen = [t for t in spec.tasks if tasks is None or t.name in tasks]
    configs = {(t.name, v.label): spec.config(t, v) for t in chosen for v in spec.variants()}
    chosen_seeds = [s for s in spec.seeds if seeds is None or s in seeds]
    for seed, task, variant in itertools.product(chosen_seeds, chosen, spec.variants()):
        for method in task.methods:
            zero_shot = get_method(method).zero_shot
            days = tuple(d for d in task.train_days if d > 0 or zero_shot)
            units.append(Unit(task, variant, method, seed, days, configs[(task.name, variant.label)]))
    return units


def _done_keys(rows: list[dict[str, Any]]) -> set[tuple[str, str, str, int, int]]:
    return {(r["task"], r["variant"], r["method"], r["train_days"], r["seed"]) for r in rows
            if {"task", "variant", "method", "train_days", "seed"} <= r.keys()}


# ----------------------------------------------------------------------------- running
@dataclass
class ExperimentSummary:
    """What a call of :func:`run_experiment` did."""

    out: Path
    results_path: Path
    report_path: Path
    units: int
    units_run: int
    units_skipped: int
    rows_written: int
    seconds: float


@dataclass
class _TaskData:
    """Source data and target tasks of one (task, variant), shared by its units."""

    sources: api.SourceData | None = None
    targets: dict[int, CityTask] = field(default_factory=dict)


class _Run:
    """The state of one experiment run: output folder, done batches, cached data."""

    def __init__(self, spec: ExperimentSpec, out: Path, data_dir: Path, registry: Any,
                 progress: bool) -> None:
        self.spec, self.out, self.data_dir = spec, out, data_dir
        self.registry, self.progress = registry, progress
        self.results = out / RESULTS_FILE
        rows = read_results(self.results, repair=True)
        self.done = _done_keys(rows)
        #: rows of methods whose result does not depend on the seed, by (task, variant, label, days)
        self.unseeded: dict[tuple, list[dict[str, Any]]] = {}
        for row in rows:
            if not get_method(row["method"].split(" ")[0]).seeded:
                self.unseeded.setdefault(_unseeded_key(row), []).append(row)
        self.data: dict[tuple[str, str], _TaskData] = {}
        self.rows_written = 0
        self.provenance = {"spec": {"file": spec.path.name, "sha256": spec.sha256},
                           "version": stbat_plugin.__version__, "git_commit": git_commit()}

    def task_data(self, unit: Unit) -> _TaskData:
        """The (task, variant)'s data; units come grouped, so only the current one is kept."""
        key = (unit.task.name, unit.variant.label)
        if key not in self.data:
            self.data = {key: _TaskData()}
        return self.data[key]

    def sources(self, unit: Unit) -> api.SourceData:
        """Prepared sources when the task has a pre-trained method (their descriptor kind
        is in every row of the task, as in :func:`api.transfer`), else none."""
        data = self.task_data(unit)
        if data.sources is None:
            if any(get_method(m).pretrains for m in unit.task.methods):
                data.sources = api.prepare_sources(self.data_dir, list(unit.task.sources),
                                                   unit.config)
            else:
                data.sources = api.SourceData([], {}, "none")
        return data.sources

    def targets(self, unit: Unit, days: list[int]) -> dict[int, CityTask]:
        """Target tasks of the given train-days (each built once per (task, variant))."""
        data = self.task_data(unit)
        missing = [d for d in days if d not in data.targets]
        if missing:
            city = api.load(self.data_dir, unit.task.target, unit.config.target_span)
            data.targets.update({d: target_task(city, d, unit.config) for d in missing})
        return {d: data.targets[d] for d in days}

    def row_writer(self, unit: Unit, kind: str) -> Callable[[list[dict[str, Any]]], None]:
        """``on_rows`` of a unit: complete each batch of rows and append it to the file."""
        base = {"task": unit.task.name, "variant": unit.variant.label,
                **api._row_base(list(unit.task.sources), unit.task.target, unit.config, kind)}
        extra = {"options": unit.variant.options, **self.provenance}

        def write(rows: list[dict[str, Any]]) -> None:
            full = [{**base, **r, **extra} for r in rows]
            _append_rows(self.results, full)
            self.rows_written += len(rows)
            if rows:
                self.done.add(unit.key(rows[0]["train_days"]))
                if not get_method(unit.method).seeded:
                    self.unseeded.setdefault(_unseeded_key(full[0]), []).extend(full)

        return write

    def _copy_unseeded(self, unit: Unit, days: list[int]) -> list[int]:
        """Write copies of an unseeded method's rows from another seed; the days still to run."""
        left = []
        for d in days:
            rows = self.unseeded.get((unit.task.name, unit.variant.label, unit.label, d))
            if not rows:
                left.append(d)
                continue
            source_seed = rows[0]["seed"]
            copies = [{**r, "seed": unit.seed, "info": {**r["info"], "copied_from_seed": source_seed}}
                      for r in rows if r["seed"] == source_seed]
            _append_rows(self.results, copies)
            self.rows_written += len(copies)
            self.done.add(unit.key(d))
        return left

    # ------------------------------------------------------------------ cached networks
    def cache_path(self, unit: Unit) -> Path:
        """Where the unit's pre-trained network is cached."""
        return self.out / "cache" / unit.cache_name

    def cached_network(self, unit: Unit) -> tuple[nn.Module | None, dict[int, dict[str, Any]]]:
        """The unit's pre-trained network from ``OUT/cache`` and its per-train-days target
        info, or ``(None, {})`` (not cached / no pre-training)."""
        path = self.cache_path(unit)
        if not get_method(unit.method).pretrains or not path.is_file():
            return None, {}
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            net = get_method(unit.method).network(unit.config, self.registry)
            net.load_state_dict(payload["state_dict"])
            info = {int(k): v for k, v in payload["target_info"].items()}
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            raise ValueError(f"cannot load the cached pre-trained network {path} ({exc}); "
                             "delete that file to pre-train again") from exc
        log.info("%s: pre-trained network from the cache %s", unit.label, path)
        return net.to(unit.config.device), info

    def cache_saver(self, unit: Unit) -> Callable[[nn.Module, dict[int, dict[str, Any]]], None]:
        """``on_pretrained`` of a unit: save the network's state and target info atomically."""
        path = self.cache_path(unit)

        def save(net: nn.Module, info: dict[int, dict[str, Any]]) -> None:
            payload = {"state_dict": net.state_dict(),
                       "target_info": {str(k): v for k, v in info.items()}}
            atomic_write(path, lambda fh: torch.save(payload, fh))

        return save

    # ------------------------------------------------------------------ one unit
    def run_unit(self, unit: Unit, days: list[int]) -> None:
        """Run ``unit`` on the given (not yet done) train-days; rows go to the file.

        A method whose result does not depend on the seed (``Method.seeded`` False, e.g.
        ARIMA) runs once; its rows are copied to the other seeds (``info.copied_from_seed``).
        """
        if not get_method(unit.method).seeded:
            days = self._copy_unseeded(unit, days)
            if not days:
                return
        src = self.sources(unit)
        pretrained, info = self.cached_network(unit)
        api.run_method(unit.method, unit.seed, src, self.targets(unit, days), unit.config,
                       progress=self.progress, registry=self.registry, pretrained=pretrained,
                       pretrained_info=info, on_pretrained=self.cache_saver(unit),
                       on_rows=self.row_writer(unit, src.kind))


def _unseeded_key(row: dict[str, Any]) -> tuple:
    return (row["task"], row["variant"], row["method"], row["train_days"])


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the repository holding the package, or None (never fails)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(stbat_plugin.__file__).parent,
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def _prepare_out(spec: ExperimentSpec, out: Path) -> None:
    """Create ``out`` and copy the spec there; refuse a folder of another spec."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory; choose another path")
    copy = out / SPEC_FILE
    text = spec.path.read_bytes()
    if copy.exists():
        if copy.read_bytes() != text:
            raise ValueError(f"--out {out} holds the results of another spec ({copy} differs from "
                             f"{spec.path}); resuming is only for the same spec: choose another "
                             "--out, or restore the spec it was started with")
        return
    if (out / RESULTS_FILE).exists():
        raise ValueError(f"--out {out} has a {RESULTS_FILE} but no {SPEC_FILE}; it was not made by "
                         "`stbat experiment` with this spec: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(copy, text.decode("utf-8"))


def _resolve_data_dir(spec: ExperimentSpec, data_dir: str | Path | None) -> Path:
    """``--data-dir`` or the spec's ``data_dir``; every city of the spec must be there."""
    chosen = Path(data_dir) if data_dir is not None else spec.data_dir
    if chosen is None:
        raise ValueError(f"spec {spec.path}: [experiment] data_dir: not set and no --data-dir "
                         'given; add data_dir = "path/to/data" to [experiment] or pass --data-dir')
    for task in spec.tasks:
        for city in (*task.sources, task.target):
            if not (chosen / f"{city}.npz").is_file():
                names = sorted(p.stem for p in chosen.glob("*.npz")) if chosen.is_dir() else []
                raise ValueError(f"spec {spec.path}: [[task]] {task.name!r}: no city {city!r} in "
                                 f"{chosen} (cities there: {names or 'none'}); fix the name or "
                                 "the data folder")
    return chosen


def check_units(spec: ExperimentSpec, units: list[Unit], data_dir: Path, registry: Any = None,
                done: set[tuple[str, str, str, int, int]] | frozenset = frozenset()
                ) -> dict[tuple[str, str], _TaskData]:
    """Check, before any unit runs, what can fail without training, for every (task, variant)
    with work left: every city file of the task, the target's splits at each of its
    train-days (windows, observed cells), and one forward pass of each pre-trained method's
    network on every city (:func:`preflight_methods`). A problem in the last task then fails
    in seconds, not after the units before it have trained.

    Returns the data of the (task, variant) that runs first (checked last), for the run to
    keep instead of preparing it again.
    """
    groups: dict[tuple[str, str], list[Unit]] = {}
    for unit in units:
        if any(unit.key(d) not in done for d in unit.train_days):
            groups.setdefault((unit.task.name, unit.variant.label), []).append(unit)
    data = _TaskData()
    for (name, variant), group in reversed(groups.items()):
        task, config = group[0].task, group[0].config
        methods = list(dict.fromkeys(u.method for u in group))
        try:
            city = api.load(data_dir, task.target, config.target_span)
            targets = {d: target_task(city, d, config)
                       for d in dict.fromkeys(d for u in group for d in u.train_days)}
            if any(get_method(m).pretrains for m in methods):
                sources = api.prepare_sources(data_dir, list(task.sources), config)
            else:  # not trained on, but a city of the spec is still checked
                for source in task.sources:
                    api.load(data_dir, source, config.source_span)
                sources = api.SourceData([], {}, "none")
            preflight_methods(methods, [*sources.tasks, *targets.values()], config, registry)
        except ValueError as exc:
            raise ValueError(f"spec {spec.path}: [[task]] {name!r}, variant {variant!r}: {exc}"
                             ) from exc
        data = _TaskData(sources, targets)
    return {(name, variant): data} if groups else {}


def run_experiment(spec_path: str | Path, out: str | Path, *, data_dir: str | Path | None = None,
                   progress: bool = False, registry: Any = None,
                   tasks: list[str] | None = None,
                   seeds: list[int] | None = None) -> ExperimentSummary:
    """Run (or resume) every unit of a spec; rows go to ``out/results.jsonl``, then a report.

    Args:
        spec_path: the TOML spec (see the module docstring).
        out: output folder: ``results.jsonl``, ``spec.toml``, ``cache/``, ``report.md``.
        data_dir: overrides the spec's ``data_dir``.
        progress: show progress bars of training.
        registry: backbone registry (default: the installed plugins).
        tasks: run only these tasks of the spec (default: all). Two processes can share a
            spec with different ``tasks`` and ``out``; ``stbat report OUT1 OUT2`` merges them.
        seeds: run only these of the spec's seeds (default: all).
    """
    start, spec, out = time.perf_counter(), load_spec(spec_path), Path(out)
    units = plan(spec, tasks, seeds)  # unknown task names or seeds fail before anything is written
    for device in sorted({u.config.device for u in units}):
        api.check_device(device)
    chosen = _resolve_data_dir(spec, data_dir)
    check_writable(out)
    first = check_units(spec, units, chosen, registry,
                        _done_keys(read_results(out / RESULTS_FILE)))
    _prepare_out(spec, out)
    with exclusive_folder(out, "`stbat experiment`"):
        run = _Run(spec, out, chosen, registry, progress)
        run.data = first
        return _run_units(run, start, tasks, seeds)


def _run_units(run: _Run, start: float, tasks: list[str] | None = None,
               seeds: list[int] | None = None) -> ExperimentSummary:
    """Every unit of the run's spec not done yet, then ``report.md``."""
    from stbat_plugin.pipeline.report import write_report

    units, ran = plan(run.spec, tasks, seeds), 0
    for k, unit in enumerate(units, 1):
        name = f"[{k}/{len(units)}] {unit.task.name} {unit.variant.label} {unit.label} seed {unit.seed}"
        days = [d for d in unit.train_days if unit.key(d) not in run.done]
        if not days:
            log.info("%s: already done", name)
            continue
        began = time.perf_counter()
        run.run_unit(unit, days)
        ran += 1
        log.info("%s: done in %.1f s", name, time.perf_counter() - began)
    report_path = write_report(run.out)
    return ExperimentSummary(run.out, run.results, report_path, len(units), ran, len(units) - ran,
                             run.rows_written, time.perf_counter() - start)
