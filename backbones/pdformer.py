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
from torch_geometric.utils import to_dense_adj

from stbat_backbones._common import check_graph_input
from stbat_plugin import hookimpl

logger = logging.getLogger(__name__)

def sinusoidal_positions(t: int, d: int, like: Tensor) -> Tensor:
    """Fixed sine/cosine positions ``[t, d]`` (no parameters, so any window length works)."""
    pos = torch.arange(t, dtype=like.dtype, device=like.device)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=like.dtype, device=like.device)
                     * (-math.log(10000.0) / d))
    out = torch.zeros(t, d, dtype=like.dtype, device=like.device)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return out


def neighbourhood_mask(edge_index: Tensor, n: int, hops: int = 1) -> Tensor:
    """``mask[i, j]`` is True when region j reaches region i in at most ``hops`` edges.

    Self loops are always included, so no row is empty. Edges run ``source -> target``.

    Shapes:
        edge_index: ``[2, E]`` -> ``[n, n]`` bool.
    """
    adj = to_dense_adj(edge_index, max_num_nodes=n)[0].T  # [target, source]
    step = ((adj > 0) | torch.eye(n, dtype=torch.bool, device=adj.device)).float()
    reach = step
    for _ in range(hops - 1):
        reach = (reach @ step).clamp(max=1.0)
    return reach > 0


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
    corr = unit @ unit.T  # constant profiles get correlation 0 with everyone
    corr.fill_diagonal_(-math.inf)
    kk = min(k, n - 1)
    source = corr.topk(kk, dim=1).indices  # [n, k']
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

    Shapes:
        h: ``[b, t, n, d]``, key_bias ``[b, t, n, geo_heads * head_dim]``, masks ``[n, n]``
        bool -> ``[b, t, n, d]``.
    """

    def __init__(self, d_model: int, heads: dict[str, int]):
        super().__init__()
        self.heads = {kind: h for kind, h in heads.items() if h > 0}
        self.head_dim = d_model // sum(heads.values())
        self.qkv = nn.ModuleDict({kind: nn.Linear(d_model, 3 * h * self.head_dim)
                                  for kind, h in self.heads.items()})
        self.proj = nn.Linear(sum(self.heads.values()) * self.head_dim, d_model)

    def forward(self, h: Tensor, key_bias: Tensor, geo_mask: Tensor, sem_mask: Tensor) -> Tensor:
        # h: [b, t, n, d]
        b, t, n, _ = h.shape
        outs = []
        for kind, heads in self.heads.items():
            axes = "(b n) h t e" if kind == "temporal" else "(b t) h n e"
            q, k, v = (einops.rearrange(part, f"b t n (h e) -> {axes}", h=heads)
                       for part in self.qkv[kind](h).chunk(3, dim=-1))
            if kind == "geo":
                k = k + einops.rearrange(key_bias, f"b t n (h e) -> {axes}", h=heads)
            mask = {"temporal": None, "geo": geo_mask, "sem": sem_mask}[kind]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            outs.append(einops.rearrange(out, f"{axes} -> b t n (h e)", b=b, t=t, n=n))
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

    def forward(self, h: Tensor, key_bias: Tensor, geo_mask: Tensor, sem_mask: Tensor) -> Tensor:
        h = h + self.drop(self.attn(self.norm1(h), key_bias, geo_mask, sem_mask))
        return h + self.drop(self.mlp(self.norm2(h)))


class PDFormer(nn.Module):
    r"""PDFormer-style feature extractor for graph cities.

    Paper: https://arxiv.org/abs/2301.07945 (Jiang et al., AAAI 2023), a baseline of STBaT.

    Spatial attention of the geographic heads is masked to the ``geo_hops``-hop
    neighbourhood, :math:`\mathrm{softmax}(QK^\top/\sqrt{e} + M)V` with :math:`M_{ij} = -\infty`
    outside it; semantic heads use the ``semantic_index`` from :meth:`prepare_city`. Without
    it (e.g. in ``check_backbone``, or a zero-shot city with no training flow) the semantic
    heads use the geographic mask. PDFormer's Laplacian-eigenvector and time-of-day
    embeddings are dropped: there are no per-node parameters, so one model runs on cities
    of any size; positions in the window are fixed sinusoids. Memory is
    :math:`O(b\,t\,n^2)`, fine for ``n`` up to about 1000.

    Args:
        in_channels: input channels ``c`` (default: ``1``).
        d_model: width of the transformer (default: ``64``).
        num_layers: encoder layers (default: ``2``).
        temporal_heads, geo_heads, sem_heads: heads of each kind (default: ``2``, ``4``, ``2``);
            ``d_model`` must divide by their sum.
        geo_hops: hops of the geographic neighbourhood (default: ``2``).
        semantic_k: semantic neighbours per region (default: ``8``).
        steps_per_day: steps in a day, for the daily profiles (default: ``24``, hourly).
        pattern_len, num_patterns: window and size of the pattern memory (default: ``3``, ``16``).
        mlp_ratio: MLP width over ``d_model`` (default: ``2``). dropout: (default: ``0.0``).
        feature_dim: size ``d`` of the features (default: ``64``).

    Shapes:
        x: ``[b, t, n, c]``, edge_index ``[2, E]``, semantic_index ``[2, E']`` -> ``[b, n, d]``.
    """

    layout = "graph"

    def __init__(self, in_channels: int = 1, d_model: int = 64, num_layers: int = 2,
                 temporal_heads: int = 2, geo_heads: int = 4, sem_heads: int = 2,
                 geo_hops: int = 2, semantic_k: int = 8, steps_per_day: int = 24,
                 pattern_len: int = 3, num_patterns: int = 16, mlp_ratio: int = 2,
                 dropout: float = 0.0, feature_dim: int = 64):
        super().__init__()
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
    def prepare_city(self, train_flow: Tensor, edge_index: Tensor | None = None,
                     edge_weight: Tensor | None = None) -> dict[str, Tensor]:
        """Semantic neighbours of a city from its scaled training slice ``[T, n, c]``.

        Returns ``{"semantic_index": [2, n * k]}``, or ``{}`` when ``T < 2`` or ``n < 2``
        (zero-shot): the semantic heads then use the geographic mask.
        """
        if train_flow.dim() != 3:
            raise ValueError(f"PDFormer.prepare_city: expected 'train_flow' of shape [T, n, c] "
                             f"(got {list(train_flow.shape)})")
        if train_flow.shape[0] < 2 or train_flow.shape[1] < 2:
            logger.info("PDFormer: training slice of shape %s is too short for semantic "
                        "neighbours; semantic heads use the geographic mask",
                        list(train_flow.shape))
            return {}
        return {"semantic_index": semantic_neighbours(train_flow, self.semantic_k,
                                                      self.steps_per_day)}

    def forward_features(self, x: Tensor, edge_index: Tensor | None = None,
                         edge_weight: Tensor | None = None, semantic_index: Tensor | None = None,
                         **_: Any) -> Tensor:
        # x: [b, t, n, c]
        edge_index = check_graph_input("PDFormer", x, edge_index)
        t, n = x.shape[1], x.shape[2]
        geo_mask = neighbourhood_mask(edge_index, n, self.geo_hops)
        sem_mask = geo_mask if semantic_index is None else \
            neighbourhood_mask(_check_semantic_index(semantic_index, n), n, 1)
        h = self.embed(x) + sinusoidal_positions(t, self.embed.out_features, x)[:, None]
        key_bias = self.memory(x)
        for layer in self.layers:
            h = layer(h, key_bias, geo_mask, sem_mask)
        h = self.norm(h)
        return self.out(torch.cat([h[:, -1], h.mean(dim=1)], dim=-1))

    def forward(self, x: Tensor, **graph: Any) -> Tensor:
        return self.forward_features(x, **graph)


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


@hookimpl
def stbat_register_backbones(register: Any) -> None:
    register("pdformer", PDFormer, layout="graph",
             description="PDFormer: temporal + geographic + semantic attention heads, "
                         "delay-aware pattern memory")
