"""Python API of the cross-city pipeline; the ``stbat`` CLI is a thin layer over it.

- :func:`pretrain`: pre-train one method on source cities (optionally save a checkpoint).
- :func:`adapt`: adapt a pre-trained network (or a checkpoint) to a target city and test it.
- :func:`transfer`: the whole comparison: every method x seed x train-days on one task.
- :func:`datasets`, :func:`backbones`: what is available.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from stbat_plugin._registry import default_registry
from stbat_plugin.data import City, load_city, parse_span, region_descriptors, span_of
from stbat_plugin.network import PredictionNetwork
from stbat_plugin.pipeline import distributed, metrics
from stbat_plugin.pipeline.checkpoint import (
    CheckpointError,
    Pretrained,
    check_same_pretraining,
    from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from stbat_plugin.pipeline.config import TransferConfig
from stbat_plugin.pipeline.method_registry import get_method, method_names
from stbat_plugin.pipeline.methods import (
    Adapted,
    adapt_to_target,
    finetune,
)
from stbat_plugin.pipeline.methods import (
    pretrain as _pretrain,
)
from stbat_plugin.pipeline.preflight import preflight, preflight_methods
from stbat_plugin.pipeline.runfolder import RunFolder, check_writable
from stbat_plugin.pipeline.tasks import CityTask, source_task, target_task

__all__ = ["Pretrained", "SourceData", "load", "prepare_sources", "pretrain", "adapt",
           "transfer", "run_method", "evaluate", "evaluate_forecast", "method_label",
           "check_cities", "check_distinct", "check_seeds", "check_leakage",
           "check_span_leakage", "check_device"]

log = logging.getLogger(__name__)

#: what ``transfer`` compares when no methods are given
DEFAULT_METHODS = ("stbat", "finetune", "target-only", "persistence", "ha")


def load(data_dir: str | Path, name: str, span: str | None) -> City:
    """City ``name`` cut to ``span`` (one span, or per-city ``name=START:END`` entries)."""
    city = load_city(data_dir, name)
    span = span_of(span, name)
    start, end = parse_span(span) if span else (None, None)
    return city.restrict(start, end) if (start or end) else city


@dataclass
class SourceData:
    """Source cities ready for pre-training: tasks, RIAM descriptors and their kind."""

    tasks: list[CityTask]
    descriptors: dict[str, np.ndarray]
    kind: str  # "poi", "temporal_profile" or "none"


def prepare_sources(data_dir: str | Path, sources: list[str], config: TransferConfig
                    ) -> SourceData:
    """Source tasks plus region descriptors (POI, or the temporal-profile fallback)."""
    if not sources:
        raise ValueError("Give at least one source city (--source a,b)")
    tasks = [source_task(load(data_dir, s, config.source_span), config) for s in sources]
    found = region_descriptors([t.city for t in tasks], [t.split.train for t in tasks],
                               kind=config.descriptors)
    if found.kind != "poi":
        log.warning("Region descriptors: %s fallback (not every source city has POI)", found.kind)
    return SourceData(tasks, {t.name: d.values
                              for t, d in zip(tasks, found.descriptors, strict=True)}, found.kind)


def pretrain(data_dir: str | Path, sources: list[str], *, method: str = "stbat",
             config: TransferConfig | None = None, seed: int = 0, save: str | Path | None = None,
             progress: bool = True, registry: Any = None, resume: bool = False,
             overwrite: bool = False) -> Pretrained:
    """Pre-train ``method`` (stbat, finetune or maml) on the sources; optionally save it.

    With ``save``, the checkpoint is written after every epoch (atomically): the best
    network so far plus what continues the run, marked incomplete until the end. An
    existing file at ``save`` is never replaced unless ``overwrite``; ``resume`` continues
    the interrupted run saved there (same method, sources, seed and settings), with the
    result of an uninterrupted run. ``registry``: the backbone registry (default: the
    installed plugins). A backbone that cannot run on a source city fails before training
    (:func:`preflight_methods`). Inside :func:`stbat_plugin.pipeline.distributed.session` (``torchrun``)
    every process pre-trains its share and rank 0 alone reads and writes ``save``.
    """
    config = config or TransferConfig()
    if not get_method(method).pretrains:
        pre = [m for m in method_names() if get_method(m).pretrains]
        raise ValueError(f"Method {method!r} is not pre-trained; choose from {pre}")
    check_cities(sources, None)
    check_seeds([seed])
    check_device(config.device)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: --resume continues "
                         "the run saved in --save, --overwrite starts again; give one")
    if (resume or overwrite) and save is None:
        raise ValueError("--resume / --overwrite need --save (the checkpoint file)")
    previous = None if save is None else distributed.on_rank0(
        lambda: _previous_run(Path(save), resume, overwrite))
    src = prepare_sources(data_dir, sources, config)
    tasks, descs, kind = src.tasks, src.descriptors, src.kind
    data = {"sources": list(sources), "descriptors": kind, "seed": seed,
            "spans": {t.name: t.city.span for t in tasks},
            "channels": {t.name: list(t.city.channels) for t in tasks}}
    ctx = distributed.active()
    if ctx is not None:
        data["processes"] = ctx.world_size
    state = None
    if previous is not None:
        assert save is not None
        if previous.get("complete", True):
            log.info("%s: pre-training already complete; nothing to resume", save)
            return distributed.on_rank0(lambda: from_checkpoint(save, config, registry))
        if previous["data"].get("processes", 1) != data.get("processes", 1):
            raise CheckpointError(f"--resume: {save} was pre-trained with "
                                  f"{previous['data'].get('processes', 1)} process(es), this run "
                                  f"has {data.get('processes', 1)}; resume with as many (torchrun "
                                  "--nproc-per-node)")
        check_same_pretraining(Path(save), previous, method, config, data)
        state = previous["resume"]
    best: dict[str, Any] = {"state": None}

    def on_epoch(net: nn.Module, run_state: dict[str, Any]) -> None:
        loop = run_state["loop"]
        if best["state"] is None or loop["best_epoch"] == loop["epoch"]:
            best["state"] = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        if save is not None:  # rank 0 writes; the others wait for it (and share its errors)
            distributed.on_rank0(lambda: save_checkpoint(
                save, best["state"], config=config, method=method, data=data, complete=False,
                epoch=loop["epoch"], resume={**run_state, "best_net": best["state"]}))

    if state is not None:
        best["state"] = state["best_net"]
    if save is not None:
        distributed.on_rank0(lambda: check_writable(Path(save).parent, "--save"))
    preflight_methods([method], tasks, config, registry)
    net, fit = _pretrain(method, tasks, config, seed, descs, registry=registry, progress=progress,
                         on_epoch=on_epoch, resume=state)
    if save is not None:  # the best state, also when epoch 0 (no training) was best
        distributed.on_rank0(lambda: save_checkpoint(
            save, net.state_dict(), config=config, method=method, data=data, complete=True,
            epoch=fit.epochs_run))
    return Pretrained(net, method, config, data, fit.epochs_run, fit.seconds, fit.history)


def _previous_run(save: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The checkpoint already at ``save`` when resuming; refuse to replace it otherwise."""
    if save.is_dir():
        raise IsADirectoryError(f"--save {save} is a directory; give a file path, e.g. "
                                f"{save / 'model.ckpt'}")
    if not save.exists():
        if resume:
            log.warning("--resume: no checkpoint at %s yet; starting from the beginning", save)
        return None
    if overwrite:
        return None
    if not resume:
        raise FileExistsError(f"--save {save} already exists; add --resume to continue that "
                              "pre-training, --overwrite to replace it, or choose another path")
    return load_checkpoint(save, allow_incomplete=True)


