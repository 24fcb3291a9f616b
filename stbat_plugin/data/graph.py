"""The region graph a backbone consumes, built from whatever static structure a city has.

Priority: ``adjacency`` > ``edge_index`` (+ ``edge_weight``) > ``grid_shape`` (8-neighbour
grid) > ``coords`` (k nearest neighbours by haversine distance). Self loops are removed;
isolated nodes are kept. Distances become similarities with the Gaussian kernel
``w = exp(-d^2 / sigma^2)``, ``sigma`` = standard deviation of the edge distances (DCRNN's
convention; the mean distance when all distances are equal, weight 1 when they are all 0).
Stored ``edge_weight`` values count as distances when the file's ``edge_weight_units`` mentions
a distance (distance, metre/meter, km, mile), else they are used as given. Very long edges
can get a weight that underflows to 0 (e.g. a few Montevideo links over 1 km).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from stbat_plugin.data.city import City
from stbat_plugin.data.validation import CityDataError

logger = logging.getLogger(__name__)

EARTH_RADIUS_KM = 6371.0088
DISTANCE_WORDS = ("distance", "metre", "meter", "km", "mile")
SOURCES = ("adjacency", "edge_index", "grid", "knn", "none")


@dataclass(frozen=True, eq=False)
class GraphContext:
    """Edge list of the region graph.

    Shapes:
        edge_index: [2, E] int64 (source row, target row); edge_weight: [E] float32 or None.
    """

    edge_index: torch.Tensor
    edge_weight: torch.Tensor | None
    num_nodes: int
    source: str

    def to(self, device: torch.device | str) -> GraphContext:
        """Copy of the graph with its tensors on ``device``."""
        weight = None if self.edge_weight is None else self.edge_weight.to(device)
        return GraphContext(self.edge_index.to(device), weight, self.num_nodes, self.source)

    def as_kwargs(self) -> dict[str, torch.Tensor | None]:
        """``{"edge_index": ..., "edge_weight": ...}`` for torch-geometric style layers."""
        return {"edge_index": self.edge_index, "edge_weight": self.edge_weight}


def build_graph(city: City, k: int = 8, symmetric: bool = True) -> GraphContext:
    """Build the region graph of ``city`` from its best available static structure.

    Args:
        city: the city.
        k: neighbours per region for the coordinate (kNN) fallback.
        symmetric: make the graph undirected (reverse edges added, duplicates merged by max).

    A single-region city without structure gets an empty graph with ``source="none"``.
    """
    n = city.num_regions
    w: np.ndarray | None
    if city.adjacency is not None:
        ei, source = _from_adjacency(city.adjacency), "adjacency"
        w = city.adjacency[ei[0], ei[1]].astype(np.float32)
    elif city.edge_index is not None:
        ei, w, source = city.edge_index, _edge_similarity(city), "edge_index"
    elif city.grid_shape is not None:
        ei, w, source = grid_graph(*city.grid_shape), None, "grid"
    elif city.coords is not None:
        ei, w, source = knn_graph(city.coords, k)
    elif n == 1:
        ei, w, source = np.zeros((2, 0), np.int64), None, "none"
    else:
        raise CityDataError(
            f"city {city.name!r} has none of adjacency, edge_index, grid_shape, coords; add one "
            f"to its .npz file so a region graph can be built."
        )
    ei, w = coalesce(ei, w, n, symmetric)
    logger.info("graph for %s from %s: %d nodes, %d edges", city.name, source, n, ei.shape[1])
    weight = None if w is None else torch.from_numpy(w)
    return GraphContext(torch.from_numpy(ei), weight, n, source)


def _from_adjacency(adjacency: np.ndarray) -> np.ndarray:
    """Edges at the non-zero entries of ``adjacency`` [N, N] -> [2, E] int64."""
    rows, cols = np.nonzero(adjacency)
    return np.stack([rows, cols]).astype(np.int64)


def _edge_similarity(city: City) -> np.ndarray | None:
    """Stored edge weights as similarities (Gaussian kernel when they are distances)."""
    if city.edge_weight is None:
        return None
    units = city.meta.get("edge_weight_units", "").lower()
    if any(word in units for word in DISTANCE_WORDS):
        logger.info("edge_weight of %s are distances (%s): Gaussian kernel", city.name, units)
        return gaussian_kernel(city.edge_weight)
    return city.edge_weight.astype(np.float32)


def gaussian_kernel(distance: np.ndarray) -> np.ndarray:
    """``exp(-d^2 / sigma^2)`` with ``sigma`` = std of ``distance`` (see module docstring).

    Shapes:
        distance: [E] -> [E] float32 in (0, 1].
    """
    d = np.asarray(distance, dtype=np.float64)
    if d.size == 0:
        return d.astype(np.float32)
    sigma = float(d.std()) or float(d.mean())
    if sigma == 0.0:
        return np.ones_like(d, dtype=np.float32)
    return np.exp(-((d / sigma) ** 2)).astype(np.float32)


def grid_graph(h: int, w: int) -> np.ndarray:
    """8-neighbour edges of an ``h x w`` row-major grid (``n = row * w + col``).

    Shapes:
        returns [2, E] int64, both directions of every edge, no self loops.
    """
    rows, cols = np.divmod(np.arange(h * w), w)
    src, dst = [], []
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            r, c = rows + dr, cols + dc
            ok = ((dr, dc) != (0, 0)) & (r >= 0) & (r < h) & (c >= 0) & (c < w)
            src.append((rows * w + cols)[ok])
            dst.append((r * w + c)[ok])
    return np.stack([np.concatenate(src), np.concatenate(dst)]).astype(np.int64)


def haversine_km(coords: np.ndarray) -> np.ndarray:
    """Pairwise great-circle distances.

    Shapes:
        coords: [N, 2] (lat, lon) degrees -> [N, N] km.
    """
    lat, lon = np.radians(coords[:, 0])[:, None], np.radians(coords[:, 1])[:, None]
    a = (np.sin((lat - lat.T) / 2) ** 2
         + np.cos(lat) * np.cos(lat.T) * np.sin((lon - lon.T) / 2) ** 2)
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def knn_graph(coords: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Directed edges from each region to its ``k`` nearest regions, Gaussian weights.

    Shapes:
        coords: [N, 2] (lat, lon) -> edge_index [2, N*k'] int64, weights [N*k'] float32,
        with ``k' = min(k, N - 1)``.
    """
    if k < 1:
        raise CityDataError(f"k must be >= 1 for the kNN graph, got {k}.")
    n = coords.shape[0]
    kk = min(k, n - 1)
    dist = haversine_km(coords)
    np.fill_diagonal(dist, np.inf)
    nearest = np.argsort(dist, axis=1, kind="stable")[:, :kk]
    src = np.repeat(np.arange(n), kk)
    dst = nearest.reshape(-1)
    ei = np.stack([src, dst]).astype(np.int64)
    return ei, gaussian_kernel(dist[src, dst]), "knn"


def coalesce(
    edge_index: np.ndarray, weight: np.ndarray | None, num_nodes: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Drop self loops, optionally add reverse edges, merge duplicates (max weight), sort.

    Shapes:
        edge_index: [2, E] -> [2, E'] int64; weight: [E] -> [E'] float32 (or None).
    """
    src, dst = edge_index[0], edge_index[1]
    w = None if weight is None else np.asarray(weight, dtype=np.float32)
    if symmetric:
        src, dst = np.concatenate([src, dst]), np.concatenate([dst, src])
        w = None if w is None else np.concatenate([w, w])
    keep = src != dst
    key = src[keep].astype(np.int64) * num_nodes + dst[keep]
    uniq, inverse = np.unique(key, return_inverse=True)
    out = np.stack([uniq // num_nodes, uniq % num_nodes]).astype(np.int64)
    if w is None:
        return out, None
    merged = np.full(uniq.shape[0], -np.inf, dtype=np.float32)
    np.maximum.at(merged, inverse, w[keep])
    return out, merged
