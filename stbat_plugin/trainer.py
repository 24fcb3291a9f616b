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
    ) -> FitResult:
        """Run epochs of ``step(batch)`` over ``batches()``; select on ``validate()``.

        ``validate`` returns an error (lower is better) on validation data, never
        test data. The model ends holding the parameters of its best epoch.
        """
        start = time.perf_counter()
        best, best_epoch, best_state = validate(), 0, copy.deepcopy(model.state_dict())
        history: list[dict[str, float]] = [{"epoch": 0, "val": best}]
        epoch = 0
        for epoch in range(1, self.max_epochs + 1):
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
        for batch in bar:
            losses = step(batch)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            if not math.isfinite(losses.get("total", 0.0)):
                raise FloatingPointError(
                    f"{self.desc}: loss became {losses} at epoch {epoch}; lower --lr"
                )
        model.eval()
        return {k: v / max(count, 1) for k, v in sums.items()}