def evaluate(net: nn.Module | Adapted, task: CityTask, device: str = "cpu") -> dict[str, dict]:
    """Per-channel and mean RMSE / MAE on the target's test windows, in original units
    (``net`` may be an :class:`Adapted` network: its calibration is applied)."""
    adapted = net if isinstance(net, Adapted) else Adapted(net)
    pred, y, mask = adapted.predict(task, "test", device)
    result = metrics.per_channel_metrics(task.to_original(pred), task.to_original(y), mask,
                                         list(task.city.channels))
    _check_finite_metrics(result, f"city {task.name!r}")
    return result


def _check_finite_metrics(result: dict[str, dict], where: str) -> None:
    for name, vals in result.items():
        if not all(np.isfinite(v) for k, v in vals.items() if k in ("rmse", "mae")):
            raise FloatingPointError(f"{where}, channel {name!r}: non-finite error {vals}; the "
                                     "model produced NaN or inf forecasts (nothing was written)")


def adapt(pretrained: Pretrained | str | Path, data_dir: str | Path, target: str,
          train_days: int, *, config: TransferConfig | None = None, seed: int = 0,
          progress: bool = True, registry: Any = None,
          allow_leakage: bool = False) -> dict[str, dict]:
    """Fine-tune on ``train_days`` of the target (0 = zero-shot: evaluate directly); test.

    The adaptation is that of :func:`run_method` (:func:`adapt_to_target`): the learning
    rate of ``config.finetune_lr_grid`` chosen on target validation, then ``config.calibrate``.
    """
    if isinstance(train_days, bool) or not isinstance(train_days, int) or train_days < 0:
        raise ValueError(f"--train-days must be an integer >= 0 (got {train_days!r}): the "
                         "target days to fine-tune on, 0 for zero-shot")
    check_seeds([seed])
    if not isinstance(pretrained, Pretrained):
        pretrained = from_checkpoint(pretrained, config, registry)
    config = config or pretrained.config
    check_device(config.device)
    city = load(data_dir, target, config.target_span)
    spans = (pretrained.data or {}).get("spans", {})
    if city.name in spans:  # pre-trained on the target city: over the same days?
        check_span_leakage(city.name, tuple(spans[city.name]), city.span,
                           allow_leakage=allow_leakage, fix="adapt to another city, give a "
                           "disjoint --target-span, or pre-train without it")
    task = target_task(city, train_days, config)
    net = pretrained.net.to(config.device)
    # the network runs on the target before any fine-tuning (a clear error, not a late one)
    label = config.backbone if isinstance(net, PredictionNetwork) else type(net).__name__
    preflight(net, [task], backbone=label, device=config.device)
    adapted = adapt_to_target(task, config,
                              lambda cfg: finetune(net, task, cfg, seed, progress=progress), net)
    return evaluate(adapted, task, config.device)


