"""Result rows -> ``results.json`` and a markdown table shaped like the paper's Table 2."""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from stbat_plugin.pipeline.io import atomic_write_text
from stbat_plugin.pipeline.method_registry import method_names

__all__ = ["write_results", "results_table", "channel_table", "read_results", "append_rows"]

log = logging.getLogger(__name__)


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


def _dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON: a NaN or inf metric is an error, never written."""
    try:
        return json.dumps(value, allow_nan=False, **kwargs)
    except ValueError as exc:
        raise FloatingPointError(f"a result holds NaN or inf ({exc}); nothing was written") \
            from exc


def write_results(rows: list[dict[str, Any]], out: str | Path) -> tuple[Path, Path]:
    """Write ``out/results.json`` (the rows) and ``out/results.md`` (the tables)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory; choose another path")
    json_path, md_path = out / "results.json", out / "results.md"
    text = _dumps(rows, indent=1)  # render both before writing either
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


# ----------------------------------------------------------------------------- results.jsonl
def read_results(path: str | Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Rows of a ``results.jsonl``, without an incomplete last batch.

    A batch (the rows of one task, variant, method, train-days and seed) ends with its
    ``channel == "mean"`` row; rows after the last complete batch, and a truncated or
    corrupt last line, are ignored (with ``repair``, cut from the file). A corrupt line
    followed by more rows is an error.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    rows: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    good_end = offset = 0
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        end = offset + len(line) + 1
        row = _parse_line(line) if i < len(lines) - 1 else None  # no newline: in progress
        if row is None and line.strip():
            if any(rest.strip() for rest in lines[i + 1:]):
                raise ValueError(f"{path}: line {i + 1} is not a JSON object but more rows follow; "
                                 "the file is damaged: fix or delete that line, then rerun")
            break
        if row is not None:
            pending.append(row)
            if row.get("channel") == "mean":
                rows, pending, good_end = rows + pending, [], end
        elif not pending:
            good_end = end  # a blank line between batches
        offset = end
    if repair and good_end < len(data):
        log.warning("%s: dropping %d byte(s) of an incomplete last batch", path,
                    len(data) - good_end)
        os.truncate(path, good_end)
    return rows


def _parse_line(line: bytes) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows as JSON lines: one write, flush and fsync for the whole batch."""
    data = "".join(_dumps(r, default=_jsonable) + "\n" for r in rows).encode()
    with open(path, "ab", buffering=0) as fh:
        view = memoryview(data)
        while view:  # a raw write may be partial
            written = fh.write(view)
            view = view[written or 0:]
        fh.flush()
        os.fsync(fh.fileno())


def _jsonable(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)
