"""Test helpers shipped with the library, for backbone authors and our own tests.

``check_backbone`` is what the conformance test runs on every registered
backbone; a plugin author runs it on theirs (see ``docs/plugins.md``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from stbat_plugin.network import PredictionNetwork

__all__ = ["check_backbone", "ring_graph"]


def ring_graph(n: int) -> Tensor:
    """Undirected ring with chords ``i <-> i+1`` and ``i <-> i+3`` (``[2, E]``, int64)."""
    src = torch.arange(n)
    rows = []
    for step in (1, 3):
        dst = (src + step) % n
        rows += [torch.stack([src, dst]), torch.stack([dst, src])]
    return torch.cat(rows, dim=1)


def check_backbone(
    backbone: nn.Module,
    *,
    layout: str | None = None,
    in_channels: int = 1,
    window: int = 6,
    n: int = 12,
    grid_shape: tuple[int, int] = (3, 4),
    batch_sizes: tuple[int, ...] = (1, 5),
    device: str | torch.device | None = None,
    atol: float = 1e-5,
) -> None:
    """Assert that ``backbone`` honours the stbat backbone contract.

    Checks: ``forward_features`` and an int ``feature_dim``; output ``[b, n, d]`` for
    a batch of 1 and of many; finite values; a gradient reaches every parameter;
    the module moves to ``device`` (when given) and still runs there; for graph
    layouts, permuting the nodes (and relabelling ``edge_index``) permutes the
    features the same way. Raises ``AssertionError`` naming the failed check.

    Args:
        backbone: the module to check (not modified; checks run on a copy).
        layout: ``"graph"`` or ``"grid"`` (default: ``backbone.layout`` or ``"graph"``).
        in_channels, window, n, grid_shape, batch_sizes: test input sizes.
        device: also run on this device (default: ``None``, stay where it is).
        atol: tolerance of the permutation check.
    """
    model = copy.deepcopy(backbone).double()
    layout = layout or getattr(model, "layout", "graph")
    assert hasattr(model, "forward_features"), "backbone has no forward_features"
    assert isinstance(getattr(model, "feature_dim", None), int), "feature_dim must be an int"
    if layout == "grid":
        n = grid_shape[0] * grid_shape[1]
    graph = {"grid_shape": grid_shape} if layout == "grid" else {"edge_index": ring_graph(n)}
    net = PredictionNetwork(model).double()
    gen = torch.Generator().manual_seed(0)
    for b in batch_sizes:
        x = torch.rand(b, window, n, in_channels, generator=gen, dtype=torch.float64)
        try:
            z = net.forward_features(x, **graph)
        except ValueError as err:  # PredictionNetwork's own shape checks
            raise AssertionError(f"batch {b}: {err}") from err
        assert z.shape == (b, n, model.feature_dim), f"batch {b}: got shape {list(z.shape)}"
        assert torch.isfinite(z).all(), f"batch {b}: non-finite features"
    _check_gradients(net, x, graph)
    if layout == "graph":
        _check_permutation(net, x, n, atol)
    if device is not None:
        moved = net.to(device)
        graph_dev = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in graph.items()}
        z = moved.forward_features(x.to(device), **graph_dev)
        assert z.device.type == torch.device(device).type, "output not on the model's device"


def _check_gradients(net: PredictionNetwork, x: Tensor, graph: dict[str, Any]) -> None:
    net.zero_grad()
    net(x, **graph).pow(2).sum().backward()
    missing = [name for name, p in net.extractor.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all()
                                       or p.grad.abs().sum() == 0)]
    assert not missing, f"no (finite, non-zero) gradient reaches: {missing}"


def _check_permutation(net: PredictionNetwork, x: Tensor, n: int, atol: float) -> None:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n)
    edge_index = ring_graph(n)
    with torch.no_grad():
        z = net.forward_features(x, edge_index=edge_index)
        z_perm = net.forward_features(x[:, :, perm], edge_index=inverse[edge_index])
    assert torch.allclose(z[:, perm], z_perm, atol=atol), "not node-permutation equivariant"
