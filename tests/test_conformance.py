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
    """Names from the default registry; each backbone built from a fresh one. A backbone
    written for STBaT is checked strictly: every parameter gets a gradient."""
    report = check_backbone(registry.create(name))
    assert report.strict and report.unreached == () and report.dtype == torch.float32
    assert report.region_counts == ((12, 17) if report.layout == "graph" else (12, 16))


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


class OrderDependent(MeanNeighbours):
    """No parameter per node, but the features depend on the position of each region."""

    def forward_features(self, x, edge_index=None, **_: Any):
        position = torch.linspace(0, 1, x.shape[2], dtype=x.dtype).unsqueeze(-1)
        return self._features(x, edge_index) + position


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
        (DeadParameter(), "'gradients'.*no .*gradient reaches: .*unused"),
        (OrderDependent(), "'permutation'.*not node-permutation equivariant"),
        (NodeEmbedding(), r"'region count'.*n=12 but not at n=17.*'node_embedding' \[12, 4\]"),
        (PoolsRegions(), r"changed the number of regions.*\[1, 12, 4\].*\[1, 1, 4\]"),
        (NonFinite(), "non-finite"),
        (nn.Linear(2, 2), "'contract'.*forward_features"),
    ],
    ids=["dead-parameter", "order-dependent", "node-embedding", "pools-regions", "non-finite",
         "no-features"],
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


# --------------------------------------------------------------------------- issue 8 defects
class TheirModel(nn.Module):
    """A model nobody wrote for STBaT: ``forward(x)`` only, a head after the features."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.encoder = nn.Linear(6, d)
        self.head = nn.Linear(d, 1)

    def forward(self, x):  # [b, t, n, 1] -> [b, 1, n, 1]
        return self.head(torch.relu(self.encoder(x[..., 0].transpose(1, 2)))).unsqueeze(1)


def test_defect_tapped_model_passes_and_its_head_is_reported_not_failed():
    """Old: "no gradient reaches: ['model.head.weight', ...]" unless frozen by hand; and no
    way to give check_backbone a tap."""
    report = check_backbone(TheirModel(), tap="encoder", feature_dim=4)
    assert not report.strict and report.unreached == ("head.weight", "head.bias")
    with pytest.raises(AssertionError, match=r"no .*gradient reaches: \['head.weight'"):
        check_backbone(TheirModel(), tap="encoder", feature_dim=4, strict=True)


class Float32Only(MeanNeighbours):
    """Builds a float32 tensor of its own, as much real code does."""

    def forward_features(self, x, edge_index=None, **_: Any):
        return self._features(x, edge_index) @ torch.eye(4)  # float64 @ float32: an error


def test_defect_runs_in_the_models_own_dtype():
    """Old: everything in float64, so float32-only code failed with a dtype error."""
    assert check_backbone(Float32Only()).dtype == torch.float32
    assert check_backbone(MeanNeighbours().double()).dtype == torch.float64


class RaisesInside(MeanNeighbours):
    def forward_features(self, x, edge_index=None, **_: Any):
        raise RuntimeError("their bug")


def test_defect_a_failure_inside_the_model_names_the_failed_check():
    """Old: the model's own RuntimeError, with no word on which check ran."""
    with pytest.raises(AssertionError, match="check 'features at batch 1' failed: RuntimeError: "
                                             "their bug"):
        check_backbone(RaisesInside())


class BuiltForTwenty(NodeEmbedding):
    def __init__(self):
        super().__init__(n=20)


class LazyNodeEmbedding(MeanNeighbours):
    """Creates (and re-creates) its node embedding at the n of its input."""

    def forward_features(self, x, edge_index=None, **_: Any):
        n = x.shape[2]
        if getattr(self, "node_embedding", None) is None or self.node_embedding.shape[0] != n:
            self.node_embedding = nn.Parameter(torch.zeros(n, 4, dtype=x.dtype))
        return self._features(x, edge_index) + self.node_embedding


@pytest.mark.parametrize(("model", "match"), [
    (NodeEmbedding(), r"runs at n=12 but not at n=17.*'node_embedding' \[12, 4\] are sized to 12"),
    (BuiltForTwenty(), r"fails at n=12 .*runs at n=20.*'node_embedding' \[20, 4\] are sized to 20"),
    (LazyNodeEmbedding(), r"change shape with the region count.*'node_embedding' \[12, 4\] -> "
                          r"\[17, 4\]"),
], ids=["built-for-n", "built-for-another-n", "created-per-n"])
def test_defect_per_node_parameters_are_named(model, match):
    """Old: NodeEmbedding only failed the permutation check, and a model built for another n
    failed with a raw RuntimeError; the parameter was never named."""
    with pytest.raises(AssertionError, match=f"check 'region count' failed: .*{match}"):
        check_backbone(model)
