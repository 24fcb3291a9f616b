"""Every registered backbone honours the contract; ``check_backbone`` catches broken ones."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from stbat_plugin import list_backbones
from stbat_plugin.testing import check_backbone, ring_graph


@pytest.mark.parametrize("name", list_backbones())
def test_registered_backbone_conforms(registry, name):
    """Names from the default registry; each backbone built from a fresh one."""
    check_backbone(registry.create(name))


@pytest.mark.parametrize("name", ["stnet", "graph_stnet"])
def test_builtin_backbone_conforms_with_two_channels(registry, name):
    check_backbone(registry.create(name, in_channels=2, channels=8, hidden=8), in_channels=2,
                   batch_sizes=(2,))


class MeanNeighbours(nn.Module):
    """A small, correct graph backbone: per-region MLP plus the mean over its neighbours."""

    layout = "graph"
    feature_dim = 4

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.own = nn.Linear(in_channels, 4)
        self.neigh = nn.Linear(in_channels, 4)

    def _features(self, x, edge_index):
        h = x.mean(1)  # [b, n, c]
        src, dst = edge_index
        agg = torch.zeros_like(h).index_add_(1, dst, h[:, src])
        deg = torch.zeros(h.shape[1], dtype=h.dtype).index_add_(0, dst, torch.ones_like(dst,
                                                                                      dtype=h.dtype))
        return torch.tanh(self.own(h) + self.neigh(agg / deg.clamp_min(1).unsqueeze(-1)))

    def forward_features(self, x, edge_index=None, **_: Any):
        return self._features(x, edge_index)


class DeadParameter(MeanNeighbours):
    def __init__(self, in_channels: int = 1):
        super().__init__(in_channels)
        self.unused = nn.Linear(4, 4)


class NodeEmbedding(MeanNeighbours):
    """Learns one embedding per node index: breaks permutation equivariance."""

    def __init__(self, in_channels: int = 1, n: int = 12):
        super().__init__(in_channels)
        self.node_embedding = nn.Parameter(torch.randn(n, 4))

    def forward_features(self, x, edge_index=None, **_: Any):
        return self._features(x, edge_index) + self.node_embedding


class PoolsRegions(MeanNeighbours):
    def forward_features(self, x, edge_index=None, **_: Any):
        return self._features(x, edge_index).mean(1, keepdim=True)


class NonFinite(MeanNeighbours):
    def forward_features(self, x, edge_index=None, **_: Any):
        return self._features(x, edge_index) / 0.0


def test_a_correct_custom_backbone_passes():
    check_backbone(MeanNeighbours())
    # sanity of the fixture graph used by the permutation check
    edges = ring_graph(12)
    assert edges.shape == (2, 48) and edges.dtype == torch.long


@pytest.mark.parametrize(
    ("broken", "match"),
    [
        (DeadParameter(), "no .*gradient reaches: .*unused"),
        (NodeEmbedding(), "not node-permutation equivariant"),
        (PoolsRegions(), r"changed the number of regions.*\[1, 12, 4\].*\[1, 1, 4\]"),
        (NonFinite(), "non-finite"),
        (nn.Linear(2, 2), "no forward_features"),
    ],
    ids=["dead-parameter", "node-embedding", "pools-regions", "non-finite", "no-features"],
)
def test_check_backbone_fails_on_broken_backbones(broken, match):
    with pytest.raises(AssertionError, match=match):
        check_backbone(broken)


def test_check_backbone_does_not_modify_the_backbone():
    model = MeanNeighbours()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_backbone(model)
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