def method_label(method: str, config: TransferConfig) -> str:
    """``stbat`` with its ablations named as in the paper, e.g. ``stbat (w/o SimDCL)``."""
    if method != "stbat":
        return method
    opts = config.stbat
    off = [name for flag, name in ((opts.use_poi, "POI"), (opts.use_fdp, "FDP"),
                                    (opts.use_simdcl, "SimDCL"), (opts.use_weighted_loss,
                                                                  "WLoss")) if not flag]
    return f"stbat (w/o {', '.join(off)})" if off else "stbat"


def transfer(data_dir: str | Path, sources: list[str], target: str, *,
             train_days: list[int] | int = 3, methods: list[str] | None = None,
             seeds: int | list[int] = 1, config: TransferConfig | None = None,
             progress: bool = True, histories: dict | None = None, registry: Any = None,
             on_rows: Any = None, out: str | Path | None = None, resume: bool = False,
             overwrite: bool = False, allow_leakage: bool = False) -> list[dict[str, Any]]:
    """Compare methods on one cross-city task; returns result rows (see ``results.py``).

    Each pre-trained method is trained once per seed on the sources and adapted to
    every value of ``train_days``; methods that need target training data (target-only,
    HA, ARIMA) are skipped (not faked) for ``train_days=0``. ``seeds`` is a count
    (``range(seeds)``) or a list of seeds. When ``histories`` is a dict, it receives the
    pre-training history of each ``(method, seed)``; ``on_rows(rows)`` is called with the
    rows of each (method, seed, train-days) as soon as they exist.

    With ``out``, every batch of rows is appended to ``out/results.jsonl`` as it comes (one
    write and an fsync), and ``results.json`` / ``results.md`` hold every row at the end.
    An ``out`` holding an earlier run is refused unless ``resume`` (run only the missing
    (method, train-days, seed) rows: same sources, target and config required) or
    ``overwrite`` (start again). Everything that can be checked without training (cities,
    leakage, splits, methods, device, the output folder, the backbone on every city) is
    checked before the first epoch. A target that is also a source is refused unless
    ``allow_leakage``.
    """
    config = config or TransferConfig()
    methods = list(methods or DEFAULT_METHODS)
    for m in methods:
        get_method(m)
    days = [train_days] if isinstance(train_days, int) else list(train_days)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list or not methods or not days:
        raise ValueError(f"nothing to run: seeds={seeds!r}, methods={methods!r}, "
                         f"train_days={days!r}; give --seeds >= 1, methods and train days")
    _check_methods(methods, days, config)
    check_cities(sources, target)
    check_distinct(methods, "methods", "--methods")
    check_distinct(days, "train days", "--train-days")
    check_seeds(seed_list, "--seeds")
    check_device(config.device)
    log_out = RunFolder(out, resume=resume, overwrite=overwrite) if out is not None else None
    target_city = load(data_dir, target, config.target_span)
    if target in sources:
        check_leakage(load(data_dir, target, config.source_span), target_city,
                      allow_leakage=allow_leakage)
    targets = {d: target_task(target_city, d, config) for d in days}
    if any(get_method(m).pretrains for m in methods):
        src = prepare_sources(data_dir, sources, config)
    else:  # not trained on, but a city named on the command line is still checked
        for name in sources:
            load(data_dir, name, config.source_span)
        src = SourceData([], {}, "none")
    preflight_methods(methods, [*src.tasks, *targets.values()], config, registry)
    identity = {"command": "transfer", "sources": list(sources), "target": target,
                "config": config.to_dict()}
    if log_out is None:
        return _transfer_rows(methods, seed_list, src, targets, config, sources, target,
                              progress, histories, registry, on_rows, set())
    with log_out.open(identity) as done:
        def write(rows: list[dict[str, Any]]) -> None:
            log_out.append(rows)
            if on_rows is not None:
                on_rows(rows)

        _transfer_rows(methods, seed_list, src, targets, config, sources, target, progress,
                       histories, registry, write, done)
        return log_out.finish()


