"""A city prepared for training or evaluation: split, scaler, graph, windows, masks.

Channels are independent tasks (the paper trains pickup and drop-off
separately and reports their mean): every model is univariate and the channels
of a batch are folded into the batch axis, so one pre-trained network serves
cities with any number of channels.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import einops
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from stbat_plugin.backbone import CityFacts, backbone_layout, city_context
from stbat_plugin.data import (
    City,
    GraphContext,
    ScalerError,
    Split,
    WindowDataset,
    build_graph,
    make_scaler,
    source_split,
    target_split,
    valid_region_mask,
)
from stbat_plugin.data.covariates import time_features
from stbat_plugin.data.splits import steps_per_day
from stbat_plugin.data.windows import history_steps, window_count
from stbat_plugin.network import PredictionNetwork
from stbat_plugin.pipeline.config import TransferConfig

__all__ = ["CityTask", "source_task", "target_task", "fold_channels", "unfold_channels",
           "lag_steps"]

log = logging.getLogger(__name__)


@dataclass
class CityTask:
    """One city, split and scaled, with its windows and graph."""

    city: City
    role: str  # "source" or "target"
    split: Split
    scaler: Any
    scaler_fit_on: str  # "train" or "val" (zero-shot target: no training data exists)
    region_mask: np.ndarray
    graph: GraphContext
    scaled: np.ndarray
    window: int
    horizon: int
    covariates: np.ndarray | None = None  # [T, k] per-step covariates (time of day, ...)
    lags: tuple[int, ...] = ()  # seasonal lag inputs, in steps of this city
    #: graph keyword arguments per model instance (held weakly) and device
    _context_cache: weakref.WeakKeyDictionary[Any, dict[str, dict[str, Any]]] = field(
        default_factory=weakref.WeakKeyDictionary)

    @property
    def name(self) -> str:
        return self.city.name

    @property
    def has_training_days(self) -> bool:
        return self.split.train.stop > self.split.train.start

    @property
    def fit_slice(self) -> slice:
        """Where the scaler was fitted: the training slice, or validation in zero-shot."""
        return self.split.train if self.has_training_days else self.split.val

    def cell_mask(self, sl: slice) -> np.ndarray:
        """Cells that count in ``sl``: observed and in a valid region. Shapes: -> [T', n, 1]."""
        return self.city.observed[sl][..., None] & self.region_mask[None, :, None]

    def dataset(self, part: str) -> WindowDataset:
        """Windows of ``"train"``, ``"val"`` or ``"test"`` (training stays inside its slice)."""
        sl = getattr(self.split, part)
        if sl is None:
            raise ValueError(f"City {self.name!r} ({self.role}) has no {part} slice")
        context = "inside" if part == "train" else "history"
        return WindowDataset(self.scaled, self.city.observed, self.region_mask, sl.start,
                             sl.stop, window=self.window, horizon=self.horizon, context=context,
                             covariates=self.covariates, lags=self.lags)

    def loader(self, part: str, batch_size: int, *, shuffle: bool,
               generator: torch.Generator | None = None,
               drop_last: bool | None = None) -> DataLoader:
        """Batches of a part; training drops its last incomplete batch unless ``drop_last``
        is False (e.g. to predict every training window)."""
        ds = self.dataset(part)
        drop_last = part == "train" if drop_last is None else drop_last
        size = min(batch_size, len(ds)) if drop_last else batch_size
        return DataLoader(ds, batch_size=max(size, 1), shuffle=shuffle, drop_last=drop_last,
                          generator=generator)

    def city_info(self, device: torch.device | str) -> CityFacts:
        """What a backbone's ``prepare_city`` may use: the training slice (channels summed)
        ``[T, n, 1]``, never validation or test, with the city's steps per day and geography."""
        tr = self.split.train
        flow = torch.as_tensor(self.scaled[tr.start:tr.stop]).sum(-1, keepdim=True).to(device)
        graph = self.graph.to(device)
        coords = None if self.city.coords is None else torch.as_tensor(self.city.coords).to(device)
        return CityFacts(num_regions=self.scaled.shape[1],
                        steps_per_day=steps_per_day(self.city.interval_minutes), train_flow=flow,
                        coords=coords, edge_index=graph.edge_index, edge_weight=graph.edge_weight)

    def graph_kwargs(self, net: Any, device: torch.device | str) -> dict[str, Any]:
        """``edge_index``/``edge_weight`` (+ ``grid_shape``, + the backbone's per-city context
        from :meth:`city_info`), computed once per model instance and device."""
        extractor = net.extractor if isinstance(net, PredictionNetwork) else net
        per_device = self._context_cache.setdefault(extractor, {})
        key = str(device)
        if key not in per_device:
            kwargs: dict[str, Any] = dict(self.graph.to(device).as_kwargs())
            if self.city.grid_shape is not None:
                kwargs["grid_shape"] = tuple(self.city.grid_shape)
            elif backbone_layout(extractor) == "grid":
                raise ValueError(
                    f"Backbone {type(extractor).__name__} needs a grid city, but {self.name!r} "
                    "has no grid_shape; use a graph backbone (e.g. graph_stnet)"
                )
            kwargs.update(city_context(extractor, self.city_info(device)))
            per_device[key] = kwargs
        return per_device[key]

    def to_original(self, scaled: Tensor) -> Tensor:
        """Inverse-transform ``[..., n, c]`` predictions to original units."""
        return torch.as_tensor(self.scaler.inverse_transform(scaled))


def _scale(city: City, fit_slice: slice, config: TransferConfig,
           role: str) -> tuple[Any, np.ndarray]:
    scaler = make_scaler(config.scaler)
    if scaler.requires_nonnegative:
        _check_nonnegative(city, config.scaler, role)
    try:
        scaler.fit(city.flow[fit_slice], city.observed[fit_slice])
        return scaler, np.asarray(scaler.transform(city.flow), dtype=np.float32)
    except ScalerError as exc:
        stamps = city.timestamps[fit_slice]
        days = f"{stamps[0]} .. {stamps[-1]}" if len(stamps) else "no step"
        fix = "--source-span" if role == "source" else "--target-span or the split's days"
        raise ScalerError(f"{role} city {city.name!r}, scaler fitted on {days}: "
                          f"{str(exc).rstrip('.')}; if the file is right, change {fix}") from exc


def _check_nonnegative(city: City, scaler: str, role: str) -> None:
    """Refuse a city with a negative flow cell for a scaler defined for flows >= 0 only (the
    scaler transforms every cell, so unobserved cells count too)."""
    negative = city.flow < 0
    if negative.any():
        t, n, c = (int(i) for i in np.argwhere(negative)[0])
        raise ScalerError(
            f"{role} city {city.name!r}, channel {city.channels[c]!r}: {int(negative.sum())} "
            f"negative flow cell(s), first at step {t} ({city.timestamps[t]}) in region {n}; "
            f"--scaler {scaler} needs flows >= 0: use --scaler minmax or zscore")


def lag_steps(city: City, config: TransferConfig) -> tuple[int, ...]:
    """``config.lag_days`` in steps of ``city`` (days x steps per day)."""
    if not config.lag_days:
        return ()
    return tuple(d * steps_per_day(city.interval_minutes) for d in config.lag_days)


def _need(config: TransferConfig, lags: tuple[int, ...]) -> str:
    """What one window needs, in words: ``24 input + 1 target steps`` (+ the lag history)."""
    text = f"{config.window} input + {config.horizon} target steps"
    if lags:
        text += (f" + {history_steps(config.window, lags) - config.window} steps of history "
                 f"for the {max(config.lag_days)}-day lag input")
    return text


def source_task(city: City, config: TransferConfig) -> CityTask:
    """A source city: chronological train:val (2:1 by default), scaler fitted on train."""
    split = source_split(city.num_steps, config.source_train_ratio, config.source_val_ratio)
    scaler, scaled = _scale(city, split.train, config, "source")
    mask = valid_region_mask(city, split.train)
    task = CityTask(city, "source", split, scaler, "train", mask, build_graph(city), scaled,
                    config.window, config.horizon, _covariates(city, config),
                    lag_steps(city, config))
    _check_observed(task, ("train", "val"), "--source-span, or drop this source")
    return task


def target_task(city: City, train_days: int, config: TransferConfig) -> CityTask:
    """The target city: ``train_days`` then ``val_days`` then ``test_days``, at the end.

    The scaler is fitted on the training days; in zero-shot (``train_days=0``) no
    target flow exists for training, so it is fitted on the validation slice
    (documented in the results as ``scaler_fit_on="val"``).
    """
    per_day = steps_per_day(city.interval_minutes)
    split = target_split(city.num_steps, per_day, train_days, config.val_days,
                         config.test_days, name=f"target city {city.name!r}")
    fit_on = "train" if train_days > 0 else "val"
    lags = lag_steps(city, config)
    if train_days > 0 and window_count(city.num_steps, split.train.start, split.train.stop,
                                       config.window, config.horizon, "inside", lags) == 0:
        need = history_steps(config.window, lags) + config.horizon
        fix = f"use --train-days {math.ceil(need / per_day)} or more"
        if lags:
            fix += f", drop the {max(config.lag_days)}-day lag from --lag-days"
        steps = split.train.stop - split.train.start
        raise ValueError(
            f"Target {city.name!r}: {train_days} training day(s) ({steps} steps) hold no "
            f"training window, which needs {need} steps "
            f"({_need(config, lags)}) inside the training days; {fix}, or a smaller --window"
        )
    scaler, scaled = _scale(city, split.train if train_days > 0 else split.val, config, "target")
    mask = valid_region_mask(city, split.train)
    task = CityTask(city, "target", split, scaler, fit_on, mask, build_graph(city), scaled,
                    config.window, config.horizon, _covariates(city, config), lags)
    parts = ("train", "val", "test") if train_days > 0 else ("val", "test")
    _check_observed(task, parts, "--target-span, --val-days / --test-days")
    return task


def _check_observed(task: CityTask, parts: tuple[str, ...], fix: str) -> None:
    """Every part must have windows with at least one observed target cell, or the run
    could only fail (or score nothing) after training: refuse it now, naming the part."""
    for part in parts:
        ds = task.dataset(part)
        if len(ds) == 0:
            lag = "" if not task.lags else (f" and {max(task.lags) - 1} steps of history for "
                                            "its longest --lag-days input")
            raise ValueError(f"{task.role} city {task.name!r}: the {part} part has no window of "
                             f"{task.window}+{task.horizon} steps{lag}; change {fix}, or "
                             f"--window{' or --lag-days' if task.lags else ''}")
        first, last = int(ds.t_indices[0]), int(ds.t_indices[-1]) + task.horizon
        observed = task.cell_mask(slice(first, last))
        if not observed.any():
            sl = getattr(task.split, part)
            days = task.city.timestamps[[sl.start, sl.stop - 1]].astype(str)
            raise ValueError(f"{task.role} city {task.name!r}: the {part} part ({days[0]} .. "
                             f"{days[1]}) has no observed cell in a valid region, so it cannot "
                             f"be trained on or scored; change {fix}")


def _covariates(city: City, config: TransferConfig) -> np.ndarray | None:
    return time_features(city.timestamps) if config.time_features else None


def fold_channels(batch: dict[str, Tensor], device: torch.device | str) -> tuple[Tensor, ...]:
    """``x [b, t, n, c]`` -> ``[(b c), t, n, 1]`` (and y, mask): channels as separate samples.

    Seasonal lag inputs ``lags [b, t, n, c, l]`` belong to their channel: each folded sample
    gets its own channel's ``l`` lag series. Covariates ``cov [b, t, k]`` are shared by the
    channels and appended to every region's input. ``x`` becomes ``[(b c), t, n, 1 + l + k]``:
    the series, its lags, then the covariates.
    """
    x = einops.rearrange(batch["x"], "b t n c -> (b c) t n 1").to(device)
    if "lags" in batch:
        lags = einops.rearrange(batch["lags"], "b t n c l -> (b c) t n l").to(device)
        x = torch.cat([x, lags], dim=-1)
    if "cov" in batch:
        b, t, n, c = batch["x"].shape
        cov = einops.repeat(batch["cov"], "b t k -> (b c) t n k", c=c, n=n).to(device)
        x = torch.cat([x, cov], dim=-1)
    y = einops.rearrange(batch["y"], "b s n c -> (b c) s n 1").to(device)
    m = einops.rearrange(batch["mask"], "b s n c -> (b c) s n 1").to(device)
    return x, y, m


def unfold_channels(pred: Tensor, channels: int) -> Tensor:
    """``[(b c), s, n, 1]`` -> ``[b, s, n, c]``."""
    return einops.rearrange(pred, "(b c) s n 1 -> b s n c", c=channels)


def round_robin(loaders: dict[str, DataLoader], rng: np.random.Generator,
                max_batches: int | None = None) -> Iterator[tuple[str, dict[str, Tensor]]]:
    """Batches of every source city, each batch from one city, cities shuffled in turn."""
    iters = {name: iter(loader) for name, loader in loaders.items()}
    count = 0
    while iters and (max_batches is None or count < max_batches):
        for name in rng.permutation(list(iters)):
            if max_batches is not None and count >= max_batches:
                return
            try:
                yield str(name), next(iters[name])
                count += 1
            except StopIteration:
                del iters[name]
