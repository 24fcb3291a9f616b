"""PDFormer's spatial attention over edge lists: the same values as the dense masked attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import stbat_backbones.pdformer as pd
from stbat_backbones._common import graph_cache
from stbat_plugin.backbone import CityFacts
from stbat_plugin.data import grid_graph
from stbat_plugin.testing import ring_graph


def _random_graph(n: int, edges: int, seed: int) -> torch.Tensor:
    """A directed graph with duplicate edges, self loops and isolated nodes (the last two)."""
    gen = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, n - 2, (2, edges), generator=gen)
    return torch.cat([ei, ei[:, :3], torch.tensor([[0], [0]])], dim=1)


def _reach_naive(edge_index: torch.Tensor, n: int, hops: int) -> set[tuple[int, int]]:
    """``(j, i)`` with j reaching i in at most ``hops`` edges, by breadth-first search."""
    pairs = set()
    for i in range(n):
        reach = {i}
        for _ in range(hops):
            reach |= {int(s) for s, t in edge_index.t() if int(t) in reach}
        pairs |= {(j, i) for j in reach}
    return pairs


def _attention_naive(q, k, v, edges, n):
    """Each target's softmax over its sources, one region at a time ([n, M, e])."""
    out = torch.zeros_like(v)
    for i in range(n):
        src = edges[0, edges[1] == i]
        scores = (q[i:i + 1] * k[src]).sum(-1) / math.sqrt(q.shape[-1])  # [deg, M]
        out[i] = (scores.softmax(dim=0).unsqueeze(-1) * v[src]).sum(0)
    return out


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_neighbourhood_edges_match_breadth_first_search(hops):
    n = 12
    edge_index = _random_graph(n, 14, seed=hops)
    edges = pd.neighbourhood_edges(edge_index, n, hops)
    pairs = [tuple(p) for p in edges.t().tolist()]
    assert set(pairs) == _reach_naive(edge_index, n, hops)
    assert len(pairs) == len(set(pairs))  # no duplicates
    assert pairs == sorted(pairs, key=lambda p: (p[1], p[0]))  # by target, then source
    mask = pd.neighbourhood_mask(edge_index, n, hops)
    assert set(map(tuple, torch.nonzero(mask).flip(1).tolist())) == set(pairs)


def test_neighbourhood_edges_check_hops():
    with pytest.raises(ValueError, match="hops >= 1"):
        pd.neighbourhood_edges(ring_graph(5), 5, 0)


