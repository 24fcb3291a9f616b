"""x-transformers models, unmodified, as STBaT backbones: keyword arguments are all the glue.

- ``temporal``: one ``ContinuousTransformerWrapper`` over each region's window. The model
  takes ``[(b n), t, c]`` (``input_rearrange``); the feature is the input of its
  ``project_out`` layer at the last step.
- ``spatial``: the regions are the tokens (``[b, n, (t c)]``), no positional embedding, so
  the features follow the regions when they are permuted.

``ContinuousTransformerWrapper.forward`` takes ``**kwargs`` and hands them to its attention
layers, which take no graph: ``graph_kwargs=()``. Run ``python examples/wrap_x_transformers.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from x_transformers import ContinuousTransformerWrapper, Encoder

from stbat_plugin import BalancedTransfer
from stbat_plugin.data import load_city
from stbat_plugin.testing import smoke_train

DATA = Path(__file__).resolve().parents[1] / "data" / "tiny"


def wrapped(window: int = 6, in_channels: int = 1) -> dict[str, tuple[nn.Module, dict]]:
    """Each model and ALL the glue it needs: BalancedTransfer keyword arguments."""
    temporal = ContinuousTransformerWrapper(dim_in=in_channels, max_seq_len=window,
                                            attn_layers=Encoder(dim=32, depth=2, heads=4))
    spatial = ContinuousTransformerWrapper(dim_in=window * in_channels, max_seq_len=0,
                                           use_abs_pos_emb=False,
                                           attn_layers=Encoder(dim=32, depth=2, heads=4))
    return {
        "x_transformers_temporal": (temporal, dict(
            tap="project_out", tap_input=True, feature_dim=32, graph_kwargs=(),
            input_rearrange="b t n c -> (b n) t c", tap_rearrange="(b n) t d -> b t n d",
            tap_reduce_time="last")),
        "x_transformers_spatial": (spatial, dict(
            tap="project_out", tap_input=True, feature_dim=32, graph_kwargs=(),
            input_rearrange="b t n c -> b n (t c)")),
    }


def main(root: str | Path = DATA, steps: int = 2) -> dict[str, list[float]]:
    city = load_city(root, "nyc_taxi")
    flow = torch.from_numpy(city.flow[..., :1]) / float(city.flow[: 14 * 24, :, 0].max())
    totals: dict[str, list[float]] = {}
    for name, (model, glue) in wrapped().items():
        stbat = BalancedTransfer(model, **glue, region_features=torch.from_numpy(city.poi))
        totals[name] = smoke_train(stbat, flow, steps=steps)
        print(f"{name}: totals {[round(v, 4) for v in totals[name]]}")
    return totals


if __name__ == "__main__":
    main()
