"""``stbat diagnose``: the regional imbalance STBaT is about, for any city of the npz format.

For one city (``data/DATA.md``: any number of regions and channels, with or without POI,
coordinates, a grid or a graph) it shows:

- RIAM's log-density of each region and the loss weight it gives (Eq. 6 and 14), as a map:
  a heatmap on a grid city, a scatter on coordinates, or regions ranked when the city has
  neither (said so in the report);
- a histogram of the weights, the most similar region pairs (Eq. 7) and the flow-volume
  distribution over regions;
- with a checkpoint and/or a results file, the error by density bin and by volume bin of
  every method there.

RIAM here is trained on this city's descriptors alone (POI, or the temporal-profile
fallback over the whole series given) with the reconstruction term of L_emb (Eq. 5); the
feature-distribution predictor needs a backbone's features and is left out. Its density is
therefore this city's own imbalance, not the one a pre-trained STBaT saw (the pipeline keeps
that one in the STBaT result rows, ``info.region_log_density``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import stbat_plugin
from stbat_plugin import functional as SF
from stbat_plugin.data import City, region_descriptors, valid_region_mask
from stbat_plugin.pipeline.balance import quantile_bins
from stbat_plugin.pipeline.checkpoint import Pretrained, from_checkpoint
from stbat_plugin.pipeline.config import TransferConfig
from stbat_plugin.pipeline.io import atomic_write_text
from stbat_plugin.riam import RIAM, normalize_descriptors

__all__ = ["Diagnosis", "diagnose", "diagnose_city", "riam_embedding", "region_errors_from_results",
           "quantile_bins", "error_bins"]

log = logging.getLogger(__name__)

BINS = 4


@dataclass
class Diagnosis:
    """Per-region quantities of one city (NaN where a region has no flow in the series).

    Shapes:
        valid: ``[n]`` bool; log_density, weights, volume: ``[n]``;
        similarity: ``[n, n]`` cosine similarity of the embeddings (NaN outside valid).
    """

    city: City
    kind: str  # descriptor kind: "poi" or "temporal_profile"
    layout: dict[str, Any]
    valid: np.ndarray
    log_density: np.ndarray
    weights: np.ndarray
    volume: np.ndarray
    similarity: np.ndarray
    errors: dict[str, np.ndarray] = field(default_factory=dict)

    def top_pairs(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The ``k`` most similar pairs of distinct valid regions, most similar first."""
        idx = np.flatnonzero(self.valid)
        sub = self.similarity[np.ix_(idx, idx)]
        i, j = np.triu_indices(idx.size, 1)
        order = np.argsort(-sub[i, j], kind="stable")[:k]
        return [(int(idx[i[o]]), int(idx[j[o]]), float(sub[i[o], j[o]])) for o in order]


def _layout(city: City) -> dict[str, Any]:
    if city.grid_shape is not None:
        return {"kind": "grid", "grid_shape": tuple(int(v) for v in city.grid_shape)}
    if city.coords is not None:
        return {"kind": "coords", "coords": np.asarray(city.coords, float)}
    return {"kind": "rank"}