def test_edge_attention_matches_masked_sdpa_and_a_loop_with_gradients():
    n, m, e = 10, 5, 4
    edges = pd.neighbourhood_edges(_random_graph(n, 15, seed=0), n, 2)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, m, e, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    out = pd.edge_attention(q, k, v, edges)
    mask = pd.neighbourhood_mask(_random_graph(n, 15, seed=0), n, 2)
    dense = F.scaled_dot_product_attention(*(t.permute(1, 0, 2) for t in (q, k, v)),
                                           attn_mask=mask).permute(1, 0, 2)
    assert torch.allclose(out, dense, atol=1e-12)
    assert torch.allclose(out, _attention_naive(q, k, v, edges, n), atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    dense_grads = torch.autograd.grad(dense.square().sum(), (q, k, v))
    for a, b in zip(grads, dense_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_edge_attention_is_stable_for_large_scores():
    n, m, e = 6, 2, 3
    edges = pd.neighbourhood_edges(ring_graph(n), n, 1)
    q = torch.full((n, m, e), 300.0, dtype=torch.float64)
    k = torch.randn(n, m, e, dtype=torch.float64) * 50
    out = pd.edge_attention(q, k, torch.randn(n, m, e, dtype=torch.float64), edges)
    assert torch.isfinite(out).all()


def test_blocked_edge_attention_checkpoints_blocks_with_the_same_gradients(monkeypatch):
    n, m, e = 9, 7, 4
    edges = pd.neighbourhood_edges(ring_graph(n), n, 2)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(n, m, e, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    whole = pd.edge_attention(q, k, v, edges)
    expected = torch.autograd.grad(whole.square().sum(), (q, k, v))
    monkeypatch.setattr(pd, "EDGE_BLOCK_BYTES", 1)  # one row per block
    blocked = pd.blocked_edge_attention(q, k, v, edges)
    assert torch.allclose(blocked, whole, atol=1e-13)
    for a, b in zip(torch.autograd.grad(blocked.square().sum(), (q, k, v)), expected, strict=True):
        assert torch.allclose(a, b, atol=1e-13)
    with torch.no_grad():
        assert torch.allclose(pd.blocked_edge_attention(q, k, v, edges), whole, atol=1e-13)


def _pair(nyc_taxi, **kwargs) -> tuple[pd.PDFormer, pd.PDFormer]:
    torch.manual_seed(0)
    dense = pd.PDFormer(in_channels=2, spatial_attention="dense", **kwargs).double()
    sparse = pd.PDFormer(in_channels=2, spatial_attention="sparse", **kwargs).double()
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


@pytest.mark.parametrize("semantic", [False, True])
def test_sparse_pdformer_matches_the_dense_one(nyc_taxi, semantic):
    dense, sparse = _pair(nyc_taxi)
    x, _ = nyc_taxi.batch(size=3)
    x = x.double()
    flow = nyc_taxi.flow[:24 * 7].double()
    ctx = dense.prepare_city(CityFacts(num_regions=nyc_taxi.n, steps_per_day=24,
                                      train_flow=flow)) if semantic else {}
    out_d = dense(x, edge_index=nyc_taxi.edge_index, **ctx)
    out_s = sparse(x, edge_index=nyc_taxi.edge_index, **ctx)
    assert torch.allclose(out_s, out_d, atol=1e-12)
    out_d.square().sum().backward()
    out_s.square().sum().backward()
    for (name, a), b in zip(dense.named_parameters(), sparse.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-10), name


def test_auto_attends_over_edges_on_large_sparse_graphs_only(nyc_taxi):
    model = pd.PDFormer(spatial_attention="auto")
    small = model._neighbourhood(nyc_taxi.edge_index, nyc_taxi.n, 2)  # 21 % of pairs
    assert small.mask is not None
    ei = torch.as_tensor(grid_graph(30, 40))
    large = model._neighbourhood(ei, 1200, 2)  # 25 neighbours of 1200: 2 %
    assert large.mask is None and large.edges.shape[1] < 1200 * 26
    with pytest.raises(ValueError, match="spatial_attention"):
        pd.PDFormer(spatial_attention="flash")


def test_runs_at_5000_regions_without_n_by_n_tensors():
    """Forward and backward on 5,000 regions; the old masks were [n, n] (and n^3 to build)."""
    h, w = 50, 100
    ei = torch.as_tensor(grid_graph(h, w))
    torch.manual_seed(0)
    model = pd.PDFormer(num_layers=1, d_model=16, temporal_heads=1, geo_heads=2, sem_heads=1,
                        feature_dim=8)
    x = torch.rand(1, 3, h * w, 1)
    ctx = model.prepare_city(CityFacts(num_regions=h * w, steps_per_day=24,
                                      train_flow=torch.rand(30, h * w, 1)))
    z = model.forward_features(x, edge_index=ei, **ctx)
    z.sum().backward()
    assert z.shape == (1, h * w, 8) and torch.isfinite(z).all()
    assert model._neighbourhood(ei, h * w, 2).mask is None
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_semantic_neighbours_in_row_blocks_match_one_block(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    flow = torch.rand(24 * 2 + 3, 11, 2, generator=gen, dtype=torch.float64)
    whole = pd.semantic_neighbours(flow, k=4, steps_per_day=24)
    monkeypatch.setattr(pd, "SEMANTIC_BLOCK", 3)
    assert torch.equal(pd.semantic_neighbours(flow, k=4, steps_per_day=24), whole)


def test_neighbourhood_is_built_once_per_graph(monkeypatch, nyc_taxi):
    graph_cache.clear()
    calls = []
    build = pd.neighbourhood_edges
    monkeypatch.setattr(pd, "neighbourhood_edges", lambda *a: calls.append(a) or build(*a))
    model = pd.PDFormer(in_channels=2)
    x, _ = nyc_taxi.batch(size=2)
    ei = nyc_taxi.edge_index.clone()
    with torch.no_grad():
        first = model(x, edge_index=ei)
        assert torch.equal(model(x, edge_index=ei), first) and len(calls) == 1
        ei[:, 0] = ei[:, 1]  # edited in place: rebuilt
        model(x, edge_index=ei)
    assert len(calls) == 2
