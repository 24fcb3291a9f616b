"""Python API of the cross-city pipeline; the ``stbat`` CLI is a thin layer over it.

- :func:`pretrain`: pre-train one method on source cities (optionally save a checkpoint).
- :func:`adapt`: adapt a pre-trained network (or a checkpoint) to a target city and test it.
- :func:`transfer`: the whole comparison: every method x seed x train-days on one task.
- :func:`datasets`, :func:`backbones`: what is available.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stbat_plugin import classical, metrics
from stbat_plugin._registry import default_registry
from stbat_plugin.checkpoint import load_checkpoint, save_checkpoint
from stbat_plugin.config import METHODS, PRETRAINED_METHODS, TransferConfig
from stbat_plugin.data import City, load_city, parse_span, region_descriptors
from stbat_plugin.methods import (
    build_network,
    finetune,
    predict,
    train_target_only,
)
from stbat_plugin.methods import (
    pretrain as _pretrain,
)
from stbat_plugin.network import PredictionNetwork
from stbat_plugin.tasks import CityTask, source_task, target_task

__all__ = ["Pretrained", "load", "prepare_sources", "pretrain", "adapt", "transfer",
           "evaluate", "method_label"]

log = logging.getLogger(__name__)


@dataclass
class Pretrained:
    """A pre-trained transferable network and where it came from."""

    net: PredictionNetwork
    method: str
    config: TransferConfig
    data: dict[str, Any]
    epochs: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def load(data_dir: str | Path, name: str, span: str | None) -> City:
    city = load_city(data_dir, name)
    start, end = parse_span(span) if span else (None, None)
    return city.restrict(start, end) if (start or end) else city


def prepare_sources(data_dir: str | Path, sources: list[str], config: TransferConfig
                    ) -> tuple[list[CityTask], dict[str, np.ndarray], str]:
    """Source tasks plus region descriptors (POI, or the temporal-profile fallback)."""
    if not sources:
        raise ValueError("Give at least one source city (--source a,b)")
    tasks = [source_task(load(data_dir, s, config.source_span), config) for s in sources]
    descs, kind = region_descriptors([t.city for t in tasks], [t.split.train for t in tasks],
                                     kind=config.descriptors)
    if kind != "poi":
        log.warning("Region descriptors: %s fallback (not every source city has POI)", kind)
    return tasks, {t.name: d.values for t, d in zip(tasks, descs, strict=True)}, kind


def pretrain(data_dir: str | Path, sources: list[str], *, method: str = "stbat",
             config: TransferConfig | None = None, seed: int = 0, save: str | Path | None = None,
             progress: bool = True) -> Pretrained:
    """Pre-train ``method`` (stbat, finetune or maml) on the sources; optionally save it."""
    config = config or TransferConfig()
    if method not in PRETRAINED_METHODS:
        raise ValueError(f"Unknown pre-training method {method!r}; choose from {PRETRAINED_METHODS}")
    tasks, descs, kind = prepare_sources(data_dir, sources, config)
    data = {"sources": list(sources), "descriptors": kind, "seed": seed,
            "spans": {t.name: t.city.span for t in tasks},
            "channels": {t.name: list(t.city.channels) for t in tasks}}

    def checkpoint(net: PredictionNetwork) -> None:
        if save is not None:  # best-so-far, atomically: an interrupted run keeps its best model
            save_checkpoint(save, net.state_dict(), config=config, method=method, data=data)

    net, fit = _pretrain(method, tasks, config, seed, descs, progress=progress,
                         on_improve=checkpoint)
    checkpoint(net)  # the best state, also when epoch 0 (no training) was best
    return Pretrained(net, method, config, data, fit.epochs_run, fit.seconds, fit.history)


def from_checkpoint(path: str | Path, config: TransferConfig | None = None) -> Pretrained:
    """Rebuild the pre-trained network of a checkpoint (checked against ``config``)."""
    payload = load_checkpoint(path, expect_backbone=config.backbone if config else None,
                              expect_config=config)
    saved = TransferConfig.from_dict(payload["config"])
    net = build_network(saved)
    net.load_state_dict(payload["state_dict"])
    run_config = replace(config, **saved.model_signature()) if config else saved
    return Pretrained(net, payload["method"], run_config, payload["data"])


def evaluate(net: PredictionNetwork, task: CityTask, device: str = "cpu") -> dict[str, dict]:
    """Per-channel and mean RMSE / MAE on the target's test windows, in original units."""
    pred, y, mask = predict(net, task, "test", device)
    return metrics.per_channel_metrics(task.to_original(pred), task.to_original(y), mask,
                                       list(task.city.channels))


