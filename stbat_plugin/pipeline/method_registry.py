"""The registry of methods the pipeline compares: one :class:`Method` entry per method.

Each entry says whether the method is pre-trained on the source cities, whether it runs
zero-shot (no target training days), and how it produces a test forecast. The API, the
CLI and the results table read this registry; adding a method is one :func:`register_method`
call (see the entries at the bottom of this file).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from stbat_plugin import functional as SF
from stbat_plugin.data.descriptors import region_descriptors
from stbat_plugin.data.splits import steps_per_day
from stbat_plugin.pipeline import classical, metrics
from stbat_plugin.pipeline.config import TransferConfig
from stbat_plugin.pipeline.methods import (
    Adapted,
    PretrainSetup,
    adapt_to_target,
    build_linear,
    build_network,
    finetune,
    linear_setup,
    maml_setup,
    original_rmse,
    plain_setup,
    stbat_setup,
    train_target_only,
)
from stbat_plugin.pipeline.tasks import CityTask
from stbat_plugin.riam import normalize_descriptors

__all__ = ["Forecast", "Method", "METHODS", "register_method", "get_method", "method_names"]


@dataclass
class Forecast:
    """Test forecast of one method in ORIGINAL units, with what the method chose.

    Shapes:
        pred, target: ``[W, s, n, c]``; mask: ``[W, s, n, c]`` bool (cells that count).
    """

    pred: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


#: ``adapt(pretrained_net or None, target task, config, seed, registry, progress)``
Adapt = Callable[[nn.Module | None, CityTask, TransferConfig, int, Any, bool], Forecast]


@dataclass(frozen=True)
class Method:
    """One method of the comparison.

    Args:
        name: the name used by the API, the CLI (``--methods``) and the results.
        summary: one line for ``--help`` and the docs.
        adapt: makes the test forecast on a target task (after fine-tuning, if any).
        pretrain: ``(sources, config, descriptors, registry) -> PretrainSetup(model, net,
            step)`` for methods pre-trained on the source cities; None for the others.
        zero_shot: runs with 0 target training days.
        horizon_one: only forecasts one step ahead.
        network: ``(config, registry) -> net``, the transferable network a checkpoint of
            this method holds (default: backbone + predictor).
        target_info: ``(pre-trained model, target task, descriptor kind) -> dict`` added to
            the rows' ``info`` (e.g. RIAM's density of the target regions); None for none.
        seeded: the result depends on the seed (False for the deterministic classical
            methods: the experiment harness then runs them once and copies the rows).
    """

    name: str
    summary: str
    adapt: Adapt
    pretrain: Callable[..., PretrainSetup] | None = None
    zero_shot: bool = False
    horizon_one: bool = False
    network: Callable[[TransferConfig, Any], nn.Module] = build_network
    target_info: Callable[[Any, CityTask, str], dict[str, Any]] | None = None
    seeded: bool = True

    @property
    def pretrains(self) -> bool:
        return self.pretrain is not None


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method to the registry (its name must be new)."""
    if method.name in METHODS:
        raise ValueError(f"Method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose from {method_names()}")
    return METHODS[name]


def method_names() -> list[str]:
    """Registered method names, in the order of the results table."""
    return list(METHODS)


# ----------------------------------------------------------------------------- deep
def _deep_forecast(adapted: Adapted, task: CityTask, config: TransferConfig) -> Forecast:
    """Test forecast, plus the target-validation RMSE (original units) used for selection."""
    pred, y, mask = adapted.predict(task, "val", config.device)
    info = {**adapted.info, "val_rmse": original_rmse(task, pred, y, mask)}
    pred, y, mask = adapted.predict(task, "test", config.device)
    return Forecast(task.to_original(pred), task.to_original(y), mask, info)


def _adapt_pretrained(net: nn.Module | None, task: CityTask, config: TransferConfig, seed: int,
                      registry: Any, progress: bool) -> Forecast:
    """Fine-tune on the target's training days (none: zero-shot), then forecast."""
    if net is None:
        raise ValueError("a pre-trained method needs its pre-trained network")
    pretrained = net
    adapted = adapt_to_target(
        task, config, lambda cfg: finetune(pretrained, task, cfg, seed, progress=progress), net)
    return _deep_forecast(adapted, task, config)


def _adapt_target_only(net: nn.Module | None, task: CityTask, config: TransferConfig, seed: int,
                       registry: Any, progress: bool) -> Forecast:
    adapted = adapt_to_target(task, config, lambda cfg: train_target_only(
        task, cfg, seed, registry=registry, progress=progress))
    adapted.info["best_epoch"] = adapted.info["finetune_best_epoch"]
    return _deep_forecast(adapted, task, config)


