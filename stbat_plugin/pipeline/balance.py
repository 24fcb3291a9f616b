"""Where balancing helps: per-region errors of STBaT and fine-tuning, binned by region density.

The paper's claim (Sec. 1, 4.1) is that balancing helps the regions whose patterns are rare,
i.e. of low density in RIAM's embedding space. The pipeline keeps, in every result row, each
region's RMSE (``regions``), its mean flow over the target's training days
(``info.region_volume``) and, in STBaT rows, RIAM's log-density of each target region
(``info.region_log_density``). This module pairs STBaT and fine-tuning rows of the same
task, variant, train days and seed, bins the regions by density (or volume) quantile and
compares the two methods per bin. The plot is drawn from these rows only: no training code.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BinStats", "balance_bins", "balance_table", "plot_balance", "quantile_bins"]

KEYS = {"density": "region_log_density", "volume": "region_volume"}


@dataclass(frozen=True)
class BinStats:
    """One quantile bin of regions: mean region RMSE of both methods over seeds x regions."""

    task: str
    variant: str
    train_days: int
    by: str  # "density" or "volume"
    bin: int  # 0 = lowest quantile
    regions: int  # region x seed pairs in the bin
    stbat: float
    finetune: float
    stbat_wins: float  # share of pairs where STBaT's region RMSE is lower

    @property
    def diff(self) -> float:
        return self.stbat - self.finetune


def _pairs(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, dict[str, Any]]]:
    """``(task, variant, train_days, seed) -> {"stbat": row, "finetune": row}`` (channel mean)."""
    out: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        if r.get("channel") == "mean" and r.get("method") in ("stbat", "finetune"):
            key = (r.get("task", r.get("target")), r.get("variant", "default"), r["train_days"],
                   r["seed"])
            out[key][r["method"]] = r
    return {k: v for k, v in out.items() if len(v) == 2}


def balance_bins(rows: list[dict[str, Any]], by: str = "density", bins: int = 4) -> list[BinStats]:
    """Per (task, variant, train_days): STBaT vs fine-tuning region RMSE per quantile bin.

    Bins are quantiles of the key (RIAM log-density from the STBaT row of the same seed, or
    the region volume) over the regions scored by both methods. Pairs without the key
    (e.g. a target without descriptors of the sources' kind) are left out.
    """
    if by not in KEYS:
        raise ValueError(f"Expected 'by' in {list(KEYS)} (got {by!r})")
    groups: dict[tuple, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = defaultdict(list)
    for (task, variant, days, _seed), pair in _pairs(rows).items():
        key = pair["stbat"].get("info", {}).get(KEYS[by])
        if key is None:
            continue
        values = [key, pair["stbat"]["regions"]["rmse"], pair["finetune"]["regions"]["rmse"]]
        arr = np.array([[np.nan if v is None else v for v in col] for col in values], float)
        keep = np.isfinite(arr).all(axis=0)
        if keep.sum() >= bins:
            groups[(task, variant, days)].append(tuple(arr[:, keep]))  # type: ignore[arg-type]
    return [s for key, parts in sorted(groups.items()) for s in _bin_group(key, parts, by, bins)]


def quantile_bins(values: np.ndarray, bins: int = 4) -> np.ndarray:
    """Quantile bin (0 = lowest) of each finite value; -1 where the value is not finite, and
    everywhere when fewer than ``bins`` values are finite.

    Shapes:
        values: ``[n]`` -> ``[n]`` int.
    """
    out = np.full(values.shape, -1, dtype=int)
    finite = np.isfinite(values)
    if finite.sum() >= bins:
        edges = np.quantile(values[finite], np.linspace(0, 1, bins + 1)[1:-1])
        out[finite] = np.searchsorted(edges, values[finite], side="right")
    return out


def _bin_group(key: tuple, parts: list, by: str, bins: int) -> list[BinStats]:
    labels, stbat, fine = [], [], []
    for values, s, f in parts:  # quantiles per seed: each seed's regions split evenly
        labels.append(quantile_bins(values, bins))
        stbat.append(s)
        fine.append(f)
    lab, s_all, f_all = (np.concatenate(x) for x in (labels, stbat, fine))
    out = []
    for b in range(bins):
        sel = lab == b
        if sel.any():
            task, variant, days = key
            out.append(BinStats(task, variant, days, by, b, int(sel.sum()),
                                float(s_all[sel].mean()), float(f_all[sel].mean()),
                                float((s_all[sel] < f_all[sel]).mean())))
    return out


def balance_table(stats: list[BinStats]) -> str:
    """Markdown: one line per bin, lowest quantile first."""
    lines = ["| task | variant | train days | by | bin (quantile) | region x seed pairs | "
             "STBaT region RMSE | fine-tune region RMSE | STBaT - fine-tune | STBaT wins |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in stats:
        lines.append(f"| {s.task} | {s.variant} | {s.train_days} | {s.by} | Q{s.bin + 1} | "
                     f"{s.regions} | {s.stbat:.3f} | {s.finetune:.3f} | {s.diff:+.3f} | "
                     f"{100 * s.stbat_wins:.0f} % |")
    return "\n".join(lines)


def plot_balance(stats: list[BinStats], path: str | Path) -> Path:
    """Relative difference (STBaT - fine-tune) / fine-tune per bin, one panel per binning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bys = sorted({s.by for s in stats})
    if not bys:
        raise ValueError("no STBaT / fine-tuning pairs with per-region data to plot")
    fig, axes = plt.subplots(1, len(bys), figsize=(5.5 * len(bys), 3.6), squeeze=False)
    for ax, by in zip(axes[0], bys, strict=True):
        series: dict[str, list[BinStats]] = defaultdict(list)
        for s in stats:
            if s.by == by:
                series[f"{s.task} {s.variant} {s.train_days}d"].append(s)
        for label, items in sorted(series.items()):
            x = [s.bin + 1 for s in items]
            ax.plot(x, [100 * s.diff / s.finetune for s in items], marker="o", label=label)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel(f"{by} quantile bin (1 = lowest{', rarest pattern' if by == 'density' else ''})")
        ax.set_ylabel("STBaT vs fine-tune region RMSE (%)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