def _transfer_rows(methods: list[str], seed_list: list[int], src: SourceData,
                   targets: dict[int, CityTask], config: TransferConfig, sources: list[str],
                   target: str, progress: bool, histories: dict | None, registry: Any,
                   on_rows: Any, done: set[tuple[str, int, int]]) -> list[dict[str, Any]]:
    """Every (seed, method) not in ``done`` (keys ``(label, train_days, seed)``)."""
    rows: list[dict[str, Any]] = []
    base = _row_base(sources, target, config, src.kind)
    for seed in seed_list:
        for method in methods:
            label = method_label(method, config)
            todo = {d: t for d, t in targets.items() if (label, d, seed) not in done}
            if not todo:
                log.info("%s seed %d: already in the results, skipped", label, seed)
                continue

            def emit(new: list[dict[str, Any]]) -> None:
                full = [{**base, **r} for r in new]
                rows.extend(full)
                if on_rows is not None:
                    on_rows(full)

            run_method(method, seed, src, todo, config, progress=progress,
                       histories=histories, registry=registry, on_rows=emit)
    return rows


def check_cities(sources: list[str], target: str | None = None) -> None:
    """Refuse source cities given more than once."""
    check_distinct(sources, "source cities", "--source")


def check_distinct(values: list[Any], what: str, flag: str) -> None:
    """Refuse a list given with repeats (a repeated method or day would run twice and count
    twice in every mean; a repeated city would weigh twice in pre-training)."""
    dupes = sorted({str(v) for v in values if values.count(v) > 1})
    if dupes:
        raise ValueError(f"{what} {dupes} are given more than once in {flag} "
                         f"{','.join(map(str, values))}; list each once")


