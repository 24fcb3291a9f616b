"""Mixed precision for training: the forward passes of the training steps under ``torch.autocast``.

``precision="bf16"`` runs the backbone and predictor forward of every training step in
bfloat16 autocast (CUDA, and CPUs with bfloat16 support); the outputs are cast back to the
input's dtype, so every loss, the RIAM state and the optimisers stay in float32. Validation
and test predictions always run in float32, so selection and metrics do not depend on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["PRECISIONS", "autocast"]

#: the training precisions: full float32, or bfloat16 autocast of the forward passes
PRECISIONS = ("fp32", "bf16")


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str = "fp32") -> Iterator[None]:
    """``torch.autocast`` in bfloat16 on ``device`` for ``precision="bf16"``; nothing for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)} (got {precision!r})")
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        yield
