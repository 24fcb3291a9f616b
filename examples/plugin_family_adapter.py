"""A plugin claiming a whole third-party model family through ``stbat_adapt_backbone``.

Every subclass of ``TheirBaseNet`` keeps its per-region output ``[b, n, hidden]`` in
``self.body``; one hook answers for all of them. Run ``python examples/plugin_family_adapter.py``,
or ``stbat transfer --plugin examples/plugin_family_adapter.py:TheirFamilyPlugin
--backbone their_mlp ...`` (the registered factories return the raw models).
"""

from __future__ import annotations

from pathlib import Path

import torch
from einops.layers.torch import Rearrange, Reduce
from torch import nn

import stbat_plugin as stbat
from stbat_plugin.data import load_city

DATA = Path(__file__).resolve().parents[1] / "data" / "tiny"


class TheirBaseNet(nn.Module):  # --- the third-party family, as published
    def __init__(self, body: nn.Module, hidden: int, channels: int = 2):
        super().__init__()
        self.body, self.hidden, self.readout = body, hidden, nn.Linear(hidden, channels)

    def forward(self, x):  # [b, t, n, c] -> [b, 1, n, c]
        return self.readout(self.body(x)).unsqueeze(1)


class TheirMLPNet(TheirBaseNet):
    def __init__(self, window: int = 6, channels: int = 2, hidden: int = 32):
        super().__init__(nn.Sequential(Rearrange("b t n c -> b n (t c)"),
                                       nn.Linear(window * channels, hidden), nn.ReLU()), hidden)


class TheirTCNNet(TheirBaseNet):
    def __init__(self, channels: int = 2, hidden: int = 24):
        super().__init__(nn.Sequential(Rearrange("b t n c -> b c t n"), nn.Conv2d(
            channels, hidden, (3, 1)), nn.ReLU(), Reduce("b d t n -> b n d", "max")), hidden)


class TheirFamilyPlugin:  # --- our side: any object (or module) with the hooks
    @stbat.hookimpl
    def stbat_adapt_backbone(self, model: nn.Module):
        if isinstance(model, TheirBaseNet):
            return stbat.TapFeatures(model, "body", feature_dim=model.hidden)
        return None  # not ours: let other plugins try

    @stbat.hookimpl
    def stbat_register_backbones(self, register):  # raw models: the hook above claims them
        register("their_mlp", lambda in_channels=1, window=24, hidden=32: TheirMLPNet(
            window, in_channels, hidden), description="TheirMLPNet, forward(x)")
        register("their_tcn", lambda in_channels=1, hidden=24: TheirTCNNet(in_channels, hidden))


def main(root: str | Path = DATA, steps: int = 3) -> dict[str, list[float]]:
    city = load_city(root, "nyc_taxi")
    flow = torch.from_numpy(city.flow)
    flow = flow / flow[: 14 * 24].amax(dim=(0, 1))  # scaled on the first 14 days only
    registry = stbat.BackboneRegistry(stbat.build_plugin_manager(plugins=[TheirFamilyPlugin()]))
    totals: dict[str, list[float]] = {}
    for net in (TheirMLPNet(), TheirTCNNet()):
        model = stbat.BalancedTransfer(net, registry=registry, out_channels=2,
                                       region_features=torch.from_numpy(city.poi))
        optimizers, name = model.configure_optimizers(lr=1e-3), type(net).__name__
        for step in range(steps):
            idx = torch.arange(16) + 16 * step
            x, y = torch.stack([flow[i:i + 6] for i in idx]), flow[idx + 6].unsqueeze(1)
            totals.setdefault(name, []).append(model.train_iteration(x, y, optimizers).total)
        print(f"{name}: totals {[round(v, 4) for v in totals[name]]}")
    return totals


if __name__ == "__main__":
    main()