def check_seeds(seeds: list[int], flag: str = "--seed") -> None:
    """Refuse seeds that numpy and torch cannot both take: integers 0 .. 2**32 - 1."""
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int)
           or not 0 <= s < 2**32]
    if bad:
        raise ValueError(f"{flag}: a seed must be an integer from 0 to {2**32 - 1} (got "
                         f"{bad}); give e.g. {flag} 0")


def check_leakage(source: City, target: City, *, allow_leakage: bool = False,
                  fix: str = "remove it from --source, give disjoint --source-span / "
                             "--target-span") -> None:
    """Refuse a target that is also a source over overlapping time (its validation and test
    days would be seen in pre-training), unless ``allow_leakage``. Two disjoint periods of one
    city (``--source-span`` / ``--target-span``) are a legitimate task."""
    if source.name == target.name:
        check_span_leakage(target.name, source.span, target.span, allow_leakage=allow_leakage,
                           fix=fix)


def check_span_leakage(name: str, source_span: tuple[str, str], target_span: tuple[str, str], *,
                       allow_leakage: bool = False, fix: str) -> None:
    """:func:`check_leakage` of city ``name``, pre-trained on ``source_span`` (first and last
    time step, ISO strings) and tested on ``target_span``; ``fix`` says how to avoid it."""
    (s0, s1), (t0, t1) = source_span, target_span
    if max(s0, t0) <= min(s1, t1):
        if not allow_leakage:
            raise ValueError(
                f"the target {name!r} is also a source over overlapping time (source {s0} .. "
                f"{s1}, target {t0} .. {t1}): its validation and test days would be seen in "
                f"pre-training (leakage); {fix}, or pass --allow-leakage")
        log.warning("target %r is also a source over overlapping time (--allow-leakage): "
                    "do not report these numbers as transfer", name)


