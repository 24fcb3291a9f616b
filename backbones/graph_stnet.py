"""Graph ST-net: the ST-net recipe on a graph of zones, sensors or stops.

ST-net's residual conv blocks become residual graph-convolution blocks
(GCN on ``edge_index`` with torch-geometric's ``gcn_norm``), followed by the same
single-layer LSTM per region. No per-node parameters: it runs on any graph.
"""

from __future__ import annotations

from typing import Any

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn.conv.gcn_conv import gcn_norm

from stbat_backbones._common import FeatureBackbone, check_graph_input, graph_cache, register_hook


def gcn_operator(edge_index: Tensor, edge_weight: Tensor | None, n: int, dtype: torch.dtype
                 ) -> Tensor:
    r"""Sparse :math:`\hat A = D^{-1/2}(A + I)D^{-1/2}` ``[n, n]`` (Kipf & Welling), row = target.

    The normalisation is torch-geometric's ``gcn_norm``; propagating every sample
    and step with one sparse matmul is much faster on CPU than a batched scatter.
    """
    weight = None if edge_weight is None else edge_weight.to(dtype)
    ei, w = gcn_norm(edge_index, weight, n, add_self_loops=True, dtype=dtype)
    return torch.sparse_coo_tensor(ei.flip(0), w, (n, n), check_invariants=False).coalesce()


class GraphConv(nn.Module):
    """GCN layer ``Â X W + b`` applied to node-major ``[n, B, d]`` with one shared sparse ``Â``.

    Node-major, ``[n, B, d]`` is ``[n, (B d)]`` without a copy, which is what the sparse
    matmul propagates.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.lin = nn.Linear(in_channels, out_channels, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor, a_hat: Tensor) -> Tensor:
        # x: [n, B, d]
        h = self.lin(x)
        # the sparse aggregation in a_hat's dtype (float32 under bf16 autocast: sparse mm has
        # no mixed-dtype backward), back to the features' dtype
        flat = h.reshape(h.shape[0], -1)
        with torch.autocast(device_type=flat.device.type, enabled=False):
            h = torch.sparse.mm(a_hat, flat.to(a_hat.dtype)).to(flat.dtype)
        return h.view(x.shape[0], x.shape[1], -1) + self.bias


class ResidualGraphBlock(nn.Module):
    """``x + GCN(ReLU(GCN(x)))`` followed by ReLU; x ``[n, B, d]`` with a shared graph."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = GraphConv(channels, channels)
        self.conv2 = GraphConv(channels, channels)

    def forward(self, x: Tensor, a_hat: Tensor) -> Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(x, a_hat)), a_hat))


class GraphSTNet(FeatureBackbone):
    """Graph analogue of ST-net for non-grid cities.

    Args:
        in_channels: input channels ``c`` (default: ``1``).
        channels: graph-conv width (default: ``64``).
        num_blocks: residual graph blocks (default: ``3``).
        hidden: LSTM hidden size, the feature size ``d`` (default: ``128``).

    Shapes:
        x: ``[b, t, n, c]``, edge_index ``[2, E]``, edge_weight ``[E]`` -> ``[b, n, d]``.
    """

    layout = "graph"

    def __init__(self, in_channels: int = 1, channels: int = 64, num_blocks: int = 3,
                 hidden: int = 128):
        super().__init__()
        self.stem = nn.Linear(in_channels, channels)
        self.blocks = nn.ModuleList(ResidualGraphBlock(channels) for _ in range(num_blocks))
        self.lstm = nn.LSTM(channels, hidden, batch_first=True)
        self.feature_dim = hidden

    def forward_features(self, x: Tensor, edge_index: Tensor | None = None,
                         edge_weight: Tensor | None = None, **_: Any) -> Tensor:
        # x: [b, t, n, c]
        edge_index = check_graph_input("GraphSTNet", x, edge_index)
        b, t, n, _ = x.shape
        a_hat = graph_cache.get("gcn", edge_index, edge_weight, (n, x.dtype, x.device),
                                lambda: gcn_operator(edge_index, edge_weight, n, x.dtype))
        f = F.relu(self.stem(einops.rearrange(x, "b t n c -> n (b t) c")))
        for block in self.blocks:
            f = block(f, a_hat)
        seq = einops.rearrange(f, "n (b t) d -> (b n) t d", b=b, t=t)
        _, (h_n, _) = self.lstm(seq)
        return einops.rearrange(h_n[-1], "(b n) d -> b n d", b=b, n=n)


stbat_register_backbones = register_hook(
    "graph_stnet", GraphSTNet, "Graph ST-net: residual GCN blocks per step + LSTM per region")
