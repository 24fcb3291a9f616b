"""Result rows -> ``results.json`` and a markdown table shaped like the paper's Table 2."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from stbat_plugin._io import atomic_write_text
from stbat_plugin.method_registry import method_names

__all__ = ["write_results", "results_table", "channel_table", "atomic_write_text"]


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    arr = np.asarray(values, dtype=float)
    std = arr.std(ddof=1) if len(arr) > 1 else 0.0
    return f"{arr.mean():.3f} ± {std:.3f}"


def _order(label: str) -> tuple[int, str]:
    base, names = label.split(" ")[0], method_names()
    return (names.index(base) if base in names else len(names), label)


def results_table(rows: list[dict[str, Any]], channel: str = "mean") -> str:
    """Methods as rows; for each train-days setting (few-shot, zero-shot) RMSE and MAE.

    Cells are mean ± std over seeds of the given channel (``"mean"`` = mean over
    channels, as the paper reports); ``-`` where a method has no such setting.
    """
    rows = [r for r in rows if r["channel"] == channel]
    days = sorted({r["train_days"] for r in rows}, reverse=True)
    cells: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    for r in rows:
        for metric in ("rmse", "mae"):
            cells[(r["method"], r["train_days"], metric)].append(r[metric])
    names = [f"{d}-day" + (" (zero-shot)" if d == 0 else " (few-shot)") for d in days]
    header = "| method | " + " | ".join(f"{n} RMSE | {n} MAE" for n in names) + " |"
    sep = "|---" * (1 + 2 * len(days)) + "|"
    lines = [header, sep]
    for method in sorted({r["method"] for r in rows}, key=_order):
        vals = [_fmt(cells.get((method, d, m), [])) for d in days for m in ("rmse", "mae")]
        lines.append(f"| {method} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def channel_table(rows: list[dict[str, Any]]) -> str:
    """Per-channel RMSE / MAE (mean ± std over seeds) for every method and setting."""
    channels = sorted({r["channel"] for r in rows} - {"mean"})
    blocks = []
    for ch in channels:
        blocks.append(f"### channel `{ch}`\n\n{results_table(rows, ch)}")
    return "\n\n".join(blocks)


def write_results(rows: list[dict[str, Any]], out: str | Path) -> tuple[Path, Path]:
    """Write ``out/results.json`` (the rows) and ``out/results.md`` (the tables)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory; choose another path")
    json_path, md_path = out / "results.json", out / "results.md"
    text = json.dumps(rows, indent=1)  # render both before writing either
    first = rows[0] if rows else {}
    seeds = len({r["seed"] for r in rows})
    head = (f"# {first.get('sources', '?')} -> {first.get('target', '?')} "
            f"(backbone {first.get('backbone', '?')}, {seeds} seed(s), "
            f"descriptors: {first.get('descriptors', '?')})\n\n"
            "RMSE and MAE in original units over valid regions, mean over channels, "
            "mean ± std over seeds.\n\n")
    table = head + results_table(rows) + "\n\n" + channel_table(rows) + "\n"
    atomic_write_text(json_path, text)
    atomic_write_text(md_path, table)
    return json_path, md_path
