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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from stbat_plugin import metrics
from stbat_plugin._registry import default_registry
from stbat_plugin.checkpoint import load_checkpoint, save_checkpoint
from stbat_plugin.config import TransferConfig
from stbat_plugin.data import City, load_city, parse_span, region_descriptors, span_of
from stbat_plugin.method_registry import get_method, method_names
from stbat_plugin.methods import (
    finetune,
    predict,
)
from stbat_plugin.methods import (
    pretrain as _pretrain,
)
from stbat_plugin.preflight import preflight_methods
from stbat_plugin.tasks import CityTask, source_task, target_task

__all__ = ["Pretrained", "SourceData", "load", "prepare_sources", "pretrain", "adapt",
           "transfer", "run_method", "evaluate", "evaluate_forecast", "method_label"]

log = logging.getLogger(__name__)

#: what ``transfer`` compares when no methods are given
DEFAULT_METHODS = ("stbat", "finetune", "target-only", "persistence", "ha")


@dataclass
class Pretrained:
    """A pre-trained transferable network and where it came from."""

    net: nn.Module  # the transferable network (backbone + predictor, or NLinear)
    method: str
    config: TransferConfig
    data: dict[str, Any]
    epochs: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


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
    descs, kind = region_descriptors([t.city for t in tasks], [t.split.train for t in tasks],
                                     kind=config.descriptors)
    if kind != "poi":
        log.warning("Region descriptors: %s fallback (not every source city has POI)", kind)
    return SourceData(tasks, {t.name: d.values for t, d in zip(tasks, descs, strict=True)}, kind)


def pretrain(data_dir: str | Path, sources: list[str], *, method: str = "stbat",
             config: TransferConfig | None = None, seed: int = 0, save: str | Path | None = None,
             progress: bool = True, registry: Any = None) -> Pretrained:
    """Pre-train ``method`` (stbat, finetune or maml) on the sources; optionally save it.

    ``registry``: the backbone registry (default: the installed plugins). A backbone that
    cannot run on a source city fails before training (:func:`preflight_methods`).
    """
    config = config or TransferConfig()
    if not get_method(method).pretrains:
        pre = [m for m in method_names() if get_method(m).pretrains]
        raise ValueError(f"Method {method!r} is not pre-trained; choose from {pre}")
    src = prepare_sources(data_dir, sources, config)
    tasks, descs, kind = src.tasks, src.descriptors, src.kind
    data = {"sources": list(sources), "descriptors": kind, "seed": seed,
            "spans": {t.name: t.city.span for t in tasks},
            "channels": {t.name: list(t.city.channels) for t in tasks}}

    def checkpoint(net: nn.Module) -> None:
        if save is not None:  # best-so-far, atomically: an interrupted run keeps its best model
            save_checkpoint(save, net.state_dict(), config=config, method=method, data=data)

    preflight_methods([method], tasks, config, registry)
    net, fit = _pretrain(method, tasks, config, seed, descs, registry=registry, progress=progress,
                         on_improve=checkpoint)
    checkpoint(net)  # the best state, also when epoch 0 (no training) was best
    return Pretrained(net, method, config, data, fit.epochs_run, fit.seconds, fit.history)


def from_checkpoint(path: str | Path, config: TransferConfig | None = None,
                    registry: Any = None) -> Pretrained:
    """Rebuild the pre-trained network of a checkpoint (checked against ``config``), with the
    backbones of ``registry`` (default: the installed plugins)."""
    payload = load_checkpoint(path, expect_backbone=config.backbone if config else None,
                              expect_config=config)
    saved = TransferConfig.from_dict(payload["config"])
    net = get_method(payload["method"]).network(saved, registry)
    net.load_state_dict(payload["state_dict"])
    run_config = replace(config, **saved.model_signature()) if config else saved
    return Pretrained(net, payload["method"], run_config, payload["data"])


def evaluate(net: nn.Module, task: CityTask, device: str = "cpu") -> dict[str, dict]:
    """Per-channel and mean RMSE / MAE on the target's test windows, in original units."""
    pred, y, mask = predict(net, task, "test", device)
    return metrics.per_channel_metrics(task.to_original(pred), task.to_original(y), mask,
                                       list(task.city.channels))


