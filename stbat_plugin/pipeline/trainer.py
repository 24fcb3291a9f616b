"""The one training loop of the library: epochs, validation, early stopping, best state.

Every method (STBaT, plain pre-training, MAML, fine-tuning, target-only) is a
``step`` function and a ``validate`` function handed to :class:`Trainer`; there
is no second copy of this loop anywhere.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from tqdm.auto import tqdm

__all__ = ["Trainer", "FitResult"]

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What a fit did: best validation error, its epoch, per-epoch history, and the model."""

    best_val: float
    best_epoch: int
    epochs_run: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    model: Any = None  # the whole trained model (e.g. BalancedTransfer with its RIAM)


class Trainer:
    """Train until validation has not improved for ``patience`` epochs; keep the best.

    Args:
        max_epochs: upper bound on epochs (default: ``50``).
        patience: epochs without improvement before stopping (default: ``5``, as the paper).
        progress: show a tqdm bar per epoch (default: ``True``).
        desc: label of the progress bar and log lines.
        on_improve: called with the model whenever validation improves (e.g. to
            write a checkpoint).
    """

    def __init__(self, *, max_epochs: int = 50, patience: int = 5, progress: bool = True,
                 desc: str = "train", on_improve: Callable[[nn.Module], None] | None = None):
        self.max_epochs = int(max_epochs)
        self.patience = int(patience)
        self.progress = progress
        self.desc = desc
        self.on_improve = on_improve

    def fit(
        self,
        model: nn.Module,
        batches: Callable[[], Iterable[Any]],
        step: Callable[[Any], dict[str, float]],
        validate: Callable[[], float],
        *,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        resume: dict[str, Any] | None = None,
    ) -> FitResult:
        """Run epochs of ``step(batch)`` over ``batches()``; select on ``validate()``.

        ``validate`` returns an error (lower is better) on validation data, never
        test data. The model ends holding the parameters of its best epoch.

        ``on_epoch(state)`` is called after every epoch with the loop's state (``epoch``,
        ``best``, ``best_epoch``, ``best_state``, ``history``): what ``resume`` takes to
        continue a run from there, with the model (and whatever ``step`` and ``batches``
        hold: optimisers, random generators) restored by the caller to that same epoch.
        """
        start = time.perf_counter()
        if resume is None:
            best, best_epoch, best_state = validate(), 0, copy.deepcopy(model.state_dict())
            history: list[dict[str, float]] = [{"epoch": 0, "val": best}]
            done = 0
        else:
            best, best_epoch = float(resume["best"]), int(resume["best_epoch"])
            best_state, history = resume["best_state"], list(resume["history"])
            done = int(resume["epoch"])
        epoch = done
        stopped = done >= self.max_epochs or (done > best_epoch and
                                              done - best_epoch >= self.patience)
        for epoch in range(done + 1, self.max_epochs + 1 if not stopped else done + 1):
            sums = self._epoch(model, batches, step, epoch)
            val = validate()
            history.append({"epoch": epoch, "val": val, **sums})
            log.info("%s epoch %d: %s", self.desc, epoch,
                     ", ".join(f"{k}={v:.4g}" for k, v in history[-1].items() if k != "epoch"))
            if val < best:
                best, best_epoch, best_state = val, epoch, copy.deepcopy(model.state_dict())
                if self.on_improve is not None:
                    self.on_improve(model)
            elif epoch - best_epoch >= self.patience:
                stopped = True
            if on_epoch is not None:
                on_epoch({"epoch": epoch, "best": best, "best_epoch": best_epoch,
                          "best_state": best_state, "history": history})
            if stopped:
                break
        model.load_state_dict(best_state)
        return FitResult(best, best_epoch, epoch, time.perf_counter() - start, history, model)

    def _epoch(self, model: nn.Module, batches: Callable[[], Iterable[Any]],
               step: Callable[[Any], dict[str, float]], epoch: int) -> dict[str, float]:
        model.train()
        sums: dict[str, float] = {}
        count = 0
        bar = tqdm(batches(), desc=f"{self.desc} {epoch}", disable=not self.progress,
                   leave=False)
        skipped = 0
        for batch in bar:
            losses = step(batch)
            if losses.get("skipped"):  # a non-finite loss the step refused to apply
                skipped += 1
                continue
            if not math.isfinite(losses.get("total", 0.0)):
                raise FloatingPointError(
                    f"{self.desc}: the loss became {losses} at epoch {epoch}; the model diverged "
                    "or the data holds extreme values: lower the learning rate or check the data"
                )
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
        model.eval()
        means = {k: v / max(count, 1) for k, v in sums.items()}
        if skipped:
            log.warning("%s epoch %d: %d step(s) skipped for a non-finite loss", self.desc, epoch,
                        skipped)
            means["skipped"] = float(skipped)
        if count == 0 and skipped:
            raise FloatingPointError(f"{self.desc}: every step of epoch {epoch} had a non-finite "
                                     "loss and was skipped; check the data and the learning rate")
        return means
