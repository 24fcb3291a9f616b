"""Graph WaveNet-style backbone (Wu et al., IJCAI 2019), without node embeddings.

Each layer runs a gated dilated causal temporal convolution, then a diffusion graph
convolution over the forward and backward transition matrices of the region graph (and,
optionally, an adjacency computed from the input), with residual and skip connections.
"""

from __future__ import annotations

from typing import Any

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.utils import to_dense_adj

from stbat_backbones._common import FeatureBackbone, check_graph_input, graph_cache, register_hook
from stbat_backbones._temporal import CausalConv


def transition_matrices(edge_index: Tensor, edge_weight: Tensor | None, n: int,
                        dtype: torch.dtype = torch.float32) -> list[Tensor]:
    r"""Forward and backward random-walk matrices as receivers: ``out = R @ x``.

    With :math:`A_{ij}` the weight of edge :math:`i \to j`, :math:`R_{fwd} = (D_{out}^{-1}A)^\top`
    and :math:`R_{bwd} = (D_{in}^{-1}A^\top)^\top`; nodes without edges get a zero row.

    Shapes:
        edge_index: ``[2, E]``, edge_weight: ``[E]`` -> two ``[n, n]``.
    """
    adj = to_dense_adj(edge_index, edge_attr=edge_weight, max_num_nodes=n)[0].to(dtype)

    def row_normalised(a: Tensor) -> Tensor:
        return a / a.sum(dim=1, keepdim=True).clamp_min(1e-12)

    return [row_normalised(adj).T, row_normalised(adj.T).T]


class DiffusionConv(nn.Module):
    r"""Diffusion graph convolution :math:`\sum_k \sum_s R_s^k H W_{s,k}` (``k = 0..order``).

    Supports are ``[n, n]`` (shared) or ``[b, n, n]`` (per sample, e.g. adaptive).

    Shapes:
        h: ``[b, t, n, d_in]`` -> ``[b, t, n, d_out]``.
    """

    def __init__(self, in_channels: int, out_channels: int, num_supports: int, order: int = 2):
        super().__init__()
        self.order = order
        self.lin = nn.Linear((1 + num_supports * order) * in_channels, out_channels)

    def forward(self, h: Tensor, supports: list[Tensor]) -> Tensor:
        # h: [b, t, n, d]
        outs = [h]
        for support in supports:
            pattern = "n m, b t m d -> b t n d" if support.dim() == 2 else \
                "b n m, b t m d -> b t n d"
            hk = h
            for _ in range(self.order):
                hk = einops.einsum(support, hk, pattern)
                outs.append(hk)
        return self.lin(torch.cat(outs, dim=-1))


class FeatureAdjacency(nn.Module):
    r"""Adaptive adjacency from input features instead of learned node embeddings.

    Graph WaveNet learns :math:`\mathrm{softmax}(\mathrm{ReLU}(E_1 E_2^\top))` with one
    embedding per node, which ties the model to one city. Here :math:`E_1, E_2` are linear
    maps of each region's embedded window (its last step and mean), so the matrix is
    recomputed for every sample and every city. The ReLU is dropped: with features from a
    few input channels all scores can start negative, which would leave the matrix uniform
    and its maps without gradient.

    Shapes:
        h: ``[b, t, n, d]`` -> ``[b, n, n]``, :math:`\mathrm{softmax}(E_1 E_2^\top)` by row.
    """

    def __init__(self, channels: int, embed_dim: int = 10):
        super().__init__()
        self.source = nn.Linear(2 * channels, embed_dim)
        self.target = nn.Linear(2 * channels, embed_dim)

    def forward(self, h: Tensor) -> Tensor:
        # h: [b, t, n, d]
        summary = torch.cat([h[:, -1], h.mean(dim=1)], dim=-1)
        scores = einops.einsum(self.target(summary), self.source(summary), "b n e, b m e -> b n m")
        return scores.softmax(dim=-1)


