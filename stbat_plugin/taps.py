"""``TapFeatures``: per-region features taken from a submodule of a model nobody edits.

The whole model runs as ``model(x, **graph)`` (``graph`` filtered to what its ``forward``
accepts); a hook records every call of the tapped submodule, so that a module run once per
time step is noticed instead of silently read at its first step. Then, in this order:

1. ``select``: which element of a tuple / dict output (or which argument, with ``input``);
2. ``calls``: a module called several times needs ``"last"`` or ``"stack"``;
3. ``rearrange``: an einops pattern to ``b n d`` (or ``b t n d`` with ``reduce_time``);
4. ``reduce_time``: ``"last"`` or ``"mean"`` over ``t`` of ``[b, t, n, d]``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from typing import Any

import einops
import torch
from einops import EinopsError
from torch import Tensor, nn

from stbat_plugin._features import BackboneContractError, accepted_kwargs, feature_shape_hint

__all__ = ["TapFeatures", "TAP_CALLS", "TAP_REDUCE_TIME"]

#: what to do with a tapped module called more than once per forward (``None``: an error)
TAP_CALLS = ("last", "stack")
#: reductions of the time axis of ``[b, t, n, d]``
TAP_REDUCE_TIME = ("last", "mean")


class TapFeatures(nn.Module):
    """Use the output (or input) of a named submodule of ``model`` as per-region features.

    Args:
        model: any ``nn.Module``; never modified (hooks are removed after each forward).
        submodule: dotted name as in ``model.named_modules()``, e.g. ``"encoder.gru"``;
            ``""`` is the model itself (its output is the feature).
        feature_dim: size ``d`` of the features.
        input: take the submodule's input instead of its output, e.g. the input of the
            model's own readout layer (default: ``False``).
        select: element of a tuple (``int``) or dict / attribute (``str``) output; with
            ``input``, the positional (``int``) or named (``str``) argument (default:
            ``None``: a single tensor, anything else is an error listing the choices).
        calls: a submodule called more than once per forward (a cell in a loop over
            time): ``"last"`` keeps the last call, ``"stack"`` stacks the calls on axis 1
            (as ``t``) (default: ``None``: more than one call is an error).
        rearrange: einops pattern to ``b n d``, or to ``b t n d`` with ``reduce_time``;
            ``b``, ``n``, ``t`` inside parentheses on the left are filled in, e.g.
            ``"(b n) t d -> b t n d"`` (default: ``None``).
        reduce_time: ``"last"`` or ``"mean"`` over ``t`` of ``[b, t, n, d]`` (default: ``None``).
        input_rearrange: einops pattern from ``b t n c`` to what ``model.forward`` takes,
            e.g. ``"b t n c -> (b n) t c"`` (default: ``None``: ``[b, t, n, c]`` as is).
        graph_kwargs: names of the graph keyword arguments ``model.forward`` gets, e.g.
            ``()`` for a ``forward(x, **kwargs)`` that hands them to code that does not take
            them (default: ``None``: those its signature names, all of them for ``**kwargs``).
        layout: ``"graph"`` or ``"grid"`` (default: ``"graph"``).

    Shapes:
        x: ``[b, t, n, c]`` (grid: ``[b, t, c, h, w]``) -> ``[b, n, d]``.
    """

    def __init__(self, model: nn.Module, submodule: str, *, feature_dim: int,
                 input: bool = False, select: int | str | None = None, calls: str | None = None,
                 rearrange: str | None = None, reduce_time: str | None = None,
                 input_rearrange: str | None = None, graph_kwargs: Sequence[str] | None = None,
                 layout: str = "graph"):
        super().__init__()
        names = dict(model.named_modules())
        if submodule not in names:
            listing = ", ".join(n for n in names if n) or "(none)"
            raise BackboneContractError(
                f"tap={submodule!r}: no such submodule in {type(model).__name__}; its submodules "
                f"are: {listing} (or '' for the model's own output)")
        _check_options(feature_dim, calls, reduce_time, rearrange, select)
        self.model, self.submodule, self.feature_dim = model, submodule, int(feature_dim)
        self.input, self.select, self.calls = bool(input), select, calls
        self.rearrange, self.reduce_time = rearrange, reduce_time
        self.input_rearrange, self.layout = input_rearrange, layout
        self.graph_kwargs = None if graph_kwargs is None else tuple(graph_kwargs)

    def forward_features(self, x: Tensor, **graph: Any) -> Tensor:
        # x: [b, t, n, c] (grid: [b, t, c, h, w])
        b, t = x.shape[0], x.shape[1]
        n = x.shape[2] if x.dim() == 4 else x.shape[-2] * x.shape[-1]
        z = self._combine(self._run(x, graph))
        return self._to_features(z, b, n, t)

    def forward(self, x: Tensor, **graph: Any) -> Tensor:
        return self.forward_features(x, **graph)

    def extra_repr(self) -> str:
        options = {"input": self.input, "select": self.select, "calls": self.calls,
                   "rearrange": self.rearrange, "reduce_time": self.reduce_time,
                   "input_rearrange": self.input_rearrange, "graph_kwargs": self.graph_kwargs}
        shown = ", ".join(f"{k}={v!r}" for k, v in options.items() if v not in (None, False))
        return f"tap={self.submodule!r}, feature_dim={self.feature_dim}" + (f", {shown}" if shown
                                                                           else "")

    # ------------------------------------------------------------------ steps
    def _run(self, x: Tensor, graph: dict[str, Any]) -> list[Any]:
        """Every call of the tapped module in one forward: outputs, or ``(args, kwargs)``."""
        captured: list[Any] = []
        module = self.model.get_submodule(self.submodule)
        if self.input:
            handle = module.register_forward_pre_hook(
                lambda _m, args, kwargs: captured.append((args, kwargs)), with_kwargs=True)
        else:
            handle = module.register_forward_hook(lambda _m, _a, out: captured.append(out))
        try:
            if self.input_rearrange:
                x = self._einops(x, self.input_rearrange, "input_rearrange", b=x.shape[0])
            self._call_model(x, graph)
        finally:
            handle.remove()
        if not captured:
            raise BackboneContractError(
                f"{self._name()} was never called during {type(self.model).__name__}.forward "
                "(a module called through .forward() directly skips hooks: tap its parent)")
        return captured

    def _call_model(self, x: Tensor, graph: dict[str, Any]) -> None:
        if self.graph_kwargs is None:
            kwargs = accepted_kwargs(self.model.forward, graph)
        else:
            kwargs = {k: graph[k] for k in self.graph_kwargs if k in graph}
        try:
            self.model(x, **kwargs)
        except TypeError as err:
            passed = [k for k in kwargs if f"argument '{k}'" in str(err)]
            if not passed:
                raise
            raise BackboneContractError(
                f"{type(self.model).__name__}.forward took {passed} (through **kwargs?) and "
                f"failed: {err}; pass graph_kwargs=() (or the names it does take)") from err

    def _combine(self, captured: list[Any]) -> Tensor:
        k = len(captured)
        if k > 1 and self.calls is None:
            raise BackboneContractError(
                f"{self._name()} was called {k} times in one forward of "
                f"{type(self.model).__name__} (once per time step?): one call alone would ignore "
                f"the others. Tap a module that runs once per forward (e.g. the input of the "
                f"readout, tap_input=True), or combine the calls: tap_calls='last' (the last "
                f"call) or tap_calls='stack' (calls on axis 1, then tap_reduce_time='last'|'mean')")
        if self.calls == "stack":
            parts = [self._pick(c) for c in captured]
            shapes = {tuple(p.shape) for p in parts}
            if len(shapes) > 1:
                raise BackboneContractError(f"{self._name()}: tap_calls='stack' needs calls of one "
                                            f"shape (got {sorted(map(list, shapes))})")
            return torch.stack(parts, dim=1)
        return self._pick(captured[-1])

    def _pick(self, item: Any) -> Tensor:
        """The tensor chosen by ``select`` from one call's output or ``(args, kwargs)``."""
        choices = _input_choices(self._module(), *item) if self.input else _output_choices(item)
        if self.select is None:
            default = choices.get(None)  # an output that is a single tensor
            if self.input:  # the only tensor argument
                tensors = {id(v): v for v in choices.values() if isinstance(v, Tensor)}
                default = next(iter(tensors.values())) if len(tensors) == 1 else None
            if isinstance(default, Tensor):
                return default
            raise BackboneContractError(
                f"{self._name()} gives {_listing(choices)}; choose one with tap_select=<key>")
        if not isinstance(choices.get(self.select), Tensor):
            raise BackboneContractError(f"{self._name()}: tap_select={self.select!r} is not a "
                                        f"tensor there; it gives {_listing(choices)}")
        return choices[self.select]

    def _to_features(self, z: Tensor, b: int, n: int, t: int) -> Tensor:
        raw = list(z.shape)
        if self.rearrange:
            z = self._einops(z, self.rearrange, "tap_rearrange", b=b, n=n, t=t)
        if self.reduce_time:
            if z.dim() != 4 or z.shape[0] != b or z.shape[2] != n:
                raise self._shape_error(raw, f"[b, t, n, d] = [{b}, t, {n}, d] for "
                                        f"tap_reduce_time={self.reduce_time!r}", b, n, t)
            z = z[:, -1] if self.reduce_time == "last" else z.mean(dim=1)
        if tuple(z.shape) != (b, n, self.feature_dim):
            raise self._shape_error(raw, f"[b, n, d] = [{b}, {n}, {self.feature_dim}]", b, n, t,
                                    got=list(z.shape))
        return z

    # ------------------------------------------------------------------ messages
    def _module(self) -> nn.Module:
        return self.model.get_submodule(self.submodule)

    def _name(self) -> str:
        where = "input" if self.input else "output"
        pick = "" if self.select is None else f" [{self.select!r}]"
        return f"tap={self.submodule!r} ({type(self._module()).__name__} {where}{pick})"

    def _shape_error(self, raw: list[int], expected: str, b: int, n: int, t: int,
                     got: list[int] | None = None) -> BackboneContractError:
        steps = f" (after tap_rearrange: {got})" if got is not None and got != raw else ""
        hint = feature_shape_hint(raw, b=b, n=n, t=t, d=self.feature_dim, tap=True)
        return BackboneContractError(f"Expected {expected} from {self._name()} (got {raw}"
                                     f"{steps}); {hint}")

    def _einops(self, z: Tensor, pattern: str, what: str, **sizes: int) -> Tensor:
        grouped = set(re.findall(r"\w+", " ".join(re.findall(r"\(([^)]*)\)",
                                                             pattern.split("->")[0]))))
        try:
            return einops.rearrange(z, pattern, **{k: v for k, v in sizes.items() if k in grouped})
        except EinopsError as err:
            raise BackboneContractError(f"{self._name()}: {what}={pattern!r} does not fit a tensor "
                                        f"of shape {list(z.shape)}: {err}") from err


