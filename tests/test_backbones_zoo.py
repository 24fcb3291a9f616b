"""The backbone zoo (pdformer, gwnet, stgcn) on the contract, on real tiny cities and in STBaT."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stbat_backbones.gwnet import transition_matrices
from stbat_backbones.pdformer import neighbourhood_mask, semantic_neighbours
from stbat_plugin import BalancedTransfer
from stbat_plugin.backbone import CityFacts, city_context
from stbat_plugin.data import grid_graph
from stbat_plugin.testing import check_backbone, ring_graph

ZOO = ("pdformer", "gwnet", "stgcn")


def _windows(flow: torch.Tensor, size: int = 4, window: int = 6) -> torch.Tensor:
    """``size`` consecutive windows ``[size, window, n, c]`` of a ``[T, n, c]`` flow."""
    return torch.stack([flow[i:i + window] for i in range(size)])


def _load(tiny_data_dir: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(tiny_data_dir / f"{name}.npz") as d:
        arrays = {k: d[k] for k in d.files}
    flow = arrays["flow"].astype(np.float32)
    arrays["flow"] = flow / flow[: len(flow) // 2].max()  # scaled on the first half only
    return arrays


def _knn_edges(coords: np.ndarray, k: int = 5) -> torch.Tensor:
    """Undirected k-nearest-neighbour edges from (lat, lon), built here on purpose."""
    pts = torch.as_tensor(coords, dtype=torch.float64)
    dist = torch.cdist(pts, pts).fill_diagonal_(math.inf)
    dst = dist.topk(k, largest=False).indices.reshape(-1)
    src = torch.arange(len(pts)).repeat_interleave(k)
    edges = torch.cat([torch.stack([src, dst]), torch.stack([dst, src])], dim=1)
    return torch.unique(edges, dim=1)


def _info(train_flow: torch.Tensor, edge_index: torch.Tensor | None = None,
          steps_per_day: int = 24) -> CityFacts:
    return CityFacts(num_regions=train_flow.shape[1], steps_per_day=steps_per_day,
                    train_flow=train_flow, edge_index=edge_index)


def _context(model: torch.nn.Module, train_flow: torch.Tensor, edge_index: torch.Tensor):
    return city_context(model, _info(train_flow, edge_index))


# --------------------------------------------------------------------------- contract
@pytest.mark.parametrize("in_channels", [1, 2])
@pytest.mark.parametrize("name", ZOO)
def test_check_backbone(registry, name, in_channels):
    spec = registry.get(name)
    assert spec.layout == "graph" and spec.distribution == "stbat-plugin"
    check_backbone(registry.create(name, in_channels=in_channels), in_channels=in_channels)


@pytest.mark.parametrize("window", [1, 2, 12])
@pytest.mark.parametrize("name", ZOO)
def test_any_window_length(registry, name, window):
    check_backbone(registry.create(name), window=window, batch_sizes=(2,))


def test_gwnet_without_adaptive_adjacency(registry):
    check_backbone(registry.create("gwnet", adaptive=False))


@pytest.mark.parametrize("name", ZOO)
def test_missing_graph_says_how_to_fix(registry, name):
    with pytest.raises(ValueError, match="needs edge_index"):
        registry.create(name).forward_features(torch.rand(2, 6, 5, 1))


# --------------------------------------------------------------------------- real cities
@pytest.mark.parametrize("name", ZOO)
def test_one_model_runs_on_cities_of_different_n(registry, tiny_data_dir, name):
    model = registry.create(name, in_channels=2)  # built once, used on two cities
    grid = _load(tiny_data_dir, "nyc_bike_grid2014")
    taxi = _load(tiny_data_dir, "nyc_taxi")
    cities = [
        (grid["flow"], torch.from_numpy(grid_graph(*grid["grid_shape"]))),
        (taxi["flow"], torch.nonzero(torch.from_numpy(taxi["adjacency"]) > 0).t()),
    ]
    for flow, edge_index in cities:
        flow = torch.from_numpy(flow)
        ctx = _context(model, flow[: len(flow) // 2], edge_index)
        z = model.forward_features(_windows(flow), edge_index=edge_index, **ctx)
        assert z.shape == (4, flow.shape[1], model.feature_dim) and torch.isfinite(z).all()


@pytest.mark.parametrize("name", ZOO)
def test_runs_on_a_knn_graph_city(registry, tiny_data_dir, name):
    mel = _load(tiny_data_dir, "melbourne_pedestrian")  # coordinates only, no adjacency
    flow, edge_index = torch.from_numpy(mel["flow"]), _knn_edges(mel["coords"])
    model = registry.create(name, in_channels=1)
    ctx = _context(model, flow[: len(flow) // 2], edge_index)
    z = model.forward_features(_windows(flow), edge_index=edge_index, **ctx)
    assert z.shape == (4, 55, model.feature_dim) and torch.isfinite(z).all()


@pytest.mark.parametrize("name", ZOO)
def test_trains_inside_balanced_transfer(registry, nyc_taxi, name):
    torch.manual_seed(0)
    backbone = registry.create(name, in_channels=2)
    ctx = _context(backbone, nyc_taxi.flow[:336], nyc_taxi.edge_index)
    model = BalancedTransfer(backbone, region_features=nyc_taxi.poi, out_channels=2,
                             registry=registry)
    optimizers = model.configure_optimizers(lr=1e-3)
    before = [p.detach().clone() for p in backbone.parameters()]
    for step in range(3):
        x, y = nyc_taxi.batch(start=16 * step, size=16)
        losses = model.train_iteration(x, y, optimizers, edge_index=nyc_taxi.edge_index, **ctx)
        assert all(math.isfinite(v) for v in losses.as_dict().values()), losses
        assert losses.simdcl > 0 and losses.emb > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, backbone.parameters(), strict=True))


# --------------------------------------------------------------------------- PDFormer context
def test_prepare_city_reads_the_training_slice_only(registry, nyc_taxi):
    model, cut = registry.create("pdformer"), 14 * 24
    flow = nyc_taxi.flow.sum(-1, keepdim=True)
    changed = flow.clone()
    changed[cut:] = torch.rand_like(changed[cut:])
    first = model.prepare_city(_info(flow[:cut], nyc_taxi.edge_index))
    again = model.prepare_city(_info(changed[:cut], nyc_taxi.edge_index))
    assert torch.equal(first["semantic_index"], again["semantic_index"])
    changed[:cut] = torch.rand_like(changed[:cut])  # the slice itself does matter
    moved = model.prepare_city(_info(changed[:cut]))["semantic_index"]
    assert not torch.equal(first["semantic_index"], moved)


@pytest.mark.parametrize("steps", [0, 1])
def test_prepare_city_zero_shot_falls_back_to_geography(registry, nyc_taxi, steps):
    model = registry.create("pdformer", in_channels=2)
    ctx = model.prepare_city(_info(nyc_taxi.flow[:steps], nyc_taxi.edge_index))
    assert ctx == {}
    x, _ = nyc_taxi.batch(size=2)
    with torch.no_grad():
        z = model.forward_features(x, edge_index=nyc_taxi.edge_index, **ctx)
        plain = model.forward_features(x, edge_index=nyc_taxi.edge_index)
    assert torch.equal(z, plain)


def test_semantic_index_is_used_and_checked(registry, nyc_taxi):
    model = registry.create("pdformer", in_channels=2)
    x, _ = nyc_taxi.batch(size=2)
    ctx = model.prepare_city(_info(nyc_taxi.flow[:336]))
    with torch.no_grad():
        z = model.forward_features(x, edge_index=nyc_taxi.edge_index, **ctx)
        plain = model.forward_features(x, edge_index=nyc_taxi.edge_index)
    assert not torch.allclose(z, plain)
    other = model.prepare_city(_info(torch.rand(48, 100, 1)))  # another city: n = 100
    with pytest.raises(ValueError, match="prepare_city"):
        model.forward_features(x, edge_index=nyc_taxi.edge_index, **other)


def test_semantic_neighbours_match_a_naive_loop():
    gen = torch.Generator().manual_seed(0)
    flow = torch.rand(24 * 3 + 5, 9, 2, generator=gen, dtype=torch.float64)
    flow[:, 4] = 3 * flow[:, 7] + 1  # region 4 follows region 7 exactly
    index = semantic_neighbours(flow, k=3, steps_per_day=24)
    daily = flow[: 24 * 3].reshape(3, 24, 9, 2).mean(0).permute(1, 0, 2).reshape(9, -1)
    for i in range(9):
        corr = [-math.inf if j == i else float(np.corrcoef(daily[i], daily[j])[0, 1])
                for j in range(9)]
        expected = set(np.argsort(corr)[::-1][:3].tolist())
        assert set(index[0, index[1] == i].tolist()) == expected
    assert 7 in index[0, index[1] == 4].tolist()


def test_neighbourhood_mask_matches_breadth_first_search():
    edge_index, n = ring_graph(10)[:, ::2], 10  # directed ring with chords
    for hops in (1, 2, 3):
        mask = neighbourhood_mask(edge_index, n, hops)
        for i in range(n):
            reach = {i}
            for _ in range(hops):
                reach |= {int(s) for s, t in edge_index.t() if int(t) in reach}
            assert set(torch.nonzero(mask[i]).flatten().tolist()) == reach


def test_transition_matrices_match_a_loop():
    edge_index, weight = ring_graph(6), torch.rand(24, dtype=torch.float64)
    forward, backward = transition_matrices(edge_index, weight, 6, torch.float64)
    out_deg, in_deg = torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    for (s, t), w in zip(edge_index.t().tolist(), weight, strict=True):
        out_deg[s] += w
        in_deg[t] += w
    fwd, bwd = torch.zeros(6, 6, dtype=torch.float64), torch.zeros(6, 6, dtype=torch.float64)
    for (s, t), w in zip(edge_index.t().tolist(), weight, strict=True):
        fwd[t, s] += w / out_deg[s]  # mass leaving s along s -> t
        bwd[s, t] += w / in_deg[t]  # mass going back along t -> s
    assert torch.allclose(forward, fwd) and torch.allclose(backward, bwd)
