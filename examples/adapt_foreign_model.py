"""STBaT around a third-party model with no ``forward_features``, its code untouched.

``tap="encoder"`` captures the encoder's channel-first ``[b, d, n]`` output with a forward
hook; ``tap_rearrange`` makes it ``[b, n, d]``. Run ``python examples/adapt_foreign_model.py``.
"""

from __future__ import annotations

from pathlib import Path

import einops
import torch
from torch import nn

from stbat_plugin import BalancedTransfer
from stbat_plugin.data import load_city

DATA = Path(__file__).resolve().parents[1] / "data" / "tiny"


class RegionGRU(nn.Module):  # --- third-party code, as published
    def __init__(self, in_channels: int, hidden: int):
        super().__init__()
        self.gru = nn.GRU(in_channels, hidden, batch_first=True)

    def forward(self, x):  # [b, t, n, c] -> [b, hidden, n]
        _, h = self.gru(einops.rearrange(x, "b t n c -> (b n) t c"))
        return einops.rearrange(h[-1], "(b n) d -> b d n", b=x.shape[0])


class TheirForecaster(nn.Module):
    def __init__(self, in_channels: int = 2, hidden: int = 32):
        super().__init__()
        self.encoder = RegionGRU(in_channels, hidden)
        self.head = nn.Conv1d(hidden, in_channels, 1)

    def forward(self, x):  # [b, t, n, c] -> [b, 1, n, c]
        return einops.rearrange(self.head(self.encoder(x)), "b c n -> b 1 n c")


def main(root: str | Path = DATA, steps: int = 5) -> list[float]:
    city = load_city(root, "nyc_taxi")
    flow = torch.from_numpy(city.flow)
    flow = flow / flow[: 14 * 24].amax(dim=(0, 1))  # scaled on the first 14 days only
    model = BalancedTransfer(TheirForecaster(), tap="encoder", feature_dim=32,
                             tap_rearrange="b d n -> b n d", out_channels=2,
                             region_features=torch.from_numpy(city.poi))
    optimizers = model.configure_optimizers(lr=1e-3)
    totals = []
    for step in range(steps):
        idx = torch.arange(16) + 16 * step
        x = torch.stack([flow[i:i + 6] for i in idx])  # [16, 6, n, c]
        losses = model.train_iteration(x, flow[idx + 6].unsqueeze(1), optimizers)
        totals.append(losses.total)
        print(f"step {step}: total {losses.total:.4f}  pred {losses.pred:.4f}")
    return totals


if __name__ == "__main__":
    main()
