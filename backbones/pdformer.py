"""PDFormer-style spatio-temporal transformer (Jiang et al., AAAI 2023), city-size agnostic.

The attention heads of every layer are split three ways: temporal heads attend over the
window of each region; geographic heads attend over the regions within ``geo_hops`` hops
of the region graph; semantic heads attend over the regions whose daily flow profiles are
most correlated (found once per city by :meth:`PDFormer.prepare_city`, from the training
slice only). A small shared pattern memory stands in for the delay-aware feature
transformation and is added to the keys of the geographic heads.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from stbat_backbones._common import FeatureBackbone, check_graph_input, graph_cache, register_hook
from stbat_plugin.backbone import CityFacts

logger = logging.getLogger(__name__)

#: ``spatial_attention`` values of :class:`PDFormer`
SPATIAL_ATTENTION = ("auto", "dense", "sparse")
#: ``"auto"`` attends over edge lists when fewer than this share of the ``n^2`` pairs are
#: neighbours: on CPU a model step costs about 25 times more per gathered edge than per entry
#: of dense masked attention (``benchmarks/bench_pdformer.py``), and the mask is ``[n, n]``
SPARSE_BELOW_DENSITY = 1 / 32
#: rows of the correlation matrix per block in :func:`semantic_neighbours`
SEMANTIC_BLOCK = 2048
#: bytes of the gathered ``[E, rows, e]`` keys per block of the sparse attention (memory bound)
EDGE_BLOCK_BYTES = 1 << 27


def sinusoidal_positions(t: int, d: int, like: Tensor) -> Tensor:
    """Fixed sine/cosine positions ``[t, d]`` (no parameters, so any window length works)."""
    pos = torch.arange(t, dtype=like.dtype, device=like.device)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=like.dtype, device=like.device)
                     * (-math.log(10000.0) / d))
    out = torch.zeros(t, d, dtype=like.dtype, device=like.device)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return out


def neighbourhood_edges(edge_index: Tensor, n: int, hops: int = 1) -> Tensor:
    """Pairs ``(j, i)`` such that region j reaches region i in at most ``hops`` edges.

    Self loops are always included, so every region has a neighbour. Edges run
    ``source -> target``. Each hop joins the pairs found so far with the one-hop pairs
    (an index join, no ``[n, n]`` matrix): memory is O(paths), never O(n^2).

    Shapes:
        edge_index: ``[2, E]`` -> ``[2, E']`` int64 (source, target), sorted by target, then
        source, without duplicates.
    """
    if hops < 1:
        raise ValueError(f"PDFormer: expected hops >= 1 (got {hops})")
    loops = torch.arange(n, device=edge_index.device)
    key = torch.unique(torch.cat([edge_index[1] * n + edge_index[0], loops * n + loops]))
    step_target, step_source = key // n, key % n  # one hop, sorted by target
    count = torch.bincount(step_target, minlength=n)
    start = torch.cumsum(count, 0) - count
    reach = key
    for _ in range(hops - 1):  # (j -> m) in one hop and (m -> i) so far: (j -> i)
        middle, target = reach % n, reach // n
        fan = count[middle]
        offset = torch.arange(int(fan.sum()), device=key.device) - \
            torch.repeat_interleave(torch.cumsum(fan, 0) - fan, fan)
        source = step_source[torch.repeat_interleave(start[middle], fan) + offset]
        reach = torch.unique(torch.repeat_interleave(target, fan) * n + source)
    return torch.stack([reach % n, reach // n])


def neighbourhood_mask(edge_index: Tensor, n: int, hops: int = 1) -> Tensor:
    """``mask[i, j]`` is True when region j reaches region i in at most ``hops`` edges.

    The dense form of :func:`neighbourhood_edges` (self loops included, so no row is empty).

    Shapes:
        edge_index: ``[2, E]`` -> ``[n, n]`` bool.
    """
    source, target = neighbourhood_edges(edge_index, n, hops)
    mask = torch.zeros(n, n, dtype=torch.bool, device=edge_index.device)
    mask[target, source] = True
    return mask


class Neighbourhood:
    """Whom each region attends to: the pairs ``(source, target)`` and, for dense attention,
    the ``[n, n]`` mask (None for attention over the edge list).

    Args:
        edges: ``[2, E]`` from :func:`neighbourhood_edges`. n: regions.
        mode: ``"dense"``, ``"sparse"``, or ``"auto"`` (sparse when fewer than
            :data:`SPARSE_BELOW_DENSITY` of the ``n^2`` pairs are neighbours).
    """

    def __init__(self, edges: Tensor, n: int, mode: str = "auto"):
        if mode not in SPATIAL_ATTENTION:
            raise ValueError(f"PDFormer: expected spatial_attention in {list(SPATIAL_ATTENTION)} "
                             f"(got {mode!r})")
        self.edges, self.n = edges, n
        sparse = mode == "sparse" or (mode == "auto" and edges.shape[1] < SPARSE_BELOW_DENSITY * n * n)
        self.mask: Tensor | None = None
        if not sparse:
            self.mask = torch.zeros(n, n, dtype=torch.bool, device=edges.device)
            self.mask[edges[1], edges[0]] = True


def edge_attention(q: Tensor, k: Tensor, v: Tensor, edges: Tensor) -> Tensor:
    r"""Attention of each region over its neighbours only, on node-major tensors.

    .. math::
        o_i = \sum_{j \in N(i)} \mathrm{softmax}_{j \in N(i)}\Big(\frac{q_i \cdot k_j}{\sqrt e}\Big) v_j

    the same as ``scaled_dot_product_attention`` with the mask of :func:`neighbourhood_mask`,
    with O(E) instead of O(n^2) work and memory per row. Every region must have a neighbour
    (the self loops of :func:`neighbourhood_edges`).

    Shapes:
        q, k, v: ``[n, M, e]`` (``M`` = batch x steps x heads); edges: ``[2, E]`` (source,
        target) -> ``[n, M, e]``.
    """
    source, target = edges
    n, m = q.shape[0], q.shape[1]
    scores = (q.index_select(0, target) * k.index_select(0, source)).sum(-1) * q.shape[-1] ** -0.5
    peak = scores.new_full((n, m), -math.inf).scatter_reduce_(
        0, target[:, None].expand(-1, m), scores.detach(), "amax")
    weight = (scores - peak.index_select(0, target)).exp()  # [E, M]
    total = torch.zeros_like(peak).index_add(0, target, weight)
    alpha = weight / total.index_select(0, target)
    return torch.zeros_like(v).index_add(0, target, alpha.unsqueeze(-1) * v.index_select(0, source))


def blocked_edge_attention(q: Tensor, k: Tensor, v: Tensor, edges: Tensor) -> Tensor:
    """:func:`edge_attention` over blocks of the ``M`` axis, each gathering at most
    :data:`EDGE_BLOCK_BYTES`; with gradients, each block is recomputed in the backward pass
    (activation checkpointing), so the ``[E, M, e]`` gathers of all blocks never coexist.

    Shapes:
        as :func:`edge_attention`.
    """
    m = q.shape[1]
    per_row = 4 * edges.shape[1] * q.shape[2] * q.element_size()  # gathered q, k, v, product
    rows = max(1, EDGE_BLOCK_BYTES // max(per_row, 1))
    if rows >= m:
        return edge_attention(q, k, v, edges)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    outs = []
    for start in range(0, m, rows):
        part = (q[:, start:start + rows], k[:, start:start + rows], v[:, start:start + rows])
        outs.append(checkpoint(edge_attention, *part, edges, use_reentrant=False) if grad
                    else edge_attention(*part, edges))
    return torch.cat(outs, dim=1)


def semantic_neighbours(train_flow: Tensor, k: int, steps_per_day: int) -> Tensor:
    """Top-``k`` regions by Pearson correlation of mean daily profiles (self excluded).

    Shapes:
        train_flow: ``[T, n, c]`` with ``T >= 2`` -> semantic_index ``[2, n * k']``
        (source = similar region, target = region), ``k' = min(k, n - 1)``.
    """
    t, n, _ = train_flow.shape
    flow = train_flow.detach().double()
    if t >= steps_per_day:
        days = t // steps_per_day
        flow = einops.reduce(flow[: days * steps_per_day], "(d s) n c -> s n c", "mean",
                             s=steps_per_day)
    profile = einops.rearrange(flow, "s n c -> n (s c)")
    profile = profile - profile.mean(dim=1, keepdim=True)
    unit = profile / profile.norm(dim=1, keepdim=True).clamp_min(1e-12)
    kk = min(k, n - 1)
    blocks = []
    for start in range(0, n, SEMANTIC_BLOCK):  # [block, n] at a time, never [n, n] for large n
        corr = unit[start:start + SEMANTIC_BLOCK] @ unit.T  # constant profiles: 0 with everyone
        rows = torch.arange(corr.shape[0], device=corr.device)
        corr[rows, rows + start] = -math.inf
        blocks.append(corr.topk(kk, dim=1).indices)
    source = torch.cat(blocks)  # [n, k']
    target = torch.arange(n, device=flow.device).repeat_interleave(kk)
    return torch.stack([source.reshape(-1), target]).to(train_flow.device)


class PatternMemory(nn.Module):
    """Delay-aware pattern memory (simplified from PDFormer's delay-aware transformation).

    Each region's last ``pattern_len`` raw steps query ``num_patterns`` learnable pattern
    keys shared by all regions; the softmax-weighted pattern values are returned, to be
    added to the geographic keys. PDFormer clusters history windows with k-Shape into
    fixed pattern keys; here the keys are learned end to end instead.

    Shapes:
        x: ``[b, t, n, c]`` -> ``[b, t, n, out_dim]``.
    """

    def __init__(self, in_channels: int, out_dim: int, pattern_len: int = 3,
                 num_patterns: int = 16, key_dim: int = 16):
        super().__init__()
        self.pattern_len = pattern_len
        self.query = nn.Linear(pattern_len * in_channels, key_dim)
        self.keys = nn.Parameter(torch.randn(num_patterns, key_dim) / math.sqrt(key_dim))
        self.values = nn.Parameter(torch.randn(num_patterns, out_dim) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        # x: [b, t, n, c]
        seq = F.pad(einops.rearrange(x, "b t n c -> b n c t"), (self.pattern_len - 1, 0))
        recent = einops.rearrange(seq.unfold(-1, self.pattern_len, 1), "b n c t s -> b t n (s c)")
        scores = self.query(recent) @ self.keys.T / math.sqrt(self.keys.shape[1])
        return scores.softmax(dim=-1) @ self.values


class PDAttention(nn.Module):
    """Temporal, geographic and semantic self-attention heads, concatenated and projected.

    Spatial heads attend with the dense mask of their :class:`Neighbourhood`, or over its
    edge list (:func:`blocked_edge_attention`) when it has none.

    Shapes:
        h: ``[b, t, n, d]``, key_bias ``[b, t, n, geo_heads * head_dim]`` -> ``[b, t, n, d]``.
    """

    def __init__(self, d_model: int, heads: dict[str, int]):
        super().__init__()
        self.heads = {kind: h for kind, h in heads.items() if h > 0}
        self.head_dim = d_model // sum(heads.values())
        self.qkv = nn.ModuleDict({kind: nn.Linear(d_model, 3 * h * self.head_dim)
                                  for kind, h in self.heads.items()})
        self.proj = nn.Linear(sum(self.heads.values()) * self.head_dim, d_model)

    def forward(self, h: Tensor, key_bias: Tensor, geo: Neighbourhood, sem: Neighbourhood
                ) -> Tensor:
        # h: [b, t, n, d]
        b, t, n, _ = h.shape
        outs = []
        for kind, heads in self.heads.items():
            hood = {"temporal": None, "geo": geo, "sem": sem}[kind]
            sparse = hood is not None and hood.mask is None
            axes = "(b n) h t e" if kind == "temporal" else "n (b t h) e" if sparse else \
                "(b t) h n e"
            q, k, v = (einops.rearrange(part, f"b t n (h e) -> {axes}", h=heads)
                       for part in self.qkv[kind](h).chunk(3, dim=-1))
            if kind == "geo":
                k = k + einops.rearrange(key_bias, f"b t n (h e) -> {axes}", h=heads)
            if sparse:
                out = blocked_edge_attention(q, k, v, hood.edges)
            else:
                out = F.scaled_dot_product_attention(q, k, v,
                                                     attn_mask=None if hood is None else hood.mask)
            outs.append(einops.rearrange(out, f"{axes} -> b t n (h e)", b=b, t=t, n=n, h=heads))
        return self.proj(torch.cat(outs, dim=-1))


class PDLayer(nn.Module):
    """Pre-norm transformer layer: ``h + PDAttention(LN(h))``, then ``h + MLP(LN(h))``."""

    def __init__(self, d_model: int, heads: dict[str, int], mlp_ratio: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = PDAttention(d_model, heads)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(mlp_ratio * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, key_bias: Tensor, geo: Neighbourhood, sem: Neighbourhood
                ) -> Tensor:
        h = h + self.drop(self.attn(self.norm1(h), key_bias, geo, sem))
        return h + self.drop(self.mlp(self.norm2(h)))


class PDFormer(FeatureBackbone):
    r"""PDFormer-style feature extractor for graph cities.

    Paper: https://arxiv.org/abs/2301.07945 (Jiang et al., AAAI 2023), a baseline of STBaT.

    Spatial attention of the geographic heads is masked to the ``geo_hops``-hop
    neighbourhood, :math:`\mathrm{softmax}(QK^\top/\sqrt{e} + M)V` with :math:`M_{ij} = -\infty`
    outside it; semantic heads use the ``semantic_index`` from :meth:`prepare_city`. Without
    it (e.g. in ``check_backbone``, or a zero-shot city with no training flow) the semantic
    heads use the geographic mask. PDFormer's Laplacian-eigenvector and time-of-day
    embeddings are dropped: there are no per-node parameters, so one model runs on cities
    of any size; positions in the window are fixed sinusoids. Spatial heads attend either
    with a dense ``[n, n]`` mask or over the neighbour pairs only (:func:`edge_attention`,
    O(pairs) work and memory, so cities of many thousand regions fit); both give the same
    values.

    Args:
        in_channels: input channels ``c`` (default: ``1``).
        d_model: width of the transformer (default: ``64``).
        num_layers: encoder layers (default: ``2``).
        temporal_heads, geo_heads, sem_heads: heads of each kind (default: ``2``, ``4``, ``2``);
            ``d_model`` must divide by their sum.
        geo_hops: hops of the geographic neighbourhood (default: ``2``).
        semantic_k: semantic neighbours per region (default: ``8``).
        steps_per_day: steps in a day, for the daily profiles (default: ``None``: the city's,
            :attr:`~stbat_plugin.backbone.CityFacts.steps_per_day`, e.g. 48 for 30-minute data).
        pattern_len, num_patterns: window and size of the pattern memory (default: ``3``, ``16``).
        mlp_ratio: MLP width over ``d_model`` (default: ``2``). dropout: (default: ``0.0``).
        feature_dim: size ``d`` of the features (default: ``64``).
        spatial_attention: ``"dense"`` (masked ``[n, n]`` attention), ``"sparse"`` (over the
            neighbour pairs) or ``"auto"``: sparse when fewer than
            :data:`SPARSE_BELOW_DENSITY` of all pairs are neighbours (default: ``"auto"``).

    Shapes:
        x: ``[b, t, n, c]``, edge_index ``[2, E]``, semantic_index ``[2, E']`` -> ``[b, n, d]``.
    """

    layout = "graph"

    def __init__(self, in_channels: int = 1, d_model: int = 64, num_layers: int = 2,
                 temporal_heads: int = 2, geo_heads: int = 4, sem_heads: int = 2,
                 geo_hops: int = 2, semantic_k: int = 8, steps_per_day: int | None = None,
                 pattern_len: int = 3, num_patterns: int = 16, mlp_ratio: int = 2,
                 dropout: float = 0.0, feature_dim: int = 64, spatial_attention: str = "auto"):
        super().__init__()
        if spatial_attention not in SPATIAL_ATTENTION:
            raise ValueError(f"PDFormer: expected spatial_attention in {list(SPATIAL_ATTENTION)} "
                             f"(got {spatial_attention!r})")
        self.spatial_attention = spatial_attention
        heads = {"temporal": temporal_heads, "geo": geo_heads, "sem": sem_heads}
        if min(heads.values()) < 0 or geo_heads < 1 or d_model % sum(heads.values()):
            raise ValueError(
                f"PDFormer: expected geo_heads >= 1, other heads >= 0 and d_model divisible by "
                f"the number of heads (got d_model={d_model}, heads={heads}); e.g. d_model=64 "
                "with heads 2/4/2"
            )
        self.geo_hops, self.semantic_k, self.steps_per_day = geo_hops, semantic_k, steps_per_day
        self.embed = nn.Linear(in_channels, d_model)
        self.memory = PatternMemory(in_channels, geo_heads * (d_model // sum(heads.values())),
                                    pattern_len, num_patterns)
        self.layers = nn.ModuleList(PDLayer(d_model, heads, mlp_ratio, dropout)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(2 * d_model, feature_dim)
        self.feature_dim = feature_dim

    @torch.no_grad()
    def prepare_city(self, city: CityFacts) -> dict[str, Tensor]:
        """Semantic neighbours of a city from its scaled training slice ``[T, n, c]``, with
        daily profiles of ``city.steps_per_day`` steps (or the ``steps_per_day`` given).

        Returns ``{"semantic_index": [2, n * k]}``, or ``{}`` when ``T < 2`` or ``n < 2``
        (zero-shot): the semantic heads then use the geographic mask.
        """
        if not isinstance(city, CityFacts):
            raise TypeError(f"PDFormer.prepare_city: expected a CityFacts (got "
                            f"{type(city).__name__}); build one with "
                            "CityFacts(num_regions=n, steps_per_day=24, train_flow=flow[:train])")
        train_flow = city.train_flow
        if train_flow.shape[0] < 2 or train_flow.shape[1] < 2:
            logger.info("PDFormer: training slice of shape %s is too short for semantic "
                        "neighbours; semantic heads use the geographic mask",
                        list(train_flow.shape))
            return {}
        steps = self.steps_per_day if self.steps_per_day is not None else city.steps_per_day
        return {"semantic_index": semantic_neighbours(train_flow, self.semantic_k, steps)}

    def forward_features(self, x: Tensor, edge_index: Tensor | None = None,
                         edge_weight: Tensor | None = None, semantic_index: Tensor | None = None,
                         **_: Any) -> Tensor:
        # x: [b, t, n, c]
        edge_index = check_graph_input("PDFormer", x, edge_index)
        t, n = x.shape[1], x.shape[2]
        geo = self._neighbourhood(edge_index, n, self.geo_hops)
        sem = geo if semantic_index is None else \
            self._neighbourhood(_check_semantic_index(semantic_index, n), n, 1)
        h = self.embed(x) + sinusoidal_positions(t, self.embed.out_features, x)[:, None]
        key_bias = self.memory(x)
        for layer in self.layers:
            h = layer(h, key_bias, geo, sem)
        h = self.norm(h)
        return self.out(torch.cat([h[:, -1], h.mean(dim=1)], dim=-1))

    def _neighbourhood(self, edge_index: Tensor, n: int, hops: int) -> Neighbourhood:
        """The ``hops``-hop :class:`Neighbourhood`, built once per graph (``graph_cache``)."""
        return graph_cache.get(
            "pdformer", edge_index, None, (n, hops, self.spatial_attention),
            lambda: Neighbourhood(neighbourhood_edges(edge_index, n, hops), n,
                                  self.spatial_attention))


def _check_semantic_index(semantic_index: Tensor, n: int) -> Tensor:
    shape = list(semantic_index.shape)
    if semantic_index.dim() != 2 or shape[0] != 2 or semantic_index.dtype != torch.long:
        raise ValueError(f"PDFormer: expected int64 'semantic_index' of shape [2, E] (got "
                         f"{semantic_index.dtype} {shape}); make it with prepare_city")
    if semantic_index.numel() and int(semantic_index.max()) >= n:
        raise ValueError(f"PDFormer: 'semantic_index' refers to region "
                         f"{int(semantic_index.max())} but x has n={n}: was prepare_city run "
                         "on this city's training flow?")
    return semantic_index


stbat_register_backbones = register_hook(
    "pdformer", PDFormer, "PDFormer: temporal + geographic + semantic attention heads, "
    "delay-aware pattern memory")
