"""stbat-plugin-gru: a GRU per region as an stbat backbone, shipped as its own distribution.

Installing this package is all it takes: its entry point ``gru = "stbat_gru"`` in the group
``stbat`` makes ``create_backbone("gru")`` work (see ``README.md``).
"""

from __future__ import annotations

from typing import Any

import einops
from torch import Tensor, nn

from stbat_plugin import hookimpl

__version__ = "0.1.0"


class RegionGRU(nn.Module):
    """One GRU shared by every region, run over each region's window on its own.

    No graph operation and no per-region parameter, so it runs on any city and is
    node-permutation equivariant; ``edge_index`` is accepted and ignored.

    Args:
        in_channels: input channels ``c`` (default: ``1``).
        hidden: GRU hidden size, the feature size ``d`` (default: ``64``).
        num_layers: stacked GRU layers (default: ``1``).

    Shapes:
        x: ``[b, t, n, c]`` -> ``[b, n, d]``.
    """

    layout = "graph"

    def __init__(self, in_channels: int = 1, hidden: int = 64, num_layers: int = 1):
        super().__init__()
        self.gru = nn.GRU(in_channels, hidden, num_layers=num_layers, batch_first=True)
        self.feature_dim = hidden

    def forward_features(self, x: Tensor, **_: Any) -> Tensor:
        # x: [b, t, n, c]
        if x.dim() != 4:
            raise ValueError(f"RegionGRU: expected 'x' of shape [b, t, n, c] (got {list(x.shape)})")
        _, h_n = self.gru(einops.rearrange(x, "b t n c -> (b n) t c"))
        return einops.rearrange(h_n[-1], "(b n) d -> b n d", b=x.shape[0])

    def forward(self, x: Tensor, **graph: Any) -> Tensor:
        return self.forward_features(x, **graph)


@hookimpl
def stbat_register_backbones(register: Any) -> None:
    register("gru", RegionGRU, layout="graph", description="A GRU per region (no graph ops)")
