"""The faster backbones hold to their naive twins and to the code they replace.

graph ST-net propagates node-major ``[n, (B d)]`` with a cached GCN operator; STGCN's
Chebyshev convolution is a sparse matmul instead of torch-geometric's gather/scatter; both
build their graph operator once per graph (``graph_cache``); ST-net convolves channels-last.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.nn import ChebConv

from stbat_backbones._common import GraphCache, graph_cache
from stbat_backbones.graph_stnet import GraphSTNet
from stbat_backbones.stgcn import STGCN, SparseChebConv
from stbat_backbones.stnet import STNet
from stbat_plugin import BalancedTransfer
from stbat_plugin.testing import ring_graph


def _graph(n: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A directed graph without self loops, with positive weights (float64)."""
    gen = torch.Generator().manual_seed(seed)
    ei = torch.unique(torch.randint(0, n, (2, 3 * n), generator=gen), dim=1)
    ei = ei[:, ei[0] != ei[1]]
    return ei, torch.rand(ei.shape[1], generator=gen, dtype=torch.float64) + 0.1


def _gcn_dense(edge_index: torch.Tensor, weight: torch.Tensor, n: int) -> torch.Tensor:
    r"""Kipf & Welling's :math:`D^{-1/2}(A + I)D^{-1/2}`, row = target, by a loop."""
    a = torch.eye(n, dtype=torch.float64)
    for (s, t), w in zip(edge_index.t().tolist(), weight.tolist(), strict=True):
        a[t, s] += w
    d = a.sum(dim=1)
    return a / torch.sqrt(d[:, None] * d[None, :])


def _graph_stnet_naive(model: GraphSTNet, x: torch.Tensor, a_hat: torch.Tensor) -> torch.Tensor:
    """The ST-net recipe one frame and one region series at a time (float64)."""
    b, t, n, _ = x.shape
    feats = torch.zeros(b, n, model.feature_dim, dtype=x.dtype)
    for i in range(b):
        frames = []
        for s in range(t):
            f = F.relu(model.stem(x[i, s]))  # [n, d]
            for block in model.blocks:
                c1, c2 = block.conv1, block.conv2
                inner = F.relu(a_hat @ c1.lin(f) + c1.bias)
                f = F.relu(f + a_hat @ c2.lin(inner) + c2.bias)
            frames.append(f)
        _, (h_n, _) = model.lstm(torch.stack(frames, dim=1))  # [n, t, d] -> [1, n, d]
        feats[i] = h_n[-1]
    return feats


def test_graph_stnet_matches_its_naive_twin_with_gradients():
    n = 7
    ei, w = _graph(n)
    torch.manual_seed(0)
    model = GraphSTNet(in_channels=2, channels=8, num_blocks=2, hidden=6).double()
    x = torch.rand(3, 4, n, 2, dtype=torch.float64)
    out = model.forward_features(x, edge_index=ei, edge_weight=w)
    naive = _graph_stnet_naive(model, x, _gcn_dense(ei, w, n))
    assert torch.allclose(out, naive, atol=1e-12)
    with torch.no_grad():  # the same edge_index object with other weights: not the cached operator
        other = model.forward_features(x, edge_index=ei, edge_weight=w.flip(0))
    assert torch.allclose(other, _graph_stnet_naive(model, x, _gcn_dense(ei, w.flip(0), n)),
                          atol=1e-12)
    twin = copy.deepcopy(model)
    out.square().sum().backward()
    _graph_stnet_naive(twin, x, _gcn_dense(ei, w, n)).square().sum().backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-10), name


def _stnet_naive(model: STNet, x: torch.Tensor) -> torch.Tensor:
    """ST-net with plain (contiguous) convolutions, one sample at a time."""
    def conv(layer: torch.nn.Conv2d, f: torch.Tensor) -> torch.Tensor:
        return F.conv2d(f.contiguous(), layer.weight.contiguous(), layer.bias, padding=1)

    b, t, _, h, w = x.shape
    feats = []
    for i in range(b):
        f = F.relu(conv(model.stem, x[i]))  # [t, d, h, w]
        for block in model.blocks:
            f = F.relu(f + conv(block.conv2, F.relu(conv(block.conv1, f))))
        _, (h_n, _) = model.lstm(f.permute(2, 3, 0, 1).reshape(h * w, t, -1))
        feats.append(h_n[-1])
    return torch.stack(feats)


def test_channels_last_stnet_matches_plain_convolutions_with_gradients():
    torch.manual_seed(0)
    model = STNet(in_channels=2, channels=8, num_blocks=2, hidden=6).double()
    assert model.stem.weight.is_contiguous(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    x = torch.rand(3, 4, 2, 5, 3, dtype=torch.float64)
    out, naive = model.forward_features(x), _stnet_naive(twin, x)
    assert torch.allclose(out, naive, atol=1e-12)
    out.square().sum().backward()
    naive.square().sum().backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-10), name