def adapt(pretrained: Pretrained | str | Path, data_dir: str | Path, target: str,
          train_days: int, *, config: TransferConfig | None = None, seed: int = 0,
          progress: bool = True, registry: Any = None) -> dict[str, dict]:
    """Fine-tune on ``train_days`` of the target (0 = zero-shot: evaluate directly); test."""
    if not isinstance(pretrained, Pretrained):
        pretrained = from_checkpoint(pretrained, config, registry)
    config = config or pretrained.config
    task = target_task(load(data_dir, target, config.target_span), train_days, config)
    net = pretrained.net.to(config.device)
    if train_days > 0:
        net, _ = finetune(net, task, config, seed, progress=progress)
    return evaluate(net, task, config.device)


def method_label(method: str, config: TransferConfig) -> str:
    """``stbat`` with its ablations named as in the paper, e.g. ``stbat (w/o SimDCL)``."""
    if method != "stbat":
        return method
    off = [name for flag, name in ((config.use_poi, "POI"), (config.use_fdp, "FDP"),
                                    (config.use_simdcl, "SimDCL"), (config.use_weighted_loss,
                                                                    "WLoss")) if not flag]
    return f"stbat (w/o {', '.join(off)})" if off else "stbat"


def transfer(data_dir: str | Path, sources: list[str], target: str, *,
             train_days: list[int] | int = 3, methods: list[str] | None = None,
             seeds: int | list[int] = 1, config: TransferConfig | None = None,
             progress: bool = True, histories: dict | None = None, registry: Any = None,
             on_rows: Any = None) -> list[dict[str, Any]]:
    """Compare methods on one cross-city task; returns result rows (see ``results.py``).

    Each pre-trained method is trained once per seed on the sources and adapted to
    every value of ``train_days``; methods that need target training data (target-only,
    HA, ARIMA) are skipped (not faked) for ``train_days=0``. ``seeds`` is a count
    (``range(seeds)``) or a list of seeds. When ``histories`` is a dict, it receives the
    pre-training history of each ``(method, seed)``; ``on_rows(rows)`` is called with the
    rows of each (method, seed) as soon as they exist.
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
    target_city = load(data_dir, target, config.target_span)
    targets = {d: target_task(target_city, d, config) for d in days}
    src = prepare_sources(data_dir, sources, config) if any(
        get_method(m).pretrains for m in methods) else SourceData([], {}, "none")
    preflight_methods(methods, [*src.tasks, *targets.values()], config, registry)
    rows: list[dict[str, Any]] = []
    for seed in seed_list:
        for method in methods:
            new = run_method(method, seed, src, targets, config, progress=progress,
                             histories=histories, registry=registry)
            new = [{**_row_base(sources, target, config, src.kind), **r} for r in new]
            if on_rows is not None:
                on_rows(new)
            rows += new
    return rows


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
               for channel, vals in evaluate_forecast(forecast, list(task.city.channels)).items()]
        if on_rows is not None:
            on_rows(new)
        rows += new
    return rows


def region_volume(task: CityTask) -> list[float | None]:
    """Mean observed flow of each region (channels summed) over the target's scaler-fit slice
    (training days; validation days in zero-shot); ``None`` where nothing was observed."""
    sl = task.fit_slice
    flow = task.city.flow[sl].sum(-1, dtype=np.float64)
    obs = task.city.observed[sl]
    count = obs.sum(0)
    mean = np.where(obs, flow, 0.0).sum(0) / np.maximum(count, 1)
    return [float(m) if c else None for m, c in zip(mean, count, strict=True)]


def evaluate_forecast(fc: Any, channels: list[str]) -> dict[str, dict[str, Any]]:
    """Per-channel and mean RMSE / MAE, and each region's errors, of a forecast.

    Raises an error naming the channel when an error is not finite (never written as NaN).
    """
    out: dict[str, dict[str, Any]] = {}
    summary = metrics.per_channel_metrics(fc.pred, fc.target, fc.mask, channels)
    per_region = [metrics.per_region_errors(fc.pred[..., i], fc.target[..., i], fc.mask[..., i])
                  for i in range(len(channels))]
    for name, vals in summary.items():
        if not all(np.isfinite(v) for v in vals.values()):
            raise FloatingPointError(f"channel {name!r}: non-finite error {vals}; the model "
                                     "produced NaN or inf forecasts")
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

