"""Training of the deep methods, each a ``step`` + ``validate`` for the one Trainer.

- ``stbat``: :class:`BalancedTransfer` pre-trained on the sources (Sec. 4.3), then
  its transferable network is fine-tuned (few-shot) or applied (zero-shot).
- ``finetune``: the same backbone + predictor pre-trained on the sources with the
  plain loss, then fine-tuned: the strongest simple baseline of the field.
- ``maml``: first-order MAML (Finn et al., 2017) over source-city batches, then fine-tuned.
- ``linear``: NLinear (last value + a linear map of the window), trained like ``finetune``.
- ``target-only``: the same network trained on the target's training days only.

Every deep method adapts to the target through :func:`adapt_to_target`: fine-tuning (the
learning rate chosen on target validation), then the optional per-region calibration.

Which method uses which set-up is declared once, in :mod:`stbat_plugin.pipeline.method_registry`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from stbat_plugin import functional as SF
from stbat_plugin._registry import create_backbone
from stbat_plugin.adapters import resolve_backbone
from stbat_plugin.calibration import apply_affine_calibration, fit_affine_calibration
from stbat_plugin.network import NLinear, PredictionNetwork
from stbat_plugin.pipeline import distributed, metrics
from stbat_plugin.pipeline.config import TransferConfig
from stbat_plugin.pipeline.tasks import CityTask, fold_channels, round_robin, unfold_channels
from stbat_plugin.pipeline.trainer import FitResult, Trainer
from stbat_plugin.precision import autocast
from stbat_plugin.wrapper import BalancedTransfer, finite_losses

__all__ = [
    "seed_everything", "build_backbone", "build_network", "predict", "validation_error",
    "pretrain", "finetune", "train_target_only", "build_linear", "stbat_setup", "plain_setup", "linear_setup",
    "maml_setup", "PretrainSetup", "Adapted", "adapt_to_target", "original_rmse",
]


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def build_backbone(config: TransferConfig, registry: Any = None) -> torch.nn.Module:
    return create_backbone(config.backbone, registry=registry, in_channels=config.input_channels,
                           **config.backbone_kwargs)


def build_network(config: TransferConfig, registry: Any = None) -> PredictionNetwork:
    """Backbone + predictor, univariate (channels are folded into the batch)."""
    return PredictionNetwork(resolve_backbone(build_backbone(config, registry), registry=registry),
                             horizon=config.horizon, out_channels=1, normalize=config.normalize,
                             linear_skip=config.linear_skip, window=config.window,
                             lag_channels=len(config.lag_days))


def build_linear(config: TransferConfig, registry: Any = None) -> NLinear:
    """NLinear over the configured window, horizon and lag inputs (the ``linear`` method)."""
    return NLinear(config.window, horizon=config.horizon, out_channels=1,
                   lag_channels=len(config.lag_days))


@torch.no_grad()
def predict(net: nn.Module, task: CityTask, part: str, device: str,
            batch_size: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """Scaled predictions, targets and masks of every window of a part: ``[W, s, n, c]``."""
    net.eval()
    graph = task.graph_kwargs(net, device)
    preds, ys, masks = [], [], []
    c = task.city.num_channels
    for batch in task.loader(part, batch_size, shuffle=False, drop_last=False):
        x, _, _ = fold_channels(batch, device)
        preds.append(unfold_channels(net(x, **graph), c).cpu())
        ys.append(batch["y"])
        masks.append(batch["mask"])
    if not preds:
        raise ValueError(f"City {task.name!r} has no {part} windows")
    return torch.cat(preds), torch.cat(ys), torch.cat(masks)


def validation_error(net: nn.Module, tasks: list[CityTask], device: str) -> float:
    """Mean over cities of the masked RMSE on the validation windows (scaled units)."""
    errors = []
    for task in tasks:
        pred, y, mask = predict(net, task, "val", device)
        errors.append(float(SF.weighted_prediction_loss(pred, y, None, mask).sqrt()))
    return float(np.mean(errors))


def _loaders(tasks: list[CityTask], config: TransferConfig, gen: torch.Generator) -> dict:
    return {t.name: t.loader("train", config.batch_size, shuffle=True, generator=gen)
            for t in tasks}


def pretrain(method: str, sources: list[CityTask], config: TransferConfig, seed: int,
             descriptors: dict[str, np.ndarray] | None = None, registry: Any = None,
             progress: bool = True, on_improve: Callable[[nn.Module], None] | None = None,
             on_epoch: Callable[[nn.Module, dict[str, Any]], None] | None = None,
             resume: dict[str, Any] | None = None) -> tuple[nn.Module, FitResult]:
    """Pre-train a method of the registry (``stbat``, ``finetune``, ``maml``, ``linear``, ...).

    ``on_improve(net)`` is called whenever source validation improves (e.g. to
    write the best-so-far checkpoint). ``on_epoch(net, state)`` is called after every epoch
    with everything needed to continue the run exactly (:func:`training_state`: the whole
    model, its optimisers, the trainer's bookkeeping and every random generator), and
    ``resume`` (such a state) continues it: the result is that of an uninterrupted run.

    Inside :func:`stbat_plugin.pipeline.distributed.session` (``torchrun``), every process takes its
    share of the source batches and the gradients are averaged over the processes
    (:mod:`stbat_plugin.pipeline.distributed`); the callbacks run on every rank.
    """
    from stbat_plugin.pipeline.method_registry import get_method

    spec = get_method(method)
    if spec.pretrain is None:
        raise ValueError(f"Method {method!r} is not pre-trained on source cities")
    ctx = distributed.active()
    if ctx is not None:
        ctx.check_device(config.device)
    seed_everything(seed)
    device = config.device
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, net, step = spec.pretrain(sources, config, descriptors, registry)  # on the device
    optimizers = getattr(step, "optimizers", ())
    if ctx is not None and not getattr(step, "distributed", False):
        raise distributed.DistributedError(
            f"method {method!r} does not support multi-process pre-training (its step does "
            "not average gradients over processes); run it as one process")
    loop = None
    if resume is not None:
        loop = _restore(resume, model, optimizers, gen, rng)
    if ctx is not None:
        ctx.broadcast_module(model)  # the same start everywhere (the seeds agree already)
        progress = progress and ctx.is_main

    def batches() -> Any:
        stream = round_robin(_loaders(sources, config, gen), rng, config.max_batches_per_epoch)
        return stream if ctx is None else ctx.shard(stream)

    def validate() -> float:
        if ctx is None:
            return validation_error(net, sources, device)
        return ctx.validation_error(net, sources, device)

    trainer = Trainer(max_epochs=config.max_epochs, patience=config.patience,
                      progress=progress, desc=f"pretrain {method}",
                      on_improve=None if on_improve is None else (lambda _m: on_improve(net)))

    def epoch_done(state: dict[str, Any]) -> None:
        if ctx is not None:
            ctx.check_in_sync(model)
        if on_epoch is not None:
            run_state = training_state(state, model, optimizers, gen, rng)
            if ctx is not None:
                run_state["rng"]["ranks"] = ctx.gather_rng()
            on_epoch(net, run_state)

    try:
        result = trainer.fit(model, batches, step, validate, on_epoch=epoch_done, resume=loop)
    finally:
        if isinstance(model, BalancedTransfer):
            model.grad_sync = None
    return net, result


def training_state(loop: dict[str, Any], model: nn.Module,
                   optimizers: tuple[torch.optim.Optimizer, ...], gen: torch.Generator,
                   rng: np.random.Generator) -> dict[str, Any]:
    """A run's state after an epoch, made of tensors, numbers, strings, lists and dicts only
    (loadable with ``torch.load(weights_only=True)``)."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    imbalance = model.imbalance_state() if isinstance(model, BalancedTransfer) else {}
    return {
        "loop": {**loop, "history": [dict(h) for h in loop["history"]]},
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        # the RIAM state of the cities that have it computed (not in state_dict; the other
        # cities are refreshed when first trained)
        "imbalance": {city: {k: v.cpu() for k, v in bufs.items()}
                      for city, bufs in imbalance.items()},
        "optimizers": [opt.state_dict() for opt in optimizers],
        "rng": {"torch": torch.get_rng_state(), "loader": gen.get_state(),
                "round_robin": rng.bit_generator.state,
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                          *np_state[2:]],
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }


def _restore(state: dict[str, Any], model: nn.Module,
             optimizers: tuple[torch.optim.Optimizer, ...], gen: torch.Generator,
             rng: np.random.Generator) -> dict[str, Any]:
    """Put ``model``, ``optimizers`` and the generators back to a :func:`training_state`."""
    model.load_state_dict(state["model"])
    if isinstance(model, BalancedTransfer):
        model.load_imbalance_state(state.get("imbalance", {}))
        for name in state.get("fresh", []):  # a state written before "imbalance": the RIAM
            model._city(name).fresh = True  # state came with "model" (loaded above)
    saved = state["optimizers"]
    if len(saved) != len(optimizers):
        raise ValueError(f"the saved run has {len(saved)} optimiser(s), this method "
                         f"{len(optimizers)}; resume with the same method and settings")
    for opt, opt_state in zip(optimizers, saved, strict=True):
        opt.load_state_dict(opt_state)
    r = state["rng"]
    ctx = distributed.active()
    if ctx is not None and "ranks" in r:  # each process continues its own generators
        if len(r["ranks"]) != ctx.world_size:
            raise ValueError(f"the saved run had {len(r['ranks'])} processes, this one "
                             f"{ctx.world_size}; resume with as many processes")
        r = {**r, **r["ranks"][ctx.rank]}
    torch.set_rng_state(r["torch"])
    gen.set_state(r["loader"])
    rng.bit_generator.state = r["round_robin"]
    np_state = r["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    if r["cuda"] and torch.cuda.is_available():
        if ctx is not None and "ranks" in state["rng"]:
            torch.cuda.set_rng_state(r["cuda"][0])  # this process's device
        else:
            torch.cuda.set_rng_state_all(r["cuda"])
    return state["loop"]


def _with_optimizers(step: Callable, *optimizers: torch.optim.Optimizer) -> Callable:
    """``step`` carrying its optimisers (saved and restored by a resumable pre-training),
    marked as averaging its gradients over processes in multi-process pre-training."""
    step.optimizers = optimizers  # type: ignore[attr-defined]
    step.distributed = True  # type: ignore[attr-defined]
    return step


def _grad_sync() -> Callable[[torch.optim.Optimizer, bool], bool] | None:
    """The gradient averaging of multi-process pre-training, or None in one process."""
    ctx = distributed.active()
    return None if ctx is None else ctx.sync_optimizer


class PretrainSetup(NamedTuple):
    """What a method's ``pretrain`` entry builds (:class:`~.method_registry.Method`)."""

    model: nn.Module  # everything trained (e.g. BalancedTransfer with its RIAM)
    net: nn.Module  # the transferable network that is saved and adapted
    step: Callable[..., Any]  # one training step; carries ``optimizers`` (and ``distributed``)


def stbat_setup(sources: list[CityTask], config: TransferConfig,
                descriptors: dict[str, np.ndarray] | None, registry: Any) -> PretrainSetup:
    """STBaT pre-training (Sec. 4.3): the wrapper, its transferable network and step."""
    model = _build_stbat(sources, config, descriptors, registry).to(config.device)
    optimizers = model.configure_optimizers(lr=config.lr)
    return PretrainSetup(model, model.transferable(), _with_optimizers(
        _stbat_step(model, _by_name(sources), config, optimizers), *optimizers))


def _plain_setup(net: nn.Module, sources: list[CityTask], config: TransferConfig
                 ) -> PretrainSetup:
    """``net`` trained alone with the plain prediction loss (Adam)."""
    net = net.to(config.device)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    return PretrainSetup(net, net, _with_optimizers(
        _plain_step(net, _by_name(sources), opt, config.device, config.on_nonfinite,
                    _grad_sync(), config.precision), opt))


def plain_setup(sources: list[CityTask], config: TransferConfig,
                descriptors: dict[str, np.ndarray] | None, registry: Any) -> PretrainSetup:
    """Backbone + predictor with the plain prediction loss."""
    return _plain_setup(build_network(config, registry), sources, config)


def linear_setup(sources: list[CityTask], config: TransferConfig,
                 descriptors: dict[str, np.ndarray] | None, registry: Any) -> PretrainSetup:
    """NLinear with the plain prediction loss."""
    return _plain_setup(build_linear(config, registry), sources, config)


def maml_setup(sources: list[CityTask], config: TransferConfig,
               descriptors: dict[str, np.ndarray] | None, registry: Any) -> PretrainSetup:
    """First-order MAML over source-city batches."""
    net = build_network(config, registry).to(config.device)
    outer = torch.optim.Adam(net.parameters(), lr=config.lr)
    return PretrainSetup(net, net, _with_optimizers(
        _maml_step(net, _by_name(sources), config, outer, _grad_sync()), outer))


def _by_name(tasks: list[CityTask]) -> dict[str, CityTask]:
    return {t.name: t for t in tasks}


def _build_stbat(sources: list[CityTask], config: TransferConfig,
                 descriptors: dict[str, np.ndarray] | None, registry: Any) -> BalancedTransfer:
    needs = config.stbat.use_simdcl or config.stbat.use_weighted_loss
    if needs and descriptors is None:
        raise ValueError("STBaT needs region descriptors of every source city")
    return BalancedTransfer(
        build_backbone(config, registry),
        region_features={k: torch.as_tensor(v) for k, v in (descriptors or {}).items()}
        if needs else None,
        valid_regions={t.name: torch.as_tensor(t.region_mask) for t in sources} if needs else None,
        horizon=config.horizon, out_channels=1, normalize=config.normalize,
        linear_skip=config.linear_skip, window=config.window,
        lag_channels=len(config.lag_days), registry=registry, options=config.stbat,
    )


def _stbat_step(model: BalancedTransfer, tasks: dict[str, CityTask], config: TransferConfig,
                optimizers: tuple[torch.optim.Optimizer, ...]):
    device = config.device
    has_cities = model.riam is not None
    model.grad_sync = _grad_sync()
    model.precision = config.precision

    def step(item: tuple) -> dict[str, float]:
        name, batch, *group = item  # group: the cities of this step on every process
        x, y, m = fold_channels(batch, device)
        graph = tasks[name].graph_kwargs(model.net, device)
        losses = model.train_iteration(x, y, optimizers, city=name if has_cities else None,
                                       mask=m, on_nonfinite=config.on_nonfinite, **graph)
        if group and model.riam is not None and model.riam.trainable and not losses.skipped:
            for other in sorted(set(group[0]) - {name}):  # RIAM moved: same state everywhere
                model.refresh_imbalance(other)
        return losses.as_dict()

    return step


def _forward(net: nn.Module, x: Tensor, graph: dict[str, Any], precision: str) -> Tensor:
    """``net(x)`` in the training precision (bf16: autocast), returned in ``x``'s dtype."""
    with autocast(x.device, precision):
        return net(x, **graph).to(x.dtype)


def _plain_step(net: nn.Module, tasks: dict[str, CityTask],
                optimizer: torch.optim.Optimizer, device: str, on_nonfinite: str = "raise",
                sync: Callable[[torch.optim.Optimizer, bool], bool] | None = None,
                precision: str = "fp32"):
    def step(item: tuple) -> dict[str, float]:
        name, batch = item[:2]
        x, y, m = fold_channels(batch, device)
        loss = SF.weighted_prediction_loss(
            _forward(net, x, tasks[name].graph_kwargs(net, device), precision), y, None, m)
        if not finite_losses({"pred": loss}, f"city {name!r}", on_nonfinite,
                             inputs={"x": x, "y": y}, mask=m):
            if sync is not None:
                sync(optimizer, False)
            return {"skipped": 1.0}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sync is not None and not sync(optimizer, True):  # another process skipped
            return {"skipped": 1.0}
        optimizer.step()
        return {"total": float(loss.detach()), "pred": float(loss.detach())}

    return step


def _maml_step(net: PredictionNetwork, tasks: dict[str, CityTask], config: TransferConfig,
               outer: torch.optim.Optimizer,
               sync: Callable[[torch.optim.Optimizer, bool], bool] | None = None):
    """First-order MAML: the batch's first half adapts a copy, its second half scores it."""
    device = config.device

    def step(item: tuple) -> dict[str, float]:
        name, batch = item[:2]
        x, y, m = fold_channels(batch, device)
        half = x.shape[0] // 2
        graph = tasks[name].graph_kwargs(net, device)
        fast = copy.deepcopy(net)
        inner = torch.optim.SGD(fast.parameters(), lr=config.maml_inner_lr)
        for _ in range(config.maml_inner_steps):
            loss = SF.weighted_prediction_loss(_forward(fast, x[:half], graph, config.precision),
                                               y[:half], None, m[:half])
            inner.zero_grad(set_to_none=True)
            loss.backward()
            inner.step()
        query = SF.weighted_prediction_loss(_forward(fast, x[half:], graph, config.precision),
                                            y[half:], None, m[half:])
        if not finite_losses({"pred": query}, f"city {name!r} (MAML query)",
                             config.on_nonfinite, inputs={"x": x, "y": y}, mask=m):
            if sync is not None:
                sync(outer, False)
            return {"skipped": 1.0}
        grads = torch.autograd.grad(query, list(fast.parameters()), allow_unused=True)
        outer.zero_grad(set_to_none=True)
        for p, g in zip(net.parameters(), grads, strict=True):
            p.grad = None if g is None else g.detach().clone()
        if sync is not None and not sync(outer, True):  # another process skipped
            return {"skipped": 1.0}
        outer.step()
        return {"total": float(query.detach()), "pred": float(query.detach())}

    return step


def finetune(net: nn.Module, target: CityTask, config: TransferConfig, seed: int,
             progress: bool = True) -> tuple[nn.Module, FitResult]:
    """Fine-tune a copy of ``net`` on the target's training days; select on target validation."""
    seed_everything(seed)
    net = copy.deepcopy(net).to(config.device)
    gen = torch.Generator().manual_seed(seed)
    tasks = {target.name: target}
    step = _plain_step(net, tasks, torch.optim.Adam(net.parameters(), lr=config.finetune_lr),
                       config.device, config.on_nonfinite, precision=config.precision)
    trainer = Trainer(max_epochs=config.finetune_epochs, patience=config.patience,
                      progress=progress, desc=f"adapt {target.name}")
    result = trainer.fit(
        net,
        lambda: ((target.name, b) for b in target.loader("train", config.batch_size,
                                                           shuffle=True, generator=gen)),
        step,
        lambda: validation_error(net, [target], config.device),
    )
    return net, result


def train_target_only(target: CityTask, config: TransferConfig, seed: int, registry: Any = None,
                      progress: bool = True) -> tuple[nn.Module, FitResult]:
    """The same network, freshly initialised, trained on the target's training days only."""
    seed_everything(seed)
    return finetune(build_network(config, registry), target, config, seed, progress)


# ----------------------------------------------------------------------------- adaptation
def original_rmse(task: CityTask, pred: Tensor, y: Tensor, mask: Tensor) -> float:
    """Masked RMSE in ORIGINAL units of scaled predictions (any scaler, affine or not):
    :func:`stbat_plugin.pipeline.metrics.rmse` of the inverse-transformed values.

    Shapes:
        pred, y, mask: ``[W, s, n, c]``.
    """
    return metrics.rmse(task.to_original(pred), task.to_original(y), mask)


@dataclass
class Adapted:
    """A network adapted to the target city, its calibration (``a, b`` ``[n, c]``, scaled
    units; target-only parameters, never transferred) and what the adaptation chose."""

    net: nn.Module
    calibration: tuple[Tensor, Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def predict(self, task: CityTask, part: str, device: str) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`predict`, calibrated. Shapes: ``[W, s, n, c]`` each (scaled units)."""
        pred, y, mask = predict(self.net, task, part, device)
        if self.calibration is not None:
            pred = apply_affine_calibration(pred, *self.calibration)
        return pred, y, mask


def _score(value: float) -> float:
    return value if math.isfinite(value) else math.inf  # a NaN forecast never wins


def adapt_to_target(task: CityTask, config: TransferConfig,
                    fit: Callable[[TransferConfig], tuple[nn.Module, FitResult]],
                    net: nn.Module | None = None) -> Adapted:
    """The one adaptation path of every deep method (pre-trained or target-only).

    With training days: ``fit(config)`` (fine-tuning, or training from scratch) runs once per
    learning rate of ``config.finetune_lr_grid`` (just ``config.finetune_lr`` when empty),
    each from the same start and seed; the network with the lowest target-validation RMSE
    (original units; ties: the first) is kept. Then ``config.calibrate`` fits the per-region
    calibration on the training windows (:func:`fit_affine_calibration`); ``"auto"`` keeps it
    only if target-validation RMSE improves. Zero-shot (no training days): ``net`` as is.
    """
    if not task.has_training_days:
        if net is None:
            raise ValueError(f"target {task.name!r} has no training days: a zero-shot "
                             "adaptation needs a pre-trained network")
        skipped = {} if config.calibrate == "none" else {
            "calibrated": False, "calibration": "none: zero-shot, no target training days"}
        return Adapted(net.to(config.device), None, skipped)
    tried: list[dict[str, float]] = []
    best: tuple[float, float, nn.Module, FitResult] | None = None  # (score, lr, net, fit)
    for lr in config.finetune_lr_grid or [config.finetune_lr]:
        candidate, result = fit(replace(config, finetune_lr=lr))
        pred, y, mask = predict(candidate, task, "val", config.device)
        rmse = original_rmse(task, pred, y, mask)
        tried.append({"lr": lr, "val_rmse": rmse, "best_epoch": result.best_epoch})
        if best is None or _score(rmse) < best[0]:
            best = (_score(rmse), lr, candidate, result)
    assert best is not None  # at least one learning rate
    _, lr, chosen, result = best
    info: dict[str, Any] = {"finetune_lr": lr, "finetune_best_epoch": result.best_epoch,
                            "finetune_epochs": result.epochs_run}
    if config.finetune_lr_grid:
        info["finetune_lr_val_rmse"] = tried
    adapted = Adapted(chosen, None, info)
    if config.calibrate != "none":
        _calibrate(adapted, task, config)
    return adapted


def _calibrate(adapted: Adapted, task: CityTask, config: TransferConfig) -> None:
    """Fit the calibration on the training windows; keep it per ``config.calibrate``."""
    pred, y, mask = predict(adapted.net, task, "train", config.device)
    a, b = fit_affine_calibration(pred, y, mask, config.calibrate_shrinkage)
    pred, y, mask = predict(adapted.net, task, "val", config.device)
    before = original_rmse(task, pred, y, mask)
    after = original_rmse(task, apply_affine_calibration(pred, a, b), y, mask)
    keep = config.calibrate == "affine" or _score(after) < _score(before)
    adapted.calibration = (a, b) if keep else None
    adapted.info.update(calibrated=keep, val_rmse_uncalibrated=before, val_rmse_calibrated=after)
