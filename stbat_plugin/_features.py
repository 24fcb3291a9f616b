"""The feature contract shared by taps, adapters and the prediction network.

- :class:`BackboneContractError`: a model does not give per-region features as configured.
- :func:`accepted_kwargs`: the graph keyword arguments a ``forward`` accepts (by signature).
- :func:`guess_layout` and :func:`feature_shape_hint`: what a wrong feature shape looks like
  (``[b, t, n, d]``, a flattened ``[(b n), ...]``, channels first, a wrong ``feature_dim``)
  and the fix, so that every shape error says what was got and what to change.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["BackboneContractError", "accepted_kwargs", "guess_layout", "feature_shape_hint"]


class BackboneContractError(TypeError):
    """The model does not provide per-region features in a way the wrapper can use."""


@functools.lru_cache(maxsize=512)
def _accepted_names(fn: Callable[..., Any]) -> frozenset[str] | None:
    """Keyword names ``fn`` accepts, or ``None`` when it takes ``**kwargs`` (everything)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in params if p.kind in keyword)


def accepted_kwargs(fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The items of ``kwargs`` that ``fn``'s signature accepts (all of them for ``**kwargs``).

    A model whose ``forward`` is ``forward(x)`` gets no graph arguments; one with
    ``forward(x, edge_index)`` gets ``edge_index`` only.
    """
    names = _accepted_names(getattr(fn, "__func__", fn))
    return dict(kwargs) if names is None else {k: v for k, v in kwargs.items() if k in names}


def guess_layout(shape: Sequence[int], *, b: int, n: int, t: int) -> str | None:
    """An einops left-hand side naming the axes of ``shape``, e.g. ``"(b n) t d"``, or None.

    Axes are recognised from the sizes: ``b * n`` (regions flattened into the batch; with
    ``b = 1``, a first axis of size ``n``), ``b`` (first axis), ``n``, ``t`` and 1; exactly
    one axis must be left for ``d``. A guess, used for hints only: sizes that coincide give
    no (or another) answer.
    """
    dims = [int(s) for s in shape]
    labels: list[str | None] = [None] * len(dims)
    if not dims:
        return None

    def take(name: str, size: int, axes: Sequence[int]) -> bool:
        for i in axes:
            if labels[i] is None and dims[i] == size:
                labels[i] = name
                return True
        return False

    axes, last = list(range(len(dims))), len(dims) - 1
    folded = take("(b n)", b * n, axes) if b > 1 else (len(dims) > 1 and take("(b n)", n, [0]))
    if not folded:
        if not (take("b", b, [0]) and take("n", n, axes[1:])):
            return None
    if not take("t", t, axes[:-1]) and sum(label is None for label in labels) > 1:
        take("t", t, [last])
    for i in axes[:-1]:
        if labels[i] is None and dims[i] == 1:
            labels[i] = "1"
    rest = [i for i in axes if labels[i] is None]
    if len(rest) != 1:
        return None
    labels[rest[0]] = "d"
    return " ".join(str(label) for label in labels)


def feature_shape_hint(shape: Sequence[int], *, b: int, n: int, t: int, d: int,
                       tap: bool) -> str:
    """One sentence on what a feature tensor of ``shape`` looks like and how to fix it.

    Args:
        shape: the shape got; ``b``, ``n``, ``t``, ``d``: batch, regions, window, feature_dim.
        tap: phrase the fix with the ``tap_*`` keywords (else for a ``forward_features``).
    """
    layout = guess_layout(shape, b=b, n=n, t=t)
    if layout is None:
        if len(shape) == 3 and shape[0] == b and shape[1] != n:
            return (f"it has {shape[1]} regions instead of n={n}: STBaT needs one feature vector "
                    "per region; if the model pools regions, tap an earlier submodule")
        return (f"no [b, n, d] layout recognised for b={b}, n={n}, t={t}; tap a module whose "
                "output (or input, tap_input=True) holds one vector per region")
    axes = re.findall(r"\([^)]*\)|\S+", layout)
    size = int(shape[axes.index("d")])
    target = "b t n d" if "t" in axes else "b n d"
    fixes = []
    if layout != target:
        fixes.append(f"tap_rearrange='{layout} -> {target}'" if tap
                     else f"einops.rearrange(z, '{layout} -> {target}')")
    if target == "b t n d":
        fixes.append("tap_reduce_time='last' (or 'mean')" if tap
                     else "a reduction of the time axis t")
    if size != d:
        fixes.append(f"feature_dim={size} (not {d})")
    return f"it looks like [{layout}]: use " + " and ".join(fixes) if fixes else ""