def adapt(pretrained: Pretrained | str | Path, data_dir: str | Path, target: str,
          train_days: int, *, config: TransferConfig | None = None, seed: int = 0,
          progress: bool = True) -> dict[str, dict]:
    """Fine-tune on ``train_days`` of the target (0 = zero-shot: evaluate directly); test."""
    if not isinstance(pretrained, Pretrained):
        pretrained = from_checkpoint(pretrained, config)
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
             seeds: int = 1, config: TransferConfig | None = None,
             progress: bool = True, histories: dict | None = None) -> list[dict[str, Any]]:
    """Compare methods on one cross-city task; returns result rows (see ``results.py``).

    Each pre-trained method is trained once per seed on the sources and adapted to
    every value of ``train_days``; target-only, HA and ARIMA need target training
    data and are skipped (not faked) for ``train_days=0``. When ``histories`` is a
    dict, it receives the pre-training history of each ``(method, seed)``.
    """
    config = config or TransferConfig()
    methods = list(methods or ["stbat", "finetune", "target-only", "ha"])
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {list(METHODS)}")
    days = [train_days] if isinstance(train_days, int) else list(train_days)
    target_city = load(data_dir, target, config.target_span)
    targets = {d: target_task(target_city, d, config) for d in days}
    needs_sources = any(m in PRETRAINED_METHODS for m in methods)
    src = prepare_sources(data_dir, sources, config) if needs_sources else ([], {}, "none")
    rows: list[dict[str, Any]] = []
    for seed in range(seeds):
        for method in methods:
            rows += _run_method(method, seed, src, targets, config, progress, histories)
    base = {"sources": ",".join(sources), "target": target, "backbone": config.backbone,
            "descriptors": src[2], "config": config.to_dict()}
    return [{**base, **row} for row in rows]


def _run_method(method: str, seed: int, src: tuple, targets: dict[int, CityTask],
                config: TransferConfig, progress: bool, histories: dict | None
                ) -> list[dict[str, Any]]:
    tasks, descs, _ = src
    label = method_label(method, config)
    rows: list[dict[str, Any]] = []
    pre = None
    if method in PRETRAINED_METHODS:
        start = time.perf_counter()
        pre = _pretrain(method, tasks, config, seed, descs, progress=progress)
        if histories is not None:
            histories[(label, seed)] = pre[1].history
        log.info("%s seed %d: pre-trained in %.1fs", label, seed, time.perf_counter() - start)
    for days, task in targets.items():
        if days == 0 and method not in PRETRAINED_METHODS:
            continue  # needs target training data: no zero-shot version exists
        start = time.perf_counter()
        result = _adapt_one(method, pre, task, days, config, seed, progress)
        seconds = time.perf_counter() - start
        for channel, vals in result.items():
            rows.append({"method": label, "train_days": days, "channel": channel, "seed": seed,
                         "rmse": vals["rmse"], "mae": vals["mae"], "seconds": seconds,
                         "scaler_fit_on": task.scaler_fit_on})
    return rows


def _adapt_one(method: str, pre: Any, task: CityTask, days: int, config: TransferConfig,
               seed: int, progress: bool) -> dict[str, dict]:
    if method in PRETRAINED_METHODS:
        net = pre[0]
        if days > 0:
            net, _ = finetune(net, task, config, seed, progress=progress)
        return evaluate(net, task, config.device)
    if method == "target-only":
        net, _ = train_target_only(task, config, seed, progress=progress)
        return evaluate(net, task, config.device)
    return _classical(method, task, config)


def _classical(method: str, task: CityTask, config: TransferConfig) -> dict[str, dict]:
    if config.horizon != 1:
        raise ValueError(f"{method} is implemented for horizon=1 (got {config.horizon})")
    city, split = task.city, task.split
    if split.test is None:
        raise ValueError(f"{method}: city {city.name!r} has no test slice")
    eval_slice = slice(max(split.test.start, config.window), split.test.stop)
    if method == "ha":
        pred = classical.historical_average(city, split.train, eval_slice)
    else:
        pred = classical.arima_forecast(city, split.train, eval_slice)
    target = city.flow[eval_slice]
    mask = city.observed[eval_slice][..., None] & task.region_mask[None, :, None]
    mask = np.broadcast_to(mask, target.shape).copy()
    return metrics.per_channel_metrics(torch.as_tensor(pred), torch.as_tensor(target),
                                       torch.as_tensor(mask), list(city.channels))


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