def riam_target_density(model: Any, task: CityTask, kind: str) -> dict[str, Any]:
    """RIAM's log-density (Eq. 6) of each valid target region, from the target's descriptors.

    The descriptors are of the sources' kind: POI, or temporal profiles of the target's
    scaler-fit slice (its training days; validation days in zero-shot). Regions outside the
    valid mask get ``None``; a target without the sources' POI gets no entry.
    """
    riam = getattr(model, "riam", None)
    city = task.city
    if riam is None or (kind == "poi" and city.poi is None):
        return {}
    (desc,), _ = region_descriptors([city], [task.fit_slice], kind=kind)
    valid = task.region_mask
    if valid.sum() < 2 or desc.values.shape[1] != riam.num_descriptors:
        return {}
    with torch.no_grad():
        device = next(riam.parameters()).device
        phi = riam(normalize_descriptors(torch.as_tensor(desc.values[valid])).to(device))
        log_density = SF.kde_log_density(phi, model.options.bandwidth).cpu().numpy()
    out: list[float | None] = [None] * city.num_regions
    for i, v in zip(np.flatnonzero(valid), log_density, strict=True):
        out[int(i)] = float(v)
    return {"region_log_density": out}


# ----------------------------------------------------------------------------- classical
def _eval_slice(task: CityTask) -> slice:
    test = task.split.test
    if test is None:
        raise ValueError(f"city {task.name!r} has no test slice")
    return slice(max(test.start, task.window), test.stop)


def _classical_forecast(task: CityTask, sl: slice, pred: np.ndarray,
                        info: dict[str, Any] | None = None) -> Forecast:
    """``[T', n, c]`` one-step forecasts of ``sl`` -> a :class:`Forecast` ``[T', 1, n, c]``."""
    city = task.city
    mask = np.broadcast_to(task.cell_mask(sl), pred.shape)
    return Forecast(torch.as_tensor(pred[:, None]), torch.as_tensor(city.flow[sl][:, None]),
                    torch.as_tensor(mask[:, None].copy()), info or {})


def _persistence(net, task, config, seed, registry, progress) -> Forecast:
    sl = _eval_slice(task)
    return _classical_forecast(task, sl, classical.persistence(task.city, sl))


def seasonal_lags(task: CityTask) -> list[int]:
    """Candidate lags of ``seasonal``: one day and one week, in steps."""
    day = steps_per_day(task.city.interval_minutes)
    return [day, 7 * day]


def _seasonal(net, task, config, seed, registry, progress) -> Forecast:
    """The same time one day or one week earlier; the lag is chosen on target validation."""
    city, val = task.city, task.split.val
    scores: dict[int, float] = {}
    for lag in seasonal_lags(task):
        start = max(val.start, lag)
        if start >= val.stop:
            continue
        mask = task.cell_mask(slice(start, val.stop))
        if not mask.any():  # nothing observed to score this lag on
            continue
        pred = classical.seasonal_naive(city, slice(start, val.stop), lag)
        scores[lag] = metrics.rmse(pred, city.flow[start:val.stop], mask)
    if not scores:
        raise ValueError(f"seasonal: no lag can be chosen for {city.name!r}: its history is "
                         "shorter than one day before its validation days, or no validation "
                         "step after one lag is observed; give more history (--target-span)")
    lag = min(scores, key=scores.__getitem__)
    sl = _eval_slice(task)
    return _classical_forecast(task, sl, classical.seasonal_naive(city, sl, lag),
                               {"lag": lag, "val_rmse_by_lag": scores})


def _ha(net, task, config, seed, registry, progress) -> Forecast:
    sl = _eval_slice(task)
    return _classical_forecast(task, sl, classical.historical_average(task.city, task.split.train,
                                                                       sl))


def _arima(net, task, config, seed, registry, progress) -> Forecast:
    sl = _eval_slice(task)
    return _classical_forecast(task, sl, classical.arima_forecast(task.city, task.split.train, sl),
                               {"order": [6, 1, 1]})


# ----------------------------------------------------------------------------- the entries
for _method in (
    Method("stbat", "STBaT (RIAM + STBLM) pre-training, then fine-tuning", _adapt_pretrained,
           pretrain=stbat_setup, zero_shot=True, target_info=riam_target_density),
    Method("finetune", "plain pre-training on the sources, then fine-tuning", _adapt_pretrained,
           pretrain=plain_setup, zero_shot=True),
    Method("maml", "first-order MAML pre-training, then fine-tuning", _adapt_pretrained,
           pretrain=maml_setup, zero_shot=True),
    Method("linear", "NLinear (last value + linear map of the window), pre-trained and "
           "fine-tuned", _adapt_pretrained, pretrain=linear_setup, zero_shot=True,
           network=build_linear),
    Method("target-only", "the deep network trained on the target's training days only",
           _adapt_target_only),
    Method("arima", "ARIMA(6,1,1) per region and channel, fitted on the training days", _arima,
           horizon_one=True, seeded=False),
    Method("ha", "historical average of the same weekday and time of the training days", _ha,
           horizon_one=True, seeded=False),
    Method("persistence", "repeat the last observed value", _persistence, zero_shot=True,
           horizon_one=True, seeded=False),
    Method("seasonal", "the same time one day or one week earlier (lag chosen on validation)",
           _seasonal, zero_shot=True, horizon_one=True, seeded=False),
):
    register_method(_method)
