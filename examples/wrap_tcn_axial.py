"""pytorch-tcn's ``TCN`` on a graph city and axial-attention's transformer on a grid city.

- ``pytorch_tcn``: a TCN over each region's window; the whole model (``tap=""``) is the
  encoder, its ``[(b n), t, d]`` output is unflattened and read at the last step.
- ``axial_attention``: ``AxialImageTransformer`` mixes neighbouring cells with 3x3
  convolutions, so it belongs on a grid (on a graph it is not permutation-equivariant and
  ``check_backbone`` says so). A grid model declares ``layout="grid"`` through
  ``TapFeatures``; it gets ``[b, t, c, h, w]``.

Run ``python examples/wrap_tcn_axial.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from axial_attention import AxialImageTransformer
from einops.layers.torch import Rearrange
from pytorch_tcn import TCN
from torch import nn

from stbat_plugin import BalancedTransfer, TapFeatures
from stbat_plugin.data import load_city
from stbat_plugin.testing import smoke_train

DATA = Path(__file__).resolve().parents[1] / "data" / "tiny"


def wrapped() -> dict[str, tuple[nn.Module, dict]]:
    """Each model and ALL the glue it needs: BalancedTransfer keyword arguments."""
    tcn = TCN(1, [32, 32], kernel_size=3, input_shape="NLC")
    axial = nn.Sequential(Rearrange("b t c h w -> (b t) c h w"), nn.Conv2d(1, 16, 1),
                          AxialImageTransformer(16, depth=1, heads=2, dim_index=1))
    return {
        "pytorch_tcn": (tcn, dict(tap="", feature_dim=32, input_rearrange="b t n c -> (b n) t c",
                                  tap_rearrange="(b n) t d -> b t n d", tap_reduce_time="last")),
        "axial_attention": (TapFeatures(axial, "", feature_dim=16, layout="grid",
                                        rearrange="(b t) d h w -> b t (h w) d",
                                        reduce_time="mean"), {}),
    }


def main(root: str | Path = DATA, steps: int = 2) -> dict[str, list[float]]:
    totals: dict[str, list[float]] = {}
    for (name, (model, glue)), city_name in zip(wrapped().items(), ["nyc_taxi", "nyc_bike_grid2014"],
                                                strict=True):
        city = load_city(root, city_name)
        flow = torch.from_numpy(city.flow[..., :1]) / float(city.flow[: 14 * 24, :, 0].max())
        profile = flow[: 24 * 7].reshape(7, 24, -1).mean(0).t()  # [n, 24] temporal profiles
        graph = {"grid_shape": tuple(city.grid_shape)} if city.grid_shape is not None else {}
        stbat = BalancedTransfer(model, **glue, region_features=profile)
        totals[name] = smoke_train(stbat, flow, steps=steps, **graph)
        print(f"{name}: totals {[round(v, 4) for v in totals[name]]}")
    return totals


if __name__ == "__main__":
    main()
