"""Test helpers shipped with the library, for backbone authors and our own tests.

``check_backbone`` is what the conformance test runs on every registered backbone; a plugin
author runs it on theirs, and a user on a model they wrap with ``tap=`` (see
``docs/plugins.md``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from stbat_plugin._shapes import (
    changed_shapes,
    find_region_count,
    per_node_advice,
    region_sized,
    shape_snapshot,
    user_model,
)
from stbat_plugin.adapters import TapFeatures, WithFeatureDim, resolve_backbone
from stbat_plugin.backbone import CityFacts, backbone_layout, city_context
from stbat_plugin.network import PredictionNetwork

__all__ = ["BackboneReport", "check_backbone", "ring_graph", "smoke_train"]

#: default tolerance of the permutation check, by dtype
ATOL = {torch.float64: 1e-5, torch.float32: 1e-4}


def ring_graph(n: int) -> Tensor:
    """Undirected ring with chords ``i <-> i+1`` and ``i <-> i+3`` (``[2, E]``, int64)."""
    src = torch.arange(n)
    rows = []
    for step in (1, 3):
        dst = (src + step) % n
        rows += [torch.stack([src, dst]), torch.stack([dst, src])]
    return torch.cat(rows, dim=1)


@dataclass(frozen=True)
class BackboneReport:
    """What :func:`check_backbone` found besides failures.

    Attributes:
        feature_dim: size ``d`` of the features. layout: ``"graph"`` or ``"grid"``.
        dtype: the model's own dtype, the one the checks ran in.
        region_counts: the two region counts it ran at.
        unreached: parameters that no (non-zero) gradient from the features reaches, e.g.
            the model's own head behind a tap; reported, not failed, unless ``strict``.
        strict: unreached parameters fail (a model written for STBaT, with its own
            ``forward_features``), or are only reported (a tapped or adapted model).
    """

    feature_dim: int
    layout: str
    dtype: torch.dtype
    region_counts: tuple[int, int]
    unreached: tuple[str, ...]
    strict: bool


@contextlib.contextmanager
def _check(name: str) -> Iterator[None]:
    """Any failure inside becomes an ``AssertionError`` naming the check."""
    try:
        yield
    except AssertionError as err:
        raise AssertionError(f"check {name!r} failed: {err}") from err
    except Exception as err:  # noqa: BLE001 - whatever the model raises, name the check
        raise AssertionError(f"check {name!r} failed: {type(err).__name__}: {err}") from err


@dataclass
class _Case:
    """Random inputs of one layout, dtype and window."""

    layout: str
    window: int
    in_channels: int
    dtype: torch.dtype
    gen: torch.Generator

    def make(self, size: int | tuple[int, int], b: int) -> tuple[Tensor, dict[str, Any], int]:
        """``(x [b, t, n, c], graph kwargs, n)`` for ``n`` regions or an ``(h, w)`` grid."""
        graph: dict[str, Any]
        if isinstance(size, tuple):
            n, graph = size[0] * size[1], {"grid_shape": size}
        else:
            n, graph = size, {"edge_index": ring_graph(size)}
        x = torch.rand(b, self.window, n, self.in_channels, generator=self.gen, dtype=self.dtype)
        return x, graph, n


def check_backbone(
    backbone: nn.Module,
    *,
    layout: str | None = None,
    in_channels: int = 1,
    window: int = 6,
    n: int = 12,
    other_n: int | None = None,
    grid_shape: tuple[int, int] = (3, 4),
    batch_sizes: tuple[int, ...] = (1, 5),
    device: str | torch.device | None = None,
    atol: float | None = None,
    strict: bool | None = None,
    registry: Any = None,
    **wrap: Any,
) -> BackboneReport:
    """Assert that ``backbone`` gives STBaT what it needs; return what was only reported.

    Checks, each failure an ``AssertionError`` naming the check (``contract``,
    ``features at batch b``, ``gradients``, ``region count``, ``permutation``,
    ``prepare_city``, ``device``): the model resolves to ``forward_features`` and an int
    ``feature_dim`` (as ``BalancedTransfer`` would wrap it), with a valid ``layout`` if it
    declares one; output ``[b, n, d]`` for a batch of 1 and of many;
    finite values; a gradient from the features reaches the parameters that produce them
    (parameters it never reaches, such as the model's own head behind a tap, are reported
    in :attr:`BackboneReport.unreached`); it runs at a second region count, and no
    parameter's shape follows ``n`` (per-node parameters are named); for graph layouts,
    permuting the nodes (and relabelling ``edge_index``) permutes the features the same
    way; a ``prepare_city`` (if any) returns a dict for a :class:`CityFacts` of random
    training flow, and the features with that context still have the right shape; and,
    when ``device`` is given, it runs there. Everything runs in the model's own
    dtype, on a copy: ``backbone`` is not modified.

    Args:
        backbone: the model (a backbone, or any model with ``tap=`` in ``wrap``).
        layout: ``"graph"`` or ``"grid"`` (default: the extractor's ``layout`` or ``"graph"``).
        in_channels, window, n, grid_shape, batch_sizes: test input sizes.
        other_n: the second region count (default: ``n + 5``; grids: one row more).
        device: also run on this device (default: ``None``, stay where it is).
        atol: tolerance of the permutation check (default: by dtype, ``1e-4`` for float32).
        strict: fail on unreached parameters (default: only for a model with its own
            ``forward_features``).
        registry: whose adapter hooks may claim the model (default: the installed plugins).
        **wrap: ``tap``, ``feature_dim``, ``tap_input``, ``tap_select``, ``tap_calls``,
            ``tap_rearrange``, ``tap_reduce_time``, ``input_rearrange``, as ``BalancedTransfer``.
    """
    model = copy.deepcopy(backbone)
    with _check("contract"):
        extractor = resolve_backbone(model, registry=registry, **wrap)
    strict = _written_for_stbat(model, extractor) if strict is None else strict
    dtype = next((p.dtype for p in (*extractor.parameters(), *extractor.buffers())
                  if p.is_floating_point()), torch.get_default_dtype())
    with _check("contract"):
        layout = str(layout or backbone_layout(extractor))
    net = PredictionNetwork(extractor).to(dtype)
    case = _Case(layout, window, in_channels, dtype, torch.Generator().manual_seed(0))
    sizes: tuple[Any, Any] = ((grid_shape, (grid_shape[0] + 1, grid_shape[1])) if layout == "grid"
                              else (n, other_n or n + 5))
    for b in batch_sizes:
        _check_features(net, case, sizes[0], b)
    unreached = _check_gradients(net, case, sizes[0], max(batch_sizes), strict)
    counts = _check_region_counts(net, case, sizes)
    if layout == "graph":
        with _check("permutation"):
            _check_permutation(net, case, n, atol if atol is not None else ATOL.get(dtype, 1e-2))
    with _check("prepare_city"):
        _check_prepare_city(net, case, sizes[0])
    if device is not None:
        with _check("device"):
            x, graph, _ = case.make(sizes[0], 2)
            moved = net.to(device)
            graph = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in graph.items()}
            z = moved.forward_features(x.to(device), **graph)
            assert z.device.type == torch.device(device).type, "output not on the model's device"
    return BackboneReport(net.feature_dim, layout, dtype, counts, unreached, strict)


def _written_for_stbat(model: nn.Module, extractor: nn.Module) -> bool:
    """A model with its own ``forward_features`` (strict), not a tapped or adapted one."""
    own = extractor is model or (isinstance(extractor, WithFeatureDim) and extractor.model is model)
    return own and not isinstance(model, TapFeatures)


def _check_features(net: PredictionNetwork, case: _Case, size: Any, b: int) -> None:
    x, graph, n = case.make(size, b)
    try:
        z = net.forward_features(x, **graph)
    except Exception as err:  # noqa: BLE001 - per-node parameters, or a failure of its own
        if case.layout == "graph":
            _raise_if_per_node(net, case, n, b, err)
        raise AssertionError(f"check 'features at batch {b}' failed: {type(err).__name__}: "
                             f"{err}") from err
    with _check(f"features at batch {b}"):
        assert z.shape == (b, n, net.feature_dim), f"got shape {list(z.shape)}"
        assert torch.isfinite(z).all(), "non-finite features"


def _raise_if_per_node(net: PredictionNetwork, case: _Case, n: int, b: int,
                       err: Exception) -> None:
    """The model fails at ``n``: when it runs at a size one of its parameters has, name them."""
    def run(size: int) -> object:
        with torch.no_grad():
            x, graph, _ = case.make(size, b)
            return net.forward_features(x, **graph)

    size = find_region_count(run, user_model(net), skip={n})
    names = region_sized(user_model(net), size, n) if size is not None else []
    if size is not None and names:
        raise AssertionError(f"check 'region count' failed: it fails at n={n} "
                             f"({type(err).__name__}: {err}) and runs at n={size}: "
                             f"{per_node_advice(names, size)}") from err


def _check_gradients(net: PredictionNetwork, case: _Case, size: Any, b: int,
                     strict: bool) -> tuple[str, ...]:
    """Backward from a random projection of the features; returns the unreached parameters."""
    model = user_model(net)
    with _check("gradients"):
        model.zero_grad(set_to_none=True)
        x, graph, _ = case.make(size, b)
        z = net.forward_features(x, **graph)
        (z * torch.randn(z.shape, generator=case.gen, dtype=z.dtype)).sum().backward()
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    broken = [name for name, p in params if p.grad is not None and not torch.isfinite(p.grad).all()]
    unreached = tuple(name for name, p in params if p.grad is None or not p.grad.any())
    model.zero_grad(set_to_none=True)
    with _check("gradients"):
        assert not broken, f"non-finite gradient in: {broken}"
        if strict:
            assert not unreached, f"no (finite, non-zero) gradient reaches: {list(unreached)}"
        assert not params or len(unreached) < len(params), (
            "no parameter gets a gradient from the features: check tap= (and tap_input=)")
    return unreached


def _check_region_counts(net: PredictionNetwork, case: _Case, sizes: tuple[Any, Any]
                         ) -> tuple[int, int]:
    """Runs at the second region count, and no parameter changes shape with ``n``."""
    (_, _, n1), (x, graph, n2) = case.make(sizes[0], 1), case.make(sizes[1], 2)
    model = user_model(net)
    before = shape_snapshot(model)
    net.eval()
    try:
        with torch.no_grad():
            z = net.forward_features(x, **graph)
    except Exception as err:  # noqa: BLE001 - name the per-node parameters, if any
        names = region_sized(model, n1, n2)
        advice = f"; {per_node_advice(names, n1)}" if names else ""
        raise AssertionError(f"check 'region count' failed: it runs at n={n1} but not at n={n2}: "
                             f"{type(err).__name__}: {err}{advice}") from err
    finally:
        net.train()
    with _check("region count"):
        assert z.shape == (2, n2, net.feature_dim), f"at n={n2}: got shape {list(z.shape)}"
        changed = changed_shapes(before, shape_snapshot(model))
        assert not changed, f"parameters change shape with the region count: {changed}"
    return n1, n2


def _check_prepare_city(net: PredictionNetwork, case: _Case, size: Any) -> None:
    """The per-city context of two days of random training flow, used in a forward."""
    x, graph, n = case.make(size, 2)
    flow = torch.rand(48, n, case.in_channels, generator=case.gen, dtype=case.dtype)
    info = CityFacts(num_regions=n, steps_per_day=24, train_flow=flow,
                    edge_index=graph.get("edge_index"))
    context = city_context(net.extractor, info)
    assert isinstance(context, dict), f"returned {type(context).__name__}, not a dict"
    with torch.no_grad():
        z = net.forward_features(x, **graph, **context)
    assert z.shape == (2, n, net.feature_dim), f"with its context: got shape {list(z.shape)}"


def _check_permutation(net: PredictionNetwork, case: _Case, n: int, atol: float) -> None:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n)
    x, graph, _ = case.make(n, 3)
    edge_index = graph["edge_index"]
    net.eval()
    try:
        with torch.no_grad():
            z = net.forward_features(x, edge_index=edge_index)
            z_perm = net.forward_features(x[:, :, perm], edge_index=inverse[edge_index])
    finally:
        net.train()
    assert torch.allclose(z[:, perm], z_perm, atol=atol, rtol=atol), \
        f"not node-permutation equivariant (max difference {(z[:, perm] - z_perm).abs().max():.2e})"


def smoke_train(model: Any, flow: Tensor, *, steps: int = 2, batch: int = 8, window: int = 6,
                **graph: Any) -> list[float]:
    """A few :meth:`BalancedTransfer.train_iteration` steps on consecutive real windows.

    Step ``k`` trains on the ``batch`` windows starting at ``k * batch`` (inputs of
    ``window`` steps, the next step as target); returns the total loss of each step.

    Shapes:
        flow: ``[T, n, c]`` scaled flow of one city, ``T > steps * batch + window``.
    """
    optimizers = model.configure_optimizers(lr=1e-3)
    totals = []
    for step in range(steps):
        idx = torch.arange(batch) + batch * step
        x = torch.stack([flow[i:i + window] for i in idx])
        y = flow[idx + window].unsqueeze(1)
        totals.append(model.train_iteration(x, y, optimizers, **graph).total)
    return totals
