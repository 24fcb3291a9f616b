"""Region graphs from each static source."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _data_synth import TINY, city_arrays

from stbat_plugin.data import (
    CityDataError,
    GraphContext,
    build_graph,
    city_from_arrays,
    grid_graph,
    load_city,
)


def _check(graph: GraphContext, n: int) -> set[tuple[int, int]]:
    ei = graph.edge_index
    assert ei.dtype == torch.int64 and ei.shape[0] == 2 and graph.num_nodes == n
    assert int(ei.min()) >= 0 and int(ei.max()) < n
    assert not (ei[0] == ei[1]).any(), "self loop"
    edges = set(map(tuple, ei.t().tolist()))
    assert len(edges) == ei.shape[1], "duplicate edge"
    assert {(b, a) for a, b in edges} == edges, "not symmetric"
    if graph.edge_weight is not None:
        assert graph.edge_weight.shape == (ei.shape[1],)
        assert torch.isfinite(graph.edge_weight).all()
    return edges


def test_adjacency_source_nyc() -> None:
    city = load_city(TINY, "nyc_bike")
    graph = build_graph(city)
    assert graph.source == "adjacency"
    edges = _check(graph, 69)
    assert len(edges) == 2 * 166  # 166 undirected contiguity edges (DATA.md)
    assert city.adjacency is not None
    assert edges == set(zip(*np.nonzero(city.adjacency), strict=True))


def test_grid_source_and_helper() -> None:
    city = load_city(TINY, "nyc_bike_grid2014")
    grid_only = city_from_arrays("g", {"flow": city.flow, "timestamps": city.timestamps,
                                       "grid_shape": np.array([16, 8])})
    graph = build_graph(grid_only)
    assert graph.source == "grid" and graph.edge_weight is None
    edges = _check(graph, 128)
    # ST-SSL's adj_mx is the 8-neighbour grid (DATA.md): both sources must agree.
    assert edges == _check(build_graph(city), 128)
    ei = grid_graph(2, 3)
    assert ei.shape == (2, 22)  # 2x3 grid: 7 undirected 4-neighbour + 4 diagonal edges
    assert {(0, 1), (0, 3), (0, 4)} <= set(map(tuple, ei.T.tolist()))


def test_knn_source_melbourne() -> None:
    city = load_city(TINY, "melbourne_pedestrian")
    graph = build_graph(city, k=4)
    assert graph.source == "knn"
    edges = _check(graph, 55)
    degree = np.bincount([a for a, _ in edges], minlength=55)
    assert degree.min() >= 4
    assert graph.edge_weight is not None
    assert float(graph.edge_weight.max()) <= 1.0 and float(graph.edge_weight.min()) >= 0.0


def test_edge_index_source_distances_become_similarities() -> None:
    arrays = city_arrays(
        num_regions=5,
        edge_index=np.array([[0, 1, 2, 3, 3], [1, 2, 3, 3, 4]]),  # contains a self loop
        edge_weight=np.array([100.0, 200.0, 300.0, 5.0, 100.0], np.float32),
        edge_weight_units=np.array("road distance in metres"),
    )
    graph = build_graph(city_from_arrays("bus", arrays))
    assert graph.source == "edge_index"
    edges = _check(graph, 5)
    assert edges == {(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2), (3, 4), (4, 3)}
    assert graph.edge_weight is not None
    pairs = map(tuple, graph.edge_index.t().tolist())
    w = dict(zip(pairs, graph.edge_weight.tolist(), strict=True))
    assert w[(0, 1)] == pytest.approx(w[(3, 4)]) and w[(0, 1)] > w[(1, 2)] > w[(2, 3)]
    directed = build_graph(city_from_arrays("bus", arrays), symmetric=False)
    assert directed.edge_index.shape[1] == 4


def test_real_montevideo_style_edges_without_weights() -> None:
    arrays = city_arrays(num_regions=3, edge_index=np.array([[0], [1]]))
    graph = build_graph(city_from_arrays("e", arrays))
    assert graph.edge_weight is None and graph.edge_index.tolist() == [[0, 1], [1, 0]]


def test_no_structure_raises_and_single_region_is_none() -> None:
    with pytest.raises(CityDataError, match="none of adjacency, edge_index, grid_shape, coords"):
        build_graph(city_from_arrays("bare", city_arrays()))
    single = build_graph(city_from_arrays("one", city_arrays(num_regions=1)))
    assert single.source == "none" and single.edge_index.shape == (2, 0)


def test_to_and_kwargs() -> None:
    graph = build_graph(load_city(TINY, "nyc_taxi")).to("cpu")
    kwargs = graph.as_kwargs()
    assert set(kwargs) == {"edge_index", "edge_weight"}
    assert kwargs["edge_index"] is graph.edge_index