def riam_embedding(descriptors: np.ndarray, *, embed_dim: int = 32, steps: int = 300,
                   lr: float = 1e-2, seed: int = 0) -> torch.Tensor:
    """RIAM's embedding phi of region descriptors, trained with the reconstruction term of
    L_emb (Eq. 5, the POI classifier) for ``steps`` full-batch Adam steps.

    Shapes:
        descriptors: ``[n, k]`` non-negative -> phi ``[n, embed_dim]``.
    """
    p = normalize_descriptors(torch.as_tensor(np.asarray(descriptors), dtype=torch.float32))
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left alone
        torch.manual_seed(seed)
        riam = RIAM(p.shape[1], 1, embed_dim=embed_dim, use_poi=True, use_fdp=False)
        opt = torch.optim.Adam(riam.parameters(), lr=lr)
        for _ in range(steps):
            loss, _ = riam.loss(p, None, None, beta=0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return riam(p)


def diagnose_city(city: City, config: TransferConfig | None = None, *, seed: int = 0,
                  steps: int = 300) -> Diagnosis:
    """RIAM density, weights, similarity and flow volume of every region of ``city``.

    Uses ``config.descriptors`` (``auto``: POI when the city has it, else temporal profiles),
    ``config.stbat.embed_dim`` (D) and ``config.stbat.bandwidth`` (h).

    Raises:
        ValueError: fewer than 2 regions with flow (no density can be estimated).
    """
    config = config or TransferConfig()
    whole = slice(0, city.num_steps)
    (desc,), kind = region_descriptors([city], [whole], kind=config.descriptors)
    valid = valid_region_mask(city, whole)
    if valid.sum() < 2:
        raise ValueError(f"city {city.name!r}: {int(valid.sum())} region(s) with flow; a density "
                         "needs at least 2 (check the file's flow, or the --target-span cut)")
    phi = riam_embedding(desc.values[valid], embed_dim=config.stbat.embed_dim, seed=seed,
                         steps=steps)
    n = city.num_regions
    log_density, weights = np.full(n, np.nan), np.full(n, np.nan)
    with torch.no_grad():
        ld = SF.kde_log_density(phi.double(), config.stbat.bandwidth)
        log_density[valid] = ld.numpy()
        weights[valid] = SF.density_weights(ld).numpy()
        similarity = np.full((n, n), np.nan)
        similarity[np.ix_(valid, valid)] = SF.pattern_similarity(phi.double()).numpy()
    return Diagnosis(city, kind, _layout(city), valid, log_density, weights, city.mean_flow(),
                     similarity)


# ----------------------------------------------------------------------------- errors
def _load_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of an experiment folder / ``results.jsonl`` or a ``transfer`` ``results.json``."""
    from stbat_plugin.pipeline.experiment import RESULTS_FILE, read_results

    if path.is_dir():
        for name in (RESULTS_FILE, "results.json"):
            if (path / name).is_file():
                return _load_rows(path / name)
        raise ValueError(f"--results {path}: no {RESULTS_FILE} or results.json in that folder; "
                         "give the --out folder of `stbat experiment` or `stbat transfer`")
    if not path.is_file():
        raise FileNotFoundError(f"--results {path} does not exist")
    if path.suffix == ".jsonl":
        return read_results(path)
    try:
        rows = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"--results {path} is not JSON ({exc}); give a results.json or "
                         "results.jsonl") from exc
    if not isinstance(rows, list):
        raise ValueError(f"--results {path}: expected a list of result rows")
    return rows


def region_errors_from_results(path: str | Path | Sequence[str | Path], city: City,
                               methods: list[str] | None = None) -> dict[str, np.ndarray]:
    """Per-region RMSE (mean over seeds, channel mean) of every method and setting that
    predicted ``city`` in a results file (or several, e.g. one study split over folders);
    labels like ``stbat, 3-day``. ``methods`` keeps only these (a method's name, e.g.
    ``stbat``, or its full label, ``stbat (w/o POI)``).

    Raises:
        ValueError: the files hold no per-region rows of this city (naming the targets
            found), or none of ``methods``.
    """
    paths = [path] if isinstance(path, str | Path) else list(path)
    rows = [r for p in paths for r in _load_rows(Path(p)) if r.get("channel") == "mean"]
    path = ", ".join(map(str, paths))
    mine = [r for r in rows if r.get("target") == city.name
            and len((r.get("regions") or {}).get("rmse") or []) == city.num_regions]
    if mine and methods is not None:
        found = sorted({r["method"] for r in mine})
        mine = [r for r in mine if r["method"] in methods or r["method"].split(" ")[0] in methods]
        if not mine:
            raise ValueError(f"--results {path}: none of the methods {methods} predicted "
                             f"{city.name!r} there (methods there: {found}); fix --methods")
    if not mine:
        targets = sorted({str(r.get("target")) for r in rows})
        raise ValueError(f"--results {path}: no per-region rows of city {city.name!r} with "
                         f"{city.num_regions} regions (targets there: {targets or 'none'}); "
                         "give the results of a run whose target is this city")
    groups = {(r.get("task"), r.get("variant", "default")) for r in mine}
    acc: dict[str, list[np.ndarray]] = {}
    for r in mine:
        where = f" [{r.get('task')}/{r.get('variant', 'default')}]" if len(groups) > 1 else ""
        label = f"{r['method']}{where}, {r['train_days']}-day"
        acc.setdefault(label, []).append(
            np.array([np.nan if v is None else v for v in r["regions"]["rmse"]], float))
    from stbat_plugin.pipeline.results import _order

    with warnings.catch_warnings():  # a region no seed scored stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        means = {k: np.nanmean(np.stack(v), axis=0) for k, v in acc.items()}
    return dict(sorted(means.items(), key=lambda kv: (_order(kv[0].split(",")[0]),
                                                      -int(kv[0].rsplit(" ", 1)[1].split("-")[0]))))


def checkpoint_region_errors(checkpoint: str | Path | Pretrained, data_dir: str | Path, city: str,
                             config: TransferConfig | None, *, train_days: int = 0, seed: int = 0,
                             registry: Any = None, progress: bool = False
                             ) -> tuple[str, np.ndarray]:
    """Adapt a checkpoint (a path, or one already read) to ``city`` (``train_days`` 0: as it
    is) and score every region."""
    from stbat_plugin.pipeline import api
    from stbat_plugin.pipeline.method_registry import get_method
    from stbat_plugin.pipeline.tasks import target_task

    pre = (checkpoint if isinstance(checkpoint, Pretrained)
           else from_checkpoint(checkpoint, config, registry))
    cfg = pre.config
    task = target_task(api.load(data_dir, city, cfg.target_span), train_days, cfg)
    forecast = get_method(pre.method).adapt(pre.net.to(cfg.device), task, cfg, seed, registry,
                                            progress)
    regions = api.evaluate_forecast(forecast, list(task.city.channels))["mean"]["regions"]["rmse"]
    return (f"checkpoint ({pre.method}), {train_days}-day",
            np.array([np.nan if v is None else v for v in regions], float))


def error_bins(diag: Diagnosis, bins: int = BINS) -> list[dict[str, Any]]:
    """Mean region RMSE of every error source per density and volume quantile bin.

    Bins are quantiles over the valid regions; a region counts in a method's bin when
    that method scored it.
    """
    keys = {"density": np.where(diag.valid, diag.log_density, np.nan),
            "volume": np.where(diag.valid, diag.volume, np.nan)}
    out = []
    for by, values in keys.items():
        labels = quantile_bins(values, bins)
        for label, err in diag.errors.items():
            for b in range(bins):
                sel = (labels == b) & np.isfinite(err)
                if sel.any():
                    out.append({"label": label, "by": by, "bin": b, "regions": int(sel.sum()),
                                "mean": float(err[sel].mean())})
    return out


# ----------------------------------------------------------------------------- the report
def _where(checkpoint: str | Path | Pretrained | None) -> str:
    """Where a checkpoint was read from, for the report."""
    if isinstance(checkpoint, Pretrained):
        return str(checkpoint.path or f"(in memory: {checkpoint.method})")
    return str(checkpoint)


def _region_name(city: City, i: int) -> str:
    rid = str(city.region_ids[i])
    return rid or str(i)


def _gini(v: np.ndarray) -> float:
    v = np.sort(v[np.isfinite(v)])
    if v.size == 0 or v.sum() <= 0:
        return float("nan")
    cum = np.cumsum(v)
    return float((v.size + 1 - 2 * (cum / cum[-1]).sum()) / v.size)


def _summary(diag: Diagnosis) -> str:
    w = diag.weights[diag.valid]
    ld = diag.log_density[diag.valid]
    vol = diag.volume[np.isfinite(diag.volume)]
    top = max(1, int(np.ceil(0.1 * vol.size)))
    share = float(np.sort(vol)[::-1][:top].sum() / vol.sum()) if vol.sum() > 0 else float("nan")
    rare = np.argsort(ld)[:max(1, int(np.ceil(0.1 * ld.size)))]
    from scipy.stats import spearmanr

    both = np.isfinite(diag.volume) & diag.valid
    rho = spearmanr(diag.log_density[both], diag.volume[both]).statistic if both.sum() > 2 else np.nan
    lines = ["| quantity | value |", "|---|---|",
             f"| regions (with flow in the series) | {diag.city.num_regions} ({int(diag.valid.sum())}) |",
             f"| RIAM log-density: min / median / max | {ld.min():.2f} / {np.median(ld):.2f} / "
             f"{ld.max():.2f} |",
             f"| weight: min / median / max (mean 1) | {w.min():.3f} / {np.median(w):.3f} / "
             f"{w.max():.3f} |",
             f"| weight share of the rarest 10 % of regions | {w[rare].sum() / w.sum():.1%} |",
             f"| flow-volume share of the busiest 10 % of regions | {share:.1%} |",
             f"| Gini coefficient of flow volume over regions | {_gini(vol):.3f} |",
             f"| Spearman correlation of log-density and volume | {float(rho):.2f} |"]
    return "\n".join(lines)


def _pairs_table(diag: Diagnosis, k: int) -> str:
    pairs = diag.top_pairs(k)
    lines = ["| rank | region a | region b | cosine similarity of φ | volume a | volume b |",
             "|---|---|---|---|---|---|"]
    for rank, (i, j, s) in enumerate(pairs, 1):
        lines.append(f"| {rank} | {_region_name(diag.city, i)} | {_region_name(diag.city, j)} | "
                     f"{s:.4f} | {diag.volume[i]:.2f} | {diag.volume[j]:.2f} |")
    idx = np.flatnonzero(diag.valid)
    sub = diag.similarity[np.ix_(idx, idx)][np.triu_indices(idx.size, 1)]
    near = int((sub >= 0.999).sum())
    return "\n".join(lines) + (f"\n\n{near} of {sub.size} pairs have a similarity >= 0.999 "
                               "(near-identical descriptors)." if near > len(pairs) else "")


def _errors_table(stats: list[dict[str, Any]], bins: int) -> str:
    lines = ["| method | binned by | " + " | ".join(f"Q{b + 1}" for b in range(bins)) + " |",
             "|---|---|" + "---|" * bins]
    keys = list(dict.fromkeys((s["by"], s["label"]) for s in stats))
    for by, label in keys:
        cells = {s["bin"]: s for s in stats if s["by"] == by and s["label"] == label}
        vals = [f"{cells[b]['mean']:.3f} (n={cells[b]['regions']})" if b in cells else "-"
                for b in range(bins)]
        lines.append(f"| {label} | {by} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _regions_csv(diag: Diagnosis) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["region", "id", "has_flow", "log_density", "weight", "volume",
                     *diag.errors])
    for i in range(diag.city.num_regions):
        writer.writerow([i, diag.city.region_ids[i], bool(diag.valid[i]),
                         *(f"{v:.6g}" for v in (diag.log_density[i], diag.weights[i],
                                                 diag.volume[i])),
                         *(f"{e[i]:.6g}" for e in diag.errors.values())])
    return buf.getvalue()


@dataclass
class DiagnoseResult:
    """What :func:`diagnose` wrote."""

    diagnosis: Diagnosis
    report_path: Path
    png_paths: list[Path]
    markdown: str


def diagnose(data_dir: str | Path, city: str, out: str | Path, *,
             config: TransferConfig | None = None,
             checkpoint: str | Path | Pretrained | None = None,
             results: str | Path | Sequence[str | Path] | None = None,
             methods: list[str] | None = None,
             train_days: int = 0, seed: int = 0, top_pairs: int = 10, registry: Any = None,
             progress: bool = False, command: str | None = None) -> DiagnoseResult:
    """Write ``OUT/diagnose.md``, ``OUT/diagnose.png`` (maps and distributions),
    ``OUT/diagnose_regions.csv`` and, with ``checkpoint`` or ``results``,
    ``OUT/diagnose_errors.png`` (error by density and volume bin).

    ``checkpoint`` (a path, or a checkpoint read with :func:`from_checkpoint`) is adapted to
    the city with ``train_days`` (0: scored as it is) under ``config`` (its validation / test
    days); ``results`` is a results file or folder (or a list of them), of which ``methods``
    (default: all) are binned.
    """
    from stbat_plugin.pipeline import api
    from stbat_plugin.pipeline.experiment import git_commit
    from stbat_plugin.pipeline.plots import plot_diagnose, plot_error_bins

    config = config or TransferConfig()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory; choose another path")
    the_city = api.load(data_dir, city, config.target_span)
    diag = diagnose_city(the_city, config, seed=seed)
    if isinstance(results, str | Path):
        results = [results]
    if results:
        diag.errors.update(region_errors_from_results(results, the_city, methods))
    if checkpoint is not None:
        label, err = checkpoint_region_errors(checkpoint, data_dir, city, config,
                                              train_days=train_days, seed=seed,
                                              registry=registry, progress=progress)
        diag.errors[label] = err
    out.mkdir(parents=True, exist_ok=True)
    pngs = [plot_diagnose(diag.log_density, diag.weights, diag.volume, diag.layout,
                          out / "diagnose.png", city=city)]
    c = the_city
    map_note = {"grid": f"a heatmap on the {c.grid_shape[0]} x {c.grid_shape[1]} grid"
                if c.grid_shape is not None else "",
                "coords": "a scatter on the regions' coordinates (lat, lon)",
                "rank": "**no map**: the city has neither a grid nor coordinates, so regions are "
                        "shown ranked by value"}[diag.layout["kind"]]
    desc = ("POI category distribution" if diag.kind == "poi" else
            "temporal profile (hour-of-day and day-of-week mean flow over the whole series; the "
            "city has no POI, or --descriptors asked for it)")
    blocks = [f"# Imbalance diagnosis: {city}",
              f"Command: `{command or '(Python API)'}`",
              f"stbat-plugin {stbat_plugin.__version__}; git commit "
              f"{git_commit() or 'unknown (not a git checkout)'}.",
              f"{c.num_regions} regions, {c.num_channels} channel(s) ({', '.join(c.channels)}), "
              f"{c.num_steps} steps, {c.span[0]} .. {c.span[1]}. Region descriptors: {desc}. "
              f"Map: {map_note}.",
              f"RIAM (D = {config.stbat.embed_dim}) is trained on this city's descriptors alone with the "
              "reconstruction term of L_emb (Eq. 5); the feature-distribution predictor needs a "
              "backbone and is left out. Log-density: Gaussian KDE of the embeddings, bandwidth "
              f"h = {config.stbat.bandwidth} (Eq. 6); weight: w_r = n softmax(-log rho)_r (Eq. 14, mean "
              "1; a rare pattern gets a large weight). Regions without flow in the series are left "
              "out. Volume: mean flow per step, channels summed.",
              "## Summary", _summary(diag),
              f"![RIAM density, weights and flow volume of {city}](diagnose.png)",
              "## Most similar region pairs (cosine similarity of RIAM embeddings, Eq. 7)",
              _pairs_table(diag, top_pairs)]
    if diag.errors:
        stats = error_bins(diag)
        sources = ", ".join(s for s in (", ".join(f"`{r}`" for r in results or ()),
                                         f"checkpoint `{_where(checkpoint)}` ({train_days} training "
                                         "day(s))" if checkpoint else "") if s)
        blocks += ["## Error by density and volume bin",
                   f"Mean region RMSE (channel mean; results averaged over seeds) from {sources}, "
                   f"per quartile of the log-density above (Q1 = rarest pattern) and of volume "
                   "(Q1 = least flow); n = regions scored in the bin.",
                   _errors_table(stats, BINS)]
        if stats:
            pngs.append(plot_error_bins(stats, out / "diagnose_errors.png"))
            blocks.append("![error by density and volume bin](diagnose_errors.png)")
    blocks.append("Per-region values: `diagnose_regions.csv`.")
    text = "\n\n".join(blocks) + "\n"
    atomic_write_text(out / "diagnose_regions.csv", _regions_csv(diag))
    path = atomic_write_text(out / "diagnose.md", text)
    return DiagnoseResult(diag, path, pngs, text)


def run_command(args: Any) -> DiagnoseResult:
    """``stbat diagnose``: the parsed CLI arguments -> :func:`diagnose`."""
    from stbat_plugin._registry import registry_with_plugins
    from stbat_plugin.pipeline.paper import command_line, default_data_dir, given_options

    given = given_options(args)
    registry = registry_with_plugins(args.plugin)
    # read once; model settings come from the checkpoint, as in `adapt`
    pre = None if args.checkpoint is None else from_checkpoint(args.checkpoint, given, registry)
    options = {"data_dir": args.data_dir, "city": args.city, "checkpoint": args.checkpoint,
               "results": args.results, "methods": args.methods,
               "train_days": args.train_days or None,
               "seed": args.seed or None, "top_pairs": None if args.top_pairs == 10 else args.top_pairs,
               "out": args.out}
    data_dir = args.data_dir if args.data_dir is not None else default_data_dir()
    return diagnose(data_dir, args.city, args.out,
                    config=pre.config if pre is not None else TransferConfig.from_dict(given),
                    checkpoint=pre, results=args.results, methods=args.methods,
                    train_days=args.train_days,
                    seed=args.seed, top_pairs=args.top_pairs,
                    registry=registry, progress=not args.quiet,
                    command=command_line("diagnose", options, given, repeat=("results",)))
