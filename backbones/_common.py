"""Small pieces shared by the built-in backbones."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from stbat_plugin import hookimpl

T = TypeVar("T")


class FeatureBackbone(nn.Module):
    """Base of the built-in backbones (:class:`stbat_plugin.backbone.Backbone`).

    A subclass defines ``forward_features(x, **graph) -> [b, n, d]`` and ``feature_dim``
    and declares its ``layout`` once, as a class attribute (its registration reads it);
    calling the model gives its features.
    """

    #: ``"graph"`` or ``"grid"``
    layout: ClassVar[str] = "graph"
    feature_dim: int

    def forward_features(self, x: Tensor, **graph: Any) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define forward_features")

    def forward(self, x: Tensor, **graph: Any) -> Tensor:
        return self.forward_features(x, **graph)


def register_hook(name: str, factory: type[FeatureBackbone], description: str
                  ) -> Callable[[Any], None]:
    """The ``stbat_register_backbones`` hook of a module that registers one backbone, with the
    layout its class declares: ``stbat_register_backbones = register_hook("stnet", STNet, "...")``.
    """

    @hookimpl
    def stbat_register_backbones(register: Any) -> None:
        register(name, factory, description=description)

    return stbat_register_backbones


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


class GraphCache:
    """Operators derived from a graph (normalised adjacency, k-hop edges, ...), kept per graph.

    A backbone called with the same ``edge_index`` (and ``edge_weight``) tensor objects as
    before, unmodified since (same ``_version``), gets the operator built then instead of
    rebuilding it on every forward. Entries hold the graph tensors themselves, so an id is
    never reused while cached; the oldest of ``size`` entries is dropped first. Weights
    that require a gradient are never cached (the operator must stay in the autograd graph).

    Args:
        size: entries kept (default: ``16``).
    """

    def __init__(self, size: int = 16):
        self.size = int(size)
        self._entries: OrderedDict[tuple, tuple] = OrderedDict()

    def get(self, kind: str, edge_index: Tensor, edge_weight: Tensor | None, extra: tuple,
            build: Callable[[], T]) -> T:
        """The cached ``build()`` for this graph, ``kind`` and ``extra`` (e.g. ``n``, dtype)."""
        if edge_weight is not None and edge_weight.requires_grad:
            return build()
        key = (kind, id(edge_index), id(edge_weight), extra)
        versions = (edge_index._version, None if edge_weight is None else edge_weight._version)
        entry = self._entries.get(key)
        if entry is not None and entry[0] is edge_index and entry[1] is edge_weight \
                and entry[2] == versions:
            self._entries.move_to_end(key)
            return entry[3]
        value = build()
        self._entries[key] = (edge_index, edge_weight, versions, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()


#: the cache shared by the built-in graph backbones
graph_cache = GraphCache()