class GWLayer(nn.Module):
    """Gated dilated causal conv -> diffusion conv -> residual -> LayerNorm; returns skip too.

    Shapes:
        h: ``[b, t, n, r]`` -> ``([b, t, n, r], skip [b, n, s])``.
    """

    def __init__(self, channels: int, skip_channels: int, dilation: int, kernel_size: int,
                 num_supports: int, order: int, dropout: float):
        super().__init__()
        self.conv = CausalConv(channels, 2 * channels, kernel_size, dilation)  # filter | gate
        self.gconv = DiffusionConv(channels, channels, num_supports, order)
        self.norm = nn.LayerNorm(channels)
        self.skip = nn.Linear(channels, skip_channels)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, supports: list[Tensor]) -> tuple[Tensor, Tensor]:
        # h: [b, t, n, r]
        filt, gate = self.conv(h).chunk(2, dim=-1)
        u = torch.tanh(filt) * torch.sigmoid(gate)
        out = self.norm(h + self.drop(self.gconv(u, supports)))
        return out, self.skip(out[:, -1])


class GraphWaveNet(FeatureBackbone):
    """Graph WaveNet-style feature extractor for graph cities.

    Paper: https://arxiv.org/abs/1906.00121 (Wu et al., IJCAI 2019).

    Differences from the original, so that one model runs on cities of any size: the
    adaptive adjacency comes from the input (:class:`FeatureAdjacency`) rather than from
    learned node embeddings (``adaptive=False`` drops it); temporal convolutions are
    left-padded (causal) so short windows such as 6 steps are never consumed; LayerNorm over
    channels replaces BatchNorm; each layer's skip is taken after its graph convolution, so
    every layer's graph convolution reaches the output.

    Args:
        in_channels: input channels ``c`` (default: ``1``).
        channels: residual and dilation channels (default: ``32``).
        skip_channels: skip channels (default: ``64``).
        dilations: one layer per dilation (default: ``(1, 2, 1, 2)``, receptive field 7).
        kernel_size: temporal kernel (default: ``2``).
        order: diffusion steps per support (default: ``2``).
        adaptive: add the input-computed adjacency as a third support (default: ``True``).
        dropout: (default: ``0.0``). feature_dim: size ``d`` of the features (default: ``128``).

    Shapes:
        x: ``[b, t, n, c]``, edge_index ``[2, E]``, edge_weight ``[E]`` -> ``[b, n, d]``.
    """

    layout = "graph"

    def __init__(self, in_channels: int = 1, channels: int = 32, skip_channels: int = 64,
                 dilations: tuple[int, ...] = (1, 2, 1, 2), kernel_size: int = 2, order: int = 2,
                 adaptive: bool = True, dropout: float = 0.0, feature_dim: int = 128):
        super().__init__()
        if not dilations or min(dilations) < 1 or kernel_size < 1:
            raise ValueError(f"GraphWaveNet: expected dilations >= 1 and kernel_size >= 1 (got "
                             f"dilations={dilations}, kernel_size={kernel_size})")
        self.start = nn.Linear(in_channels, channels)
        self.adaptive = FeatureAdjacency(channels) if adaptive else None
        num_supports = 3 if adaptive else 2
        self.layers = nn.ModuleList(
            GWLayer(channels, skip_channels, d, kernel_size, num_supports, order, dropout)
            for d in dilations
        )
        self.end = nn.Linear(skip_channels, feature_dim)
        self.feature_dim = feature_dim

    def forward_features(self, x: Tensor, edge_index: Tensor | None = None,
                         edge_weight: Tensor | None = None, **_: Any) -> Tensor:
        # x: [b, t, n, c]
        edge_index = check_graph_input("GraphWaveNet", x, edge_index)
        h = self.start(x)
        n = x.shape[2]
        supports = list(graph_cache.get(
            "gwnet", edge_index, edge_weight, (n, h.dtype, h.device),
            lambda: transition_matrices(edge_index, edge_weight, n, h.dtype)))
        if self.adaptive is not None:
            supports.append(self.adaptive(h))
        skip = 0.0
        for layer in self.layers:
            h, s = layer(h, supports)
            skip = skip + s
        return F.relu(self.end(F.relu(skip)))


stbat_register_backbones = register_hook(
    "gwnet", GraphWaveNet, "Graph WaveNet: gated dilated causal TCN + diffusion GCN, "
    "input-computed adaptive adjacency")
