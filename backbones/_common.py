"""Small pieces shared by the built-in backbones."""

from __future__ import annotations

import torch
from torch import Tensor


def check_graph_input(name: str, x: Tensor, edge_index: Tensor | None) -> Tensor:
    """Validate ``x`` ``[b, t, n, c]`` and ``edge_index`` ``[2, E]`` for a graph backbone."""
    if x.dim() != 4:
        raise ValueError(f"{name}: expected 'x' of shape [b, t, n, c] (got {list(x.shape)})")
    if edge_index is None:
        raise ValueError(
            f"{name} is a graph backbone and needs edge_index [2, E]: pass "
            "edge_index=... (stbat_plugin.data.build_graph makes one from adjacency, a grid "
            "or coordinates)"
        )
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(
            f"{name}: expected 'edge_index' to be of shape [2, E] (got {list(edge_index.shape)})"
        )
    if edge_index.dtype != torch.long:
        raise ValueError(f"{name}: 'edge_index' must be int64 (got {edge_index.dtype})")
    n = x.shape[2]
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= n):
        raise ValueError(
            f"{name}: 'edge_index' refers to node {int(edge_index.max())} but x has n={n} regions"
        )
    return edge_index
