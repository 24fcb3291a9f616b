"""A plugin file that makes models nobody here wrote available to ``stbat transfer``.

``MyNet`` is the README's model, as written (``forward(x)``: it gets no graph arguments).
The factories wrap each model with ``TapFeatures``, the same keywords as ``BalancedTransfer``;
the pipeline calls them with ``in_channels`` and the ``--backbone-kwargs``. Use it as::

    stbat transfer --plugin examples/plugin_wrapped_models.py --backbone readme_mynet ...
"""

from __future__ import annotations

import torch
from torch import nn

from stbat_plugin import TapFeatures, hookimpl


class MyNet(nn.Module):                        # somebody else's model: its code is not edited
    def __init__(self, window=6, d=32):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(window, d), nn.ReLU(), nn.Linear(d, d))
        self.out = nn.Linear(d, 1)
    def forward(self, x):                      # x: [b, t, n, 1]
        h = self.encoder(x[..., 0].transpose(1, 2))   # [b, n, d]: one vector per region
        return self.out(h).unsqueeze(1)        # [b, 1, n, 1]


def readme_mynet(in_channels: int = 1, window: int = 24, d: int = 32) -> TapFeatures:
    """The README's ``MyNet`` for ``window`` steps (it reads channel 0 only)."""
    return TapFeatures(MyNet(window=window, d=d), "encoder", feature_dim=d)


class NodeEmbeddingNet(nn.Module):
    """A model with one learned embedding per region of the city it was built for: it
    cannot run on a city with another number of regions, and pre-flight says so."""

    def __init__(self, num_nodes: int = 69, window: int = 24, d: int = 16):
        super().__init__()
        self.node_embedding = nn.Parameter(0.1 * torch.randn(num_nodes, d))
        self.encoder = nn.Linear(window, d)

    def forward(self, x):  # [b, t, n, 1] -> [b, n, d]
        return self.encoder(x[..., 0].transpose(1, 2)) + self.node_embedding


@hookimpl
def stbat_register_backbones(register):
    register("readme_mynet", readme_mynet, description="the README's MyNet, tap='encoder'")
    register("node_embedding_net",
             lambda in_channels=1, **kw: TapFeatures(NodeEmbeddingNet(**kw), "", feature_dim=16),
             description="per-node embeddings (refused by pre-flight on another n)")