def _check_options(feature_dim: Any, calls: Any, reduce_time: Any, rearrange: Any,
                   select: Any) -> None:
    if not isinstance(feature_dim, int) or isinstance(feature_dim, bool) or feature_dim < 1:
        raise BackboneContractError(f"Expected 'feature_dim' to be an int >= 1 (got {feature_dim!r})")
    if calls is not None and calls not in TAP_CALLS:
        raise BackboneContractError(f"Expected 'tap_calls' in {list(TAP_CALLS)} or None "
                                    f"(got {calls!r})")
    if reduce_time is not None and reduce_time not in TAP_REDUCE_TIME:
        raise BackboneContractError(f"Expected 'tap_reduce_time' in {list(TAP_REDUCE_TIME)} or None "
                                    f"(got {reduce_time!r})")
    if select is not None and not isinstance(select, int | str):
        raise BackboneContractError(f"Expected 'tap_select' to be an int or a str (got {select!r})")
    if rearrange:
        target = "b t n d" if reduce_time else "b n d"
        right = re.sub(r"\([^)]*\)", "n", rearrange.split("->")[-1]).split()
        if "->" not in rearrange or len(right) != len(target.split()):
            raise BackboneContractError(f"Expected 'tap_rearrange' to end in '-> {target}'"
                                        f"{' (with tap_reduce_time)' if reduce_time else ''} "
                                        f"(got {rearrange!r})")


def _output_choices(out: Any) -> dict[Any, Any]:
    if isinstance(out, Tensor):
        return {None: out}
    if isinstance(out, tuple | list):
        return dict(enumerate(out))
    if isinstance(out, Mapping):
        return dict(out)
    return {k: v for k, v in vars(out).items() if not k.startswith("_")} if hasattr(
        out, "__dict__") else {None: out}


def _input_choices(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[Any, Any]:
    """Positional arguments by index, and every argument by name (as bound to ``forward``)."""
    try:
        named = dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        named = dict(kwargs)
    return {**dict(enumerate(args)), **named}


def _listing(choices: dict[Any, Any]) -> str:
    def show(v: Any) -> str:
        return f"Tensor {list(v.shape)}" if isinstance(v, Tensor) else type(v).__name__

    if list(choices) == [None]:
        return f"a single {show(choices[None])}" + (" (drop tap_select)" if isinstance(
            choices[None], Tensor) else ", not a tensor")
    return "{" + ", ".join(f"{k!r}: {show(v)}" for k, v in choices.items()) + "}"
