"""``OUT/report.md`` of an experiment: per task and variant, methods x train-days tables,
a paired ``stbat`` vs ``finetune`` comparison (with a Wilcoxon signed-rank test over
per-region errors) and what is not complete yet.

SciPy is imported only when a test is computed, never by ``import stbat_plugin``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stbat_plugin.pipeline.experiment import RESULTS_FILE, SPEC_FILE, load_spec, plan, read_results
from stbat_plugin.pipeline.io import atomic_write_text
from stbat_plugin.pipeline.results import _fmt, _order

__all__ = ["PairedComparison", "paired_comparisons", "report", "write_report", "REPORT_FILE"]

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
BALANCE_PNG = "balance.png"

#: (method label, train days) -> seeds, per (task, variant)
Expected = dict[tuple[str, str], dict[tuple[str, int], set[int]]]


@dataclass
class PairedComparison:
    """``stbat`` vs ``finetune`` on one task, variant and train-days setting.

    ``pairs`` are (seed, channel) pairs of RMSE (channel ``mean`` excluded): ``mean_diff``
    is the mean of stbat - finetune (negative: stbat better), ``wins`` counts pairs where
    stbat is lower. The Wilcoxon test runs over (seed, channel, region) pairs of
    per-region RMSE (``region_pairs``; regions unscored by either side dropped);
    ``pvalue`` is None when it cannot run, with the ``reason``.
    """

    task: str
    variant: str
    train_days: int
    stbat: str
    pairs: int
    mean_diff: float
    wins: int
    losses: int
    ties: int
    region_pairs: int
    pvalue: float | None
    reason: str = ""


def _base(label: str) -> str:
    return label.split(" ")[0]


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Rows by (task, variant), in order of first appearance."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r.get("task", "?"), r.get("variant", "default")), []).append(r)
    return groups


def _region_pairs(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[float, float]]:
    """(stbat, finetune) per-region RMSE of two rows, regions unscored by either dropped."""
    ra, rb = (r.get("regions", {}).get("rmse") or [] for r in (a, b))
    if len(ra) != len(rb):
        raise ValueError(f"rows of task {a.get('task')!r} seed {a.get('seed')} channel "
                         f"{a.get('channel')!r} have {len(ra)} vs {len(rb)} regions; the results "
                         "file mixes different targets: rerun into a fresh --out")
    return [(x, y) for x, y in zip(ra, rb, strict=True) if x is not None and y is not None]


def _compare(group: list[dict[str, Any]], days: int, stbat: str) -> PairedComparison | None:
    """The paired comparison of one setting, or None when finetune has no such rows."""
    def by_key(label: str) -> dict[tuple[int, str], dict[str, Any]]:
        return {(r["seed"], r["channel"]): r for r in group
                if r["method"] == label and r["train_days"] == days and r["channel"] != "mean"}

    a, b = by_key(stbat), by_key("finetune")
    if not b:
        return None
    keys = sorted(a.keys() & b.keys())
    diffs = [a[k]["rmse"] - b[k]["rmse"] for k in keys]
    regions = [p for k in keys for p in _region_pairs(a[k], b[k])]
    pvalue, reason = _wilcoxon(regions)
    first = group[0]
    return PairedComparison(
        first.get("task", "?"), first.get("variant", "default"), days, stbat, len(keys),
        sum(diffs) / len(diffs) if diffs else float("nan"), sum(d < 0 for d in diffs),
        sum(d > 0 for d in diffs), sum(d == 0 for d in diffs), len(regions), pvalue, reason)


def _wilcoxon(pairs: list[tuple[float, float]]) -> tuple[float | None, str]:
    """Two-sided Wilcoxon signed-rank p-value of paired values (SciPy's), or why there is none."""
    nonzero = sum(x != y for x, y in pairs)
    if nonzero < 2:
        return None, (f"only {nonzero} non-zero region pair(s) of {len(pairs)}; "
                      "the test needs at least 2")
    from scipy.stats import wilcoxon

    result = wilcoxon([x for x, _ in pairs], [y for _, y in pairs], alternative="two-sided")
    return float(result.pvalue), ""


def paired_comparisons(rows: list[dict[str, Any]]) -> list[PairedComparison]:
    """``stbat`` (or its ablation) vs ``finetune`` for every task, variant and train-days."""
    found = []
    for group in _groups(rows).values():
        stbat = [m for m in dict.fromkeys(r["method"] for r in group) if _base(m) == "stbat"]
        for label in stbat:
            for days in sorted({r["train_days"] for r in group}, reverse=True):
                if any(r["method"] == label and r["train_days"] == days for r in group):
                    comparison = _compare(group, days, label)
                    if comparison is not None:
                        found.append(comparison)
    return found


# ----------------------------------------------------------------------------- tables
def _seeds_cell(seeds: dict[int, set[int]]) -> str:
    counts = list(dict.fromkeys(len(s) for s in seeds.values()))
    return "/".join(str(c) for c in counts)


def method_table(rows: list[dict[str, Any]]) -> str:
    """Methods x train-days (few-shot first): RMSE and MAE, mean ± std over seeds, channel
    ``mean``, like :func:`stbat_plugin.pipeline.results.results_table`, plus the seed count
    (``3/2`` when settings differ, in the order of the columns)."""
    rows = [r for r in rows if r["channel"] == "mean"]
    days = sorted({r["train_days"] for r in rows}, reverse=True)
    cells: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    seeds: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for r in rows:
        seeds[r["method"]][r["train_days"]].add(r["seed"])
        for metric in ("rmse", "mae"):
            cells[(r["method"], r["train_days"], metric)].append(r[metric])
    names = [f"{d}-day" + (" (zero-shot)" if d == 0 else " (few-shot)") for d in days]
    lines = ["| method | seeds | " + " | ".join(f"{n} RMSE | {n} MAE" for n in names) + " |",
             "|---" * (2 + 2 * len(days)) + "|"]
    for method in sorted(seeds, key=_order):
        by_days = {d: seeds[method][d] for d in days if d in seeds[method]}
        vals = [_fmt(cells.get((method, d, m), [])) for d in days for m in ("rmse", "mae")]
        lines.append(f"| {method} | {_seeds_cell(by_days)} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def summary_table(rows: list[dict[str, Any]], metric: str = "rmse") -> str:
    """Methods x (task, variant) for every train-days setting: one metric, mean ± std over
    seeds (channel ``mean``); the best mean of each column in bold."""
    rows = [r for r in rows if r["channel"] == "mean"]
    cols = list(dict.fromkeys((r.get("task", "?"), r.get("variant", "default"))
                              for r in rows))
    blocks = []
    for days in sorted({r["train_days"] for r in rows}, reverse=True):
        cells: dict[tuple, list[float]] = defaultdict(list)
        for r in rows:
            if r["train_days"] == days:
                cells[(r["method"], r.get("task", "?"), r.get("variant", "default"))].append(
                    r[metric])
        methods = sorted({k[0] for k in cells}, key=_order)
        best = {c: min((np.mean(cells[(m, *c)]) for m in methods if cells.get((m, *c))),
                       default=None) for c in cols}
        names = [t if v == "default" else f"{t} ({v})" for t, v in cols]
        kind = "zero-shot" if days == 0 else "few-shot"
        lines = [f"{metric.upper()}, {days}-day ({kind}):", "",
                 "| method | " + " | ".join(names) + " |", "|---" * (1 + len(cols)) + "|"]
        for m in methods:
            vals = []
            for c in cols:
                v = cells.get((m, *c), [])
                text = _fmt(v)
                vals.append(f"**{text}**" if v and np.mean(v) == best[c] else text)
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _p(c: PairedComparison) -> str:
    if c.pvalue is None:
        return f"n/a ({c.reason})"
    return f"{c.pvalue:.3g} (n={c.region_pairs})"


def comparison_table(comparisons: list[PairedComparison]) -> str:
    """The paired comparisons of one task and variant as a markdown table."""
    lines = ["| method | train days | seed×channel pairs | mean ΔRMSE (vs finetune) | "
             "wins / losses / ties | Wilcoxon p (region pairs) |", "|---" * 6 + "|"]
    for c in comparisons:
        lines.append(f"| {c.stbat} | {c.train_days} | {c.pairs} | {c.mean_diff:+.4f} | "
                     f"{c.wins} / {c.losses} / {c.ties} | {_p(c)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- completeness
def _expected(out: Path, rows: list[dict[str, Any]]) -> tuple[Expected, str | None]:
    """What each (task, variant) should hold, and the experiment name.

    From the plan of ``OUT/spec.toml`` when there is one; else the seeds of the whole
    file for every (method, train-days) present (a setting with fewer is incomplete).
    """
    expected: Expected = defaultdict(lambda: defaultdict(set))
    if (out / SPEC_FILE).is_file():
        try:
            spec = load_spec(out / SPEC_FILE)
        except ValueError as exc:
            log.warning("%s: cannot plan from it (%s); judging completeness from the rows",
                        out / SPEC_FILE, exc)
        else:
            for unit in plan(spec):
                for days in unit.train_days:
                    expected[(unit.task.name, unit.variant.label)][(unit.label, days)].add(unit.seed)
            return expected, spec.name
    all_seeds = {r["seed"] for r in rows}
    for r in rows:
        expected[(r.get("task", "?"), r.get("variant", "default"))][
            (r["method"], r["train_days"])] = set(all_seeds)
    return expected, None


def _missing_lines(group: list[dict[str, Any]], want: dict[tuple[str, int], set[int]]) -> list[str]:
    have: dict[tuple[str, int], set[int]] = defaultdict(set)
    for r in group:
        have[(r["method"], r["train_days"])].add(r["seed"])
    found: dict[tuple[int, tuple[int, ...]], list[str]] = defaultdict(list)
    for (method, days), seeds in sorted(want.items(), key=lambda kv: (_order(kv[0][0]), -kv[0][1])):
        missing = tuple(sorted(seeds - have[(method, days)]))
        if missing:
            found[(len(seeds), missing)].append(f"{method} {days}-day")
    return [f"- {'every method and setting' if len(settings) == len(want) else ', '.join(settings)}"
            f": {n - len(missing)} of {n} seed(s); missing seed(s) {list(missing)}"
            for (n, missing), settings in found.items()]


# ----------------------------------------------------------------------------- the report
def _section(key: tuple[str, str], group: list[dict[str, Any]],
             want: dict[tuple[str, int], set[int]]) -> str:
    """The markdown of one task and variant."""
    task, variant = key
    head = f"## {task} — {variant}"
    if not group:
        return head + "\n\nNo results yet.\n\n" + "\n".join(_missing_lines(group, want))
    first = group[0]
    parts = [head, f"{first.get('sources', '?')} -> {first.get('target', '?')} (backbone "
             f"{first.get('backbone', '?')}, descriptors {first.get('descriptors', '?')}). "
             "RMSE and MAE in original units, channel mean, mean ± std over seeds.",
             method_table(group)]
    comparisons = paired_comparisons(group)
    if comparisons:
        parts += ["stbat vs finetune, paired by seed and channel (ΔRMSE < 0 and wins: stbat "
                  "better); Wilcoxon signed-rank test (two-sided, SciPy) over seed × channel × "
                  "region pairs of per-region RMSE:", comparison_table(comparisons)]
    missing = _missing_lines(group, want)
    if missing:
        parts += ["**Incomplete** (fewer seeds than planned):", "\n".join(missing)]
    return "\n\n".join(parts)


def load_rows(outs: list[Path]) -> tuple[list[dict[str, Any]], Expected, str | None]:
    """Rows of every folder, what they should hold, and the experiment name.

    With several folders (one spec split over processes with ``--tasks``), only the tasks
    and variants that have rows in some folder are judged for completeness.
    """
    rows: list[dict[str, Any]] = []
    expected: Expected = defaultdict(lambda: defaultdict(set))
    name = None
    for out in outs:
        path = out / RESULTS_FILE
        if not path.is_file():
            raise ValueError(f"{path} does not exist: expected the folder of `stbat experiment "
                             f"SPEC --out {out}`; run the experiment first or fix the path")
        part = read_results(path)
        want, name = _expected(out, part)
        for key, settings in want.items():
            for setting, seeds in settings.items():
                expected[key][setting] |= seeds
        rows += part
    if len(outs) > 1:
        present = {(r.get("task", "?"), r.get("variant", "default")) for r in rows}
        expected = defaultdict(lambda: defaultdict(set),
                               {k: v for k, v in expected.items() if k in present})
    return rows, expected, name


def report(out: str | Path, more: Sequence[str | Path] = ()) -> str:
    """The markdown report of one experiment folder (its ``results.jsonl``), or several merged.

    Raises:
        ValueError: a folder has no result rows yet.
    """
    outs = [Path(out), *map(Path, more)]
    rows, expected, name = load_rows(outs)
    groups = _groups(rows)
    for key in expected:
        groups.setdefault(key, [])
    seeds = sorted({r["seed"] for r in rows})
    blocks = [f"# Experiment {name or outs[0].name}",
              f"{len(rows)} result row(s) from {', '.join(f'`{o / RESULTS_FILE}`' for o in outs)}; "
              f"seeds {seeds}."]
    if len(groups) > 1:
        blocks += ["## Summary across tasks", "Channel mean, mean ± std over seeds; the best "
                   "mean of each column in bold.", summary_table(rows, "rmse"),
                   summary_table(rows, "mae")]
    blocks += [_section(key, group, expected.get(key, {})) for key, group in groups.items()]
    blocks.append(_balance_section(rows, outs[0]))
    return "\n\n".join(blocks) + "\n"


def _balance_section(rows: list[dict[str, Any]], out: Path) -> str:
    """Where balancing helps: STBaT vs fine-tuning by density and volume bin, with a plot."""
    from stbat_plugin.pipeline.balance import balance_bins, balance_table, plot_balance

    stats = balance_bins(rows, "density") + balance_bins(rows, "volume")
    head = "## Where balancing helps: STBaT vs fine-tuning by region density and volume"
    if not stats:
        return head + "\n\nNo STBaT and fine-tuning rows of the same seed with per-region data."
    text = [head, "Regions binned into quartiles of RIAM's log-density (from the STBaT run of "
            "the same seed; Q1 = rarest patterns) and of their mean flow over the target's "
            "training days; region RMSE averaged over regions x seeds.", balance_table(stats)]
    try:
        path = plot_balance(stats, out / BALANCE_PNG)
    except ImportError:
        text.append("(Install the `plots` extra, matplotlib, for the figure.)")
    else:
        text.append(f"![STBaT vs fine-tuning by bin]({path.name})")
    return "\n\n".join(text)


def write_report(out: str | Path, more: Sequence[str | Path] = ()) -> Path:
    """Write ``OUT/report.md`` (atomically) and the balance figure; returns the report's path."""
    path = Path(out) / REPORT_FILE
    atomic_write_text(path, report(out, more))
    return path