def check_device(device: str) -> None:
    """Refuse a torch device that this machine or this torch build cannot use."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device {device!r} is not a torch device ({exc}); use cpu, cuda "
                         "or cuda:0") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch has no CUDA support" if torch.version.cuda is None else \
                "no CUDA device is visible"
            raise ValueError(f"--device {device}: {build}; use --device cpu (or install a CUDA "
                             "build of torch on a machine with a GPU)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA "
                             f"device(s) here; use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: device type {dev.type!r} is not supported; use "
                         "cpu or cuda")


def _row_base(sources: list[str], target: str, config: TransferConfig, kind: str) -> dict:
    return {"sources": ",".join(sources), "target": target, "backbone": config.backbone,
            "descriptors": kind, "config": config.to_dict()}


def _check_methods(methods: list[str], days: list[int], config: TransferConfig) -> None:
    """Refuse, before any training, settings a method cannot run with."""
    for m in methods:
        spec = get_method(m)
        if spec.horizon_one and config.horizon != 1:
            raise ValueError(f"method {m!r} forecasts one step ahead only; use --horizon 1 or "
                             f"drop {m} from --methods")
        if not spec.zero_shot and days and all(d == 0 for d in days):
            raise ValueError(f"method {m!r} needs target training days, but --train-days is "
                             f"{days}; add a few-shot setting (e.g. --train-days 3,0) or drop {m}")


def run_method(method: str, seed: int, src: SourceData, targets: dict[int, CityTask],
               config: TransferConfig, *, progress: bool = True, histories: dict | None = None,
               registry: Any = None, pretrained: nn.Module | None = None,
               pretrained_info: dict[int, dict[str, Any]] | None = None,
               on_pretrained: Callable[[nn.Module, dict[int, dict[str, Any]]], None] | None = None,
               on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
               ) -> list[dict[str, Any]]:
    """Rows of one method and seed on every target setting (pre-training once, if any).

    ``pretrained`` skips pre-training with a network already trained for this
    (method, config, seed), e.g. from a cache, and ``pretrained_info`` gives what the
    method's ``target_info`` computed then, per train-days. ``on_pretrained(net, info)`` is
    called right after pre-training (e.g. to cache both) and ``on_rows(rows)`` with the rows
    of each target setting as soon as they exist. Before pre-training, the method's network
    runs once on every source and target city (:func:`preflight_methods`).
    """
    spec = get_method(method)
    label = method_label(method, config)
    rows: list[dict[str, Any]] = []
    net, pre_seconds, info = pretrained, 0.0, dict(pretrained_info or {})
    if spec.pretrains and net is None:
        preflight_methods([method], [*src.tasks, *targets.values()], config, registry)
        start = time.perf_counter()
        net, fit = _pretrain(method, src.tasks, config, seed, src.descriptors,
                             registry=registry, progress=progress)
        pre_seconds = time.perf_counter() - start
        if histories is not None:
            histories[(label, seed)] = fit.history
        log.info("%s seed %d: pre-trained in %.1fs", label, seed, pre_seconds)
        if spec.target_info is not None:
            info = {d: spec.target_info(fit.model, t, src.kind) for d, t in targets.items()}
        if on_pretrained is not None:
            on_pretrained(net, info)
    for days, task in targets.items():
        if days == 0 and not spec.zero_shot:
            continue  # needs target training data: no zero-shot version exists
        start = time.perf_counter()
        forecast = spec.adapt(net, task, config, seed, registry, progress)
        forecast.info.update(info.get(days, {}), region_volume=region_volume(task))
        seconds = time.perf_counter() - start
        new = [{"method": label, "train_days": days, "channel": channel, "seed": seed,
                "rmse": vals["rmse"], "mae": vals["mae"], "seconds": seconds,
                "pretrain_seconds": pre_seconds, "scaler_fit_on": task.scaler_fit_on,
                "info": forecast.info, "regions": vals["regions"]}
               for channel, vals in evaluate_forecast(
                   forecast, list(task.city.channels),
                   f"method {label!r}, seed {seed}, {days} train day(s)").items()]
        if on_rows is not None:
            on_rows(new)
        rows += new
    return rows


def region_volume(task: CityTask) -> list[float | None]:
    """Mean observed flow of each region (channels summed) over the target's scaler-fit slice
    (training days; validation days in zero-shot); ``None`` where nothing was observed."""
    return [None if np.isnan(m) else float(m) for m in task.city.mean_flow(task.fit_slice)]


def evaluate_forecast(fc: Any, channels: list[str], where: str = "forecast"
                      ) -> dict[str, dict[str, Any]]:
    """Per-channel and mean RMSE / MAE, and each region's errors, of a forecast.

    Raises an error naming the channel when an error is not finite (never written as NaN).
    """
    out: dict[str, dict[str, Any]] = {}
    summary = metrics.per_channel_metrics(fc.pred, fc.target, fc.mask, channels)
    per_region = [metrics.per_region_errors(fc.pred[..., i], fc.target[..., i], fc.mask[..., i])
                  for i in range(len(channels))]
    _check_finite_metrics(summary, where)
    for i, name in enumerate(channels):
        out[name] = {**summary[name], "regions": per_region[i]}
    out["mean"] = {**summary["mean"], "regions": _mean_regions(per_region)}
    return out


def _mean_regions(per_region: list[dict[str, list]]) -> dict[str, list]:
    n = len(per_region[0]["rmse"])
    mean: dict[str, list] = {}
    for key in ("rmse", "mae"):
        vals = [[pr[key][j] for pr in per_region] for j in range(n)]
        mean[key] = [None if any(v is None for v in col) else float(np.mean(col)) for col in vals]
    mean["count"] = [int(sum(pr["count"][j] for pr in per_region)) for j in range(n)]
    return mean


def datasets(data_dir: str | Path) -> str:
    """A markdown table of the cities in ``data_dir``."""
    from stbat_plugin.data import format_city_table, list_cities

    return format_city_table(list_cities(data_dir))


def backbones(registry: Any = None) -> list[dict[str, Any]]:
    """Installed backbones with their plugin, distribution and version."""
    reg = registry or default_registry()
    return [{"name": s.name, "layout": s.layout, "plugin": s.plugin,
             "distribution": s.distribution, "version": s.version,
             "description": s.description} for s in reg.specs()]

