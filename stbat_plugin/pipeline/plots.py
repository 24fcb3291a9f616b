"""Figures of the paper's experiments and of ``stbat diagnose``: result rows in, PNG files out.

Every function takes plain numbers (aggregated result rows or per-region arrays) and writes
one PNG; none trains or evaluates anything. matplotlib (the ``plots`` extra) is imported
inside the functions, so ``import stbat_plugin`` never needs it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_ablation", "plot_sensitivity", "plot_scarcity", "plot_efficiency",
           "plot_diagnose", "plot_error_bins", "MAX_PNG_BYTES"]

#: figures are kept small enough to commit (checked by the tests)
MAX_PNG_BYTES = 200_000


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'stbat-plugin[plots]' "
                          "(or pip install matplotlib)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _plain_y(ax: Any) -> None:
    """Tick labels as plain numbers (no "+2.6e2" offset above the axis)."""
    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")


def _days_name(days: int) -> str:
    return f"{days}-day " + ("zero-shot" if days == 0 else "few-shot")


def _need(items: Sequence[Any], what: str) -> None:
    if not items:
        raise ValueError(f"nothing to plot: no {what}; run the experiment first")


# ----------------------------------------------------------------------------- ablation
def plot_ablation(entries: list[dict[str, Any]], path: str | Path) -> Path:
    """Bars of test RMSE (mean ± std over seeds) per variant, one panel per train-days.

    ``entries``: dicts with ``label``, ``days``, ``mean``, ``std``, in display order.
    """
    _need(entries, "ablation rows")
    plt = _pyplot()
    days = sorted({e["days"] for e in entries}, reverse=True)
    fig, axes = plt.subplots(1, len(days), figsize=(5.2 * len(days), 3.8), squeeze=False)
    for ax, d in zip(axes[0], days, strict=True):
        items = [e for e in entries if e["days"] == d]
        x = np.arange(len(items))
        means = np.array([e["mean"] for e in items])
        stds = np.array([e["std"] for e in items])
        colors = ["tab:red" if e["label"] == "stbat" else
                  "tab:grey" if not e["label"].startswith("stbat") else "tab:blue" for e in items]
        ax.bar(x, means, yerr=stds, color=colors, capsize=3)
        lo, hi = float((means - stds).min()), float((means + stds).max())
        pad = max(hi - lo, 1e-9)
        ax.set_ylim(lo - 0.6 * pad, hi + 0.4 * pad)
        ax.set_xticks(x, [e["label"].replace("stbat (", "(") for e in items], rotation=30,
                      ha="right", fontsize=8)
        for xi, m in zip(x, means, strict=True):
            ax.text(xi, lo - 0.55 * pad, f"{m:.5g}", ha="center", fontsize=7)
        ax.set_ylabel("test RMSE (mean ± std over seeds)")
        _plain_y(ax)
        ax.set_title(_days_name(d), fontsize=10)
    return _save(fig, path)


# ----------------------------------------------------------------------------- sensitivity
def plot_sensitivity(points: list[dict[str, Any]], path: str | Path, *,
                     reference: dict[str, float] | None = None,
                     defaults: dict[str, float] | None = None,
                     best: dict[str, float] | None = None) -> Path:
    """One panel per hyper-parameter: test RMSE (mean ± std band) against its value.

    ``points``: dicts with ``param`` (the panel title), ``value``, ``mean``, ``std``.
    ``reference``: ``{"mean", "std", "label"}`` drawn as a horizontal band (e.g. fine-tuning);
    ``defaults`` / ``best``: per param, the library default (dotted line) and the value
    best on validation (star).
    """
    _need(points, "sensitivity rows")
    plt = _pyplot()
    params = list(dict.fromkeys(p["param"] for p in points))
    cols = min(len(params), 2)
    rows = (len(params) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[len(params):]:
        ax.set_visible(False)
    for ax, param in zip(axes.flat, params, strict=False):
        items = sorted((p for p in points if p["param"] == param), key=lambda p: p["value"])
        x = np.array([p["value"] for p in items], float)
        m = np.array([p["mean"] for p in items])
        s = np.array([p["std"] for p in items])
        ax.plot(x, m, marker="o", color="tab:red", label="stbat")
        ax.fill_between(x, m - s, m + s, color="tab:red", alpha=0.2)
        if reference is not None:
            ax.axhline(reference["mean"], color="tab:grey", ls="--",
                       label=reference.get("label", "reference"))
            ax.axhspan(reference["mean"] - reference["std"], reference["mean"] + reference["std"],
                       color="tab:grey", alpha=0.12)
        if defaults and param in defaults:
            ax.axvline(defaults[param], color="k", ls=":", lw=0.8, label="default")
        if best and param in best:
            i = int(np.argmin(np.abs(x - best[param])))
            ax.plot([x[i]], [m[i]], marker="*", ms=14, color="gold", mec="k",
                    label="best on validation")
        if np.all(x > 0) and x.max() / x.min() >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(param)
        ax.set_ylabel("test RMSE")
        _plain_y(ax)
        ax.legend(fontsize=7)
    return _save(fig, path)


# ----------------------------------------------------------------------------- scarcity
def plot_scarcity(points: list[dict[str, Any]], path: str | Path) -> Path:
    """Test RMSE against target training days, one panel per task, one line per method.

    ``points``: dicts with ``task``, ``method``, ``days``, ``mean``, ``std``. The days are
    placed evenly (labelled with their value), since they grow roughly geometrically.
    """
    _need(points, "scarcity rows")
    plt = _pyplot()
    tasks = list(dict.fromkeys(p["task"] for p in points))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.4 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        items = [p for p in points if p["task"] == task]
        days = sorted({p["days"] for p in items})
        pos = {d: i for i, d in enumerate(days)}
        by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for p in items:
            by_method[p["method"]].append(p)
        for method, ps in by_method.items():
            ps = sorted(ps, key=lambda p: p["days"])
            ax.errorbar([pos[p["days"]] for p in ps], [p["mean"] for p in ps],
                        yerr=[p["std"] for p in ps], marker="o", capsize=3, label=method)
        ax.set_xticks(range(len(days)), [str(d) for d in days])
        ax.set_xlabel("target training days")
        ax.set_ylabel("test RMSE")
        _plain_y(ax)
        ax.set_title(task, fontsize=10)
        ax.legend(fontsize=7)
    return _save(fig, path)


# ----------------------------------------------------------------------------- efficiency
def plot_efficiency(entries: list[dict[str, Any]], path: str | Path, *,
                    baseline_mb: float | None = None) -> Path:
    """Two bar panels: peak memory (MB) and training time (s) per method.

    ``entries``: dicts with ``method``, ``peak_mb``, ``peak_mb_std``, ``seconds``,
    ``seconds_std``; ``baseline_mb``: peak memory of a process that only loads the data.
    """
    _need(entries, "efficiency measurements")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    x = np.arange(len(entries))
    labels = [e["method"] for e in entries]
    for ax, key, name in ((axes[0], "peak_mb", "peak resident memory (MB)"),
                          (axes[1], "seconds", "training time (s)")):
        vals = [e[key] for e in entries]
        ax.bar(x, vals, yerr=[e.get(f"{key}_std", 0.0) for e in entries], capsize=3,
               color=["tab:red" if m == "stbat" else "tab:blue" for m in labels])
        for xi, v in zip(x, vals, strict=True):
            ax.text(xi, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, labels, rotation=20, ha="right")
        ax.set_ylabel(name)
    if baseline_mb is not None:
        axes[0].axhline(baseline_mb, color="k", ls=":", lw=0.8, label="data loaded, no training")
        axes[0].legend(fontsize=7)
    return _save(fig, path)


# ----------------------------------------------------------------------------- diagnose
def _map_panel(fig: Any, ax: Any, values: np.ndarray, layout: dict[str, Any], title: str,
               cmap: str, log: bool = False) -> None:
    """One per-region quantity as a heatmap (grid), a scatter (coordinates) or a rank plot;
    ``log``: a logarithmic colour scale when the positive values span more than 10x."""
    from matplotlib.colors import LogNorm

    kind = layout["kind"]
    finite = np.isfinite(values)
    norm = None
    if log and finite.any() and values[finite].min() > 0 and \
            values[finite].max() / values[finite].min() > 10:
        norm = LogNorm(values[finite].min(), values[finite].max())
        title += ", log colours"
    if kind == "grid":
        h, w = layout["grid_shape"]
        img = ax.imshow(values.reshape(h, w), cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_xlabel("column")
        ax.set_ylabel("row")
        fig.colorbar(img, ax=ax, shrink=0.8)
    elif kind == "coords":
        lat, lon = layout["coords"][:, 0], layout["coords"][:, 1]
        ax.scatter(lon[~finite], lat[~finite], s=8, c="lightgrey", marker="x",
                   label="no flow / not scored")
        sc = ax.scatter(lon[finite], lat[finite], c=values[finite], s=16, cmap=cmap, norm=norm)
        ax.set_xlabel("longitude")
        ax.set_ylabel("latitude")
        ax.set_aspect(1 / max(np.cos(np.deg2rad(np.nanmean(lat))), 1e-3))
        fig.colorbar(sc, ax=ax, shrink=0.8)
        if (~finite).any():
            ax.legend(fontsize=6, loc="best")
    else:  # no map: regions ranked by the value
        order = np.sort(values[finite])[::-1]
        ax.bar(np.arange(order.size), order, width=1.0, color="tab:blue")
        if norm is not None:
            ax.set_yscale("log")
        ax.set_xlabel("regions, ranked (no grid or coordinates: no map)")
    ax.set_title(title, fontsize=9)


def plot_diagnose(log_density: np.ndarray, weights: np.ndarray, volume: np.ndarray,
                  layout: dict[str, Any], path: str | Path, *, city: str = "") -> Path:
    """Four panels: RIAM log-density and weight per region (map), weight histogram and
    the flow-volume distribution over regions.

    Shapes:
        log_density, weights, volume: ``[n]`` (NaN: region left out, e.g. without flow).
    ``layout``: ``{"kind": "grid", "grid_shape": (H, W)}``, ``{"kind": "coords",
    "coords": [n, 2] (lat, lon)}`` or ``{"kind": "rank"}``.
    """
    if not np.isfinite(weights).any():
        raise ValueError("no region with a finite weight to plot")
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    _map_panel(fig, axes[0, 0], log_density, layout, f"{city}\nRIAM log-density per region "
               "(low = rare pattern)", "viridis")
    _map_panel(fig, axes[0, 1], weights, layout, f"{city}\nloss weight per region "
               "(Eq. 14, mean 1)", "magma", log=True)
    w = weights[np.isfinite(weights)]
    axes[1, 0].hist(w, bins=min(40, max(5, w.size // 3)), color="tab:purple", log=True)
    axes[1, 0].axvline(1.0, color="k", ls=":", lw=0.8)
    axes[1, 0].set_xlabel("region weight w_r (1 = average)")
    axes[1, 0].set_ylabel("regions (log scale)")
    axes[1, 0].set_title("histogram of the weights", fontsize=9)
    v = volume[np.isfinite(volume)]
    ax = axes[1, 1]
    positive = v[v > 0]
    if positive.size and positive.max() / positive.min() > 20:
        bins = np.logspace(np.log10(positive.min()), np.log10(positive.max()), 30)
        ax.hist(positive, bins=bins, color="tab:green")
        ax.set_xscale("log")
        zero = int((v <= 0).sum())
        ax.set_title("flow volume over regions (log scale"
                     + (f"; {zero} with 0 flow not shown)" if zero else ")"), fontsize=9)
    else:
        ax.hist(v, bins=30, color="tab:green")
        ax.set_title("flow volume over regions", fontsize=9)
    ax.set_xlabel("mean flow per step (channels summed)")
    ax.set_ylabel("regions")
    return _save(fig, path)


def _split_label(label: str) -> tuple[str, str, str]:
    """``"stbat [t/v], 3-day"`` -> (``"stbat"``, ``" [t/v]"``, ``"3-day"``)."""
    head, _, days = label.rpartition(", ")
    method, bracket, rest = head.partition(" [")
    return method, bracket + rest, days


def plot_error_bins(entries: list[dict[str, Any]], path: str | Path,
                    reference: str = "finetune") -> Path:
    """Mean region RMSE per quantile bin, one column per binning, one line per method
    (colour: method; dashed: zero-shot). When ``reference`` has rows, a second row of
    panels gives each method's difference to it in percent, per bin and train-days.

    ``entries``: dicts with ``label`` (``"method, N-day"``), ``by`` (e.g. ``density``),
    ``bin`` (0 = lowest) and ``mean``.
    """
    _need(entries, "per-region errors")
    plt = _pyplot()
    bys = list(dict.fromkeys(e["by"] for e in entries))
    labels = list(dict.fromkeys(e["label"] for e in entries))
    methods = list(dict.fromkeys(_split_label(lab)[0] for lab in labels))
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    colour = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    value = {(e["label"], e["by"], e["bin"]): e["mean"] for e in entries}
    refs = {lab: f"{reference}{_split_label(lab)[1]}, {_split_label(lab)[2]}" for lab in labels}
    relative = any(refs[lab] in labels and refs[lab] != lab for lab in labels)
    nrows = 2 if relative else 1
    fig, axes = plt.subplots(nrows, len(bys), figsize=(5.2 * len(bys) + 2.2, 3.4 * nrows),
                             squeeze=False)
    for col, by in enumerate(bys):
        for lab in labels:
            method, _, days = _split_label(lab)
            bins = sorted(b for (la, bb, b) in value if la == lab and bb == by)
            style = {"color": colour[method], "ls": "--" if days.startswith("0-") else "-",
                     "marker": "o", "ms": 3, "label": lab}
            axes[0, col].plot([b + 1 for b in bins], [value[(lab, by, b)] for b in bins], **style)
            ref = refs[lab]
            if relative and ref in labels and ref != lab:
                common = [b for b in bins if (ref, by, b) in value]
                axes[1, col].plot([b + 1 for b in common],
                                  [100 * (value[(lab, by, b)] / value[(ref, by, b)] - 1)
                                   for b in common], **style)
        rare = ", rarest" if by == "density" else ""
        for row in range(nrows):
            ax = axes[row, col]
            ax.set_xticks(range(1, 1 + max(e["bin"] for e in entries) + 1))
            ax.set_xlabel(f"{by} quartile (1 = lowest{rare})")
        axes[0, col].set_ylabel("mean region RMSE")
        axes[0, col].set_yscale("log")
        if relative:
            axes[1, col].axhline(0, color="k", lw=0.8)
            axes[1, col].set_yscale("symlog", linthresh=1.0)  # linear within ±1 %
            axes[1, col].set_ylabel(f"vs {reference}, same days (%, symlog)")
    axes[0, -1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _save(fig, path, dpi=85)