class _PygCheb(torch.nn.Module):
    """torch-geometric's own ChebConv (the code SparseChebConv replaces), on ``[n, B, c]``."""

    def __init__(self, sparse: SparseChebConv):
        super().__init__()
        self.conv = ChebConv(sparse.in_channels, sparse.out_channels, K=len(sparse.lins))
        self.conv.load_state_dict(sparse.state_dict())

    def forward(self, h, edge_index, edge_weight=None):
        return self.conv(h.transpose(0, 1), edge_index, edge_weight).transpose(0, 1)


def _with_pyg_cheb(model: STGCN) -> STGCN:
    """A copy of ``model`` whose graph convolutions are torch-geometric's ChebConv."""
    ref = copy.deepcopy(model)
    for block in ref.blocks:
        block.graph = _PygCheb(block.graph).to(next(model.parameters()).dtype)
    return ref


@pytest.mark.parametrize("weighted", [False, True])
def test_stgcn_sparse_chebconv_matches_torch_geometric(weighted):
    n = 8
    ei, w = _graph(n, seed=1)
    w = w if weighted else None
    torch.manual_seed(0)
    model = STGCN(in_channels=1, channels=(8, 4, 8), cheb_k=3, feature_dim=5).double()
    assert isinstance(model.blocks[0].graph, SparseChebConv)
    ref = _with_pyg_cheb(model)
    x = torch.rand(2, 5, n, 1, dtype=torch.float64)
    out, expected = model(x, edge_index=ei, edge_weight=w), ref(x, edge_index=ei, edge_weight=w)
    assert torch.allclose(out, expected, atol=1e-12)
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-10), name


def test_sparse_chebconv_rejects_what_it_does_not_support():
    conv = SparseChebConv(3, 2, K=2)
    with pytest.raises(ValueError, match="batch"):
        conv(torch.rand(4, 1, 3), ring_graph(4), batch=torch.zeros(4, dtype=torch.long))


def test_stbat_losses_unchanged_with_the_sparse_chebconv(nyc_taxi):
    """Three STBaT iterations: the same losses as with torch-geometric's ChebConv (float64)."""
    torch.manual_seed(0)
    backbone = STGCN(in_channels=2, channels=(8, 4, 8), feature_dim=16).double()
    models = [BalancedTransfer(backbone, region_features=nyc_taxi.poi, out_channels=2).double()]
    models.append(copy.deepcopy(models[0]))
    models[1].net.extractor = _with_pyg_cheb(models[1].net.extractor)
    losses = []
    for model in models:
        opts = model.configure_optimizers(lr=1e-2)
        run = []
        for step in range(3):
            x, y = nyc_taxi.batch(start=8 * step, size=8)
            run.append(model.train_iteration(x.double(), y.double(), opts,
                                             edge_index=nyc_taxi.edge_index).as_dict())
        losses.append(run)
    for new, old in zip(*losses, strict=True):
        assert new == pytest.approx(old, rel=1e-9, abs=1e-12)


# --------------------------------------------------------------------------- GraphCache
def test_graph_cache_reuses_only_the_same_unmodified_tensors():
    cache, built = GraphCache(size=2), []

    def get(ei, w=None, extra=()):
        return cache.get("op", ei, w, extra, lambda: built.append(1) or len(built))

    ei = ring_graph(5)
    assert get(ei) == get(ei) == 1
    assert get(ei.clone()) == 2  # equal values, another tensor: not assumed equal
    assert get(ei, extra=(5,)) == 3  # another key
    ei[0, 0] = 3  # in place: rebuilt
    assert get(ei) == 4
    w1, w2 = torch.rand(ei.shape[1]), torch.rand(ei.shape[1])
    assert get(ei, w1) != get(ei, w2)  # the weights are part of the graph
    w = torch.rand(ei.shape[1], requires_grad=True)
    assert get(ei, w) == 7 and get(ei, w) == 8  # a weight with a gradient is never cached
    assert len(cache._entries) <= 2


def test_graph_stnet_builds_its_operator_once_per_graph(monkeypatch):
    import stbat_backbones.graph_stnet as gs

    graph_cache.clear()
    calls = []
    real = gs.gcn_operator
    monkeypatch.setattr(gs, "gcn_operator", lambda *a: calls.append(1) or real(*a))
    model, ei = GraphSTNet(channels=4, hidden=4), ring_graph(6)
    x = torch.rand(2, 3, 6, 1)
    first = model(x, edge_index=ei)
    assert torch.equal(model(x, edge_index=ei), first) and len(calls) == 1
    model(x, edge_index=ei[:, :-1])  # another graph
    assert len(calls) == 2
