"""Graph ST-net: the ST-net recipe on a graph of zones, sensors or stops.

ST-net's residual conv blocks become residual graph-convolution blocks
(``torch_geometric.nn.GCNConv`` on ``edge_index``), followed by the same
single-layer LSTM per region. No per-node parameters: it runs on any graph.
"""

from __future__ import annotations

from typing import Any

import einops
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GCNConv

from stbat_backbones._common import check_graph_input
from stbat_plugin import hookimpl


class ResidualGraphBlock(nn.Module):
    """``x + GCN(ReLU(GCN(x)))`` followed by ReLU; x ``[B, n, d]`` with a shared graph."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = GCNConv(channels, channels)
        self.conv2 = GCNConv(channels, channels)

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        h = F.relu(self.conv1(x, edge_index, edge_weight))
        return F.relu(x + self.conv2(h, edge_index, edge_weight))


class GraphSTNet(nn.Module):
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
        f = F.relu(self.stem(einops.rearrange(x, "b t n c -> (b t) n c")))
        for block in self.blocks:
            f = block(f, edge_index, edge_weight)
        seq = einops.rearrange(f, "(b t) n d -> (b n) t d", b=b, t=t)
        _, (h_n, _) = self.lstm(seq)
        return einops.rearrange(h_n[-1], "(b n) d -> b n d", b=b, n=n)

    def forward(self, x: Tensor, **graph: Any) -> Tensor:
        return self.forward_features(x, **graph)


@hookimpl
def stbat_register_backbones(register: Any) -> None:
    register("graph_stnet", GraphSTNet, layout="graph",
             description="Graph ST-net: residual GCN blocks per step + LSTM per region")
