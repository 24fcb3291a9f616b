"""PyTorch Geometric's GCN and GAT inside user-style models, wrapped with keywords only.

``GCNGRU`` runs PyG's ``GCN`` once per time step: tapping ``gcn`` would be an error (it is
called t times), so the tap is the INPUT of the readout. ``GATGRU`` folds batch and time
into one PyG graph: the tap is the GRU's ``h_n`` (tuple element 1), unflattened by einops.
Run ``python examples/wrap_pyg_models.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange
from torch import nn
from torch_geometric.nn.models import GAT, GCN

from stbat_plugin import BalancedTransfer
from stbat_plugin.data import build_graph, load_city
from stbat_plugin.testing import smoke_train

DATA = Path(__file__).resolve().parents[1] / "data" / "tiny"


class GCNGRU(nn.Module):  # --- user code around PyG layers, as written
    def __init__(self, in_channels: int = 1, hidden: int = 32):
        super().__init__()
        self.gcn, self.gru = GCN(in_channels, hidden, num_layers=2), nn.GRU(hidden, hidden)
        self.readout = nn.Linear(hidden, 1)

    def forward(self, x, edge_index, edge_weight=None):  # [b, t, n, c] -> [b, 1, n, 1]
        h = torch.stack([self.gcn(x[:, i], edge_index, edge_weight) for i in range(x.shape[1])])
        out, _ = self.gru(rearrange(h, "t b n d -> t (b n) d"))
        return self.readout(rearrange(out[-1], "(b n) d -> b n d", b=x.shape[0])).unsqueeze(1)


class GATGRU(nn.Module):
    def __init__(self, in_channels: int = 1, hidden: int = 32):
        super().__init__()
        self.gat, self.gru = GAT(in_channels, hidden, num_layers=2, heads=2), nn.GRU(hidden, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x, edge_index):  # one PyG graph of b * t copies of the city
        b, t, n, _ = x.shape
        edges = torch.cat([edge_index + k * n for k in range(b * t)], dim=1)
        h = self.gat(rearrange(x, "b t n c -> (b t n) c"), edges)
        _, h_n = self.gru(rearrange(h, "(b t n) d -> t (b n) d", b=b, t=t))
        return self.head(rearrange(h_n[-1], "(b n) d -> b 1 n d", b=b))


def wrapped() -> dict[str, tuple[nn.Module, dict]]:
    """Each model and ALL the glue it needs: BalancedTransfer keyword arguments."""
    return {
        "pyg_gcn_gru": (GCNGRU(), dict(tap="readout", tap_input=True, feature_dim=32)),
        "pyg_gat_gru": (GATGRU(), dict(tap="gru", tap_select=1, feature_dim=32,
                                       tap_rearrange="1 (b n) d -> b n d")),
    }


def main(root: str | Path = DATA, steps: int = 2) -> dict[str, list[float]]:
    city = load_city(root, "nyc_taxi")
    flow = torch.from_numpy(city.flow[..., :1]) / float(city.flow[: 14 * 24, :, 0].max())
    graph = {"edge_index": build_graph(city).edge_index}
    totals: dict[str, list[float]] = {}
    for name, (model, glue) in wrapped().items():
        stbat = BalancedTransfer(model, **glue, region_features=torch.from_numpy(city.poi))
        totals[name] = smoke_train(stbat, flow, steps=steps, **graph)
        print(f"{name}: totals {[round(v, 4) for v in totals[name]]}")
    return totals


if __name__ == "__main__":
    main()
