"""The spatio-temporal prediction network (Eq. 8-9): feature extractor + feedforward predictor.

This is the transferable part of STBaT: what is pre-trained on the source cities
and then fine-tuned or evaluated on the target city, with no RIAM attached. The
plain fine-tuning and target-only baselines use the very same class.
"""

from __future__ import annotations

from typing import Any

import einops
import torch
from torch import Tensor, nn

from stbat_plugin.adapters import regions_to_grid

__all__ = ["FeedForward", "PredictionNetwork"]


class FeedForward(nn.Sequential):
    """``FC(ReLU(FC(x)))``, the paper's two-layer block (Eq. 1, 3, 4, 9, 12)."""

    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))


class PredictionNetwork(nn.Module):
    r"""Feature extractor :math:`f_{feat}` plus feedforward predictor :math:`f_{pred}`.

    Args:
        extractor: module with ``forward_features(x, **graph) -> [b, n, d]``,
            ``feature_dim`` and optionally ``layout`` (``"graph"`` or ``"grid"``).
        horizon: steps predicted ``s`` (default: ``1``).
        out_channels: channels predicted ``c`` (default: ``1``).
        hidden: width of the predictor's hidden layer (default: ``256``, as the paper).

    Shapes:
        x: ``[b, t, n, c]`` (grid backbones also take ``[b, t, c, h, w]``) ->
        ``[b, s, n, c_out]``.
    """

    def __init__(self, extractor: nn.Module, *, horizon: int = 1, out_channels: int = 1,
                 hidden: int = 256):
        super().__init__()
        self.extractor: Any = extractor
        self.feature_dim = int(getattr(extractor, "feature_dim"))  # noqa: B009
        self.layout = getattr(extractor, "layout", "graph")
        self.horizon = int(horizon)
        self.out_channels = int(out_channels)
        self.head = FeedForward(self.feature_dim, hidden, self.horizon * self.out_channels)

    def forward_features(self, x: Tensor, **graph: Any) -> Tensor:
        """Per-region features ``z`` ``[b, n, d]`` (Eq. 8), with shape checks."""
        x, n = self._to_backbone_layout(x, graph)
        z = self.extractor.forward_features(x, **graph)
        expected = (x.shape[0], n, self.feature_dim)
        if tuple(z.shape) != expected:
            what = "changed the number of regions" if z.dim() == 3 and z.shape[1] != n else \
                "returned features of the wrong shape"
            raise ValueError(
                f"Backbone {type(self.extractor).__name__} {what}: expected [b, n, d] = "
                f"{list(expected)}, got {list(z.shape)}. STBaT needs one feature vector per "
                "region; if the model pools regions, tap an earlier submodule"
            )
        return z

    def forward_head(self, z: Tensor) -> Tensor:
        """``[b, n, d] -> [b, s, n, c]`` (Eq. 9), applied to each region."""
        out = self.head(z)  # [b, n, s*c]
        return einops.rearrange(out, "b n (s c) -> b s n c", s=self.horizon, c=self.out_channels)

    def forward(self, x: Tensor, **graph: Any) -> Tensor:
        return self.forward_head(self.forward_features(x, **graph))

    def _to_backbone_layout(self, x: Tensor, graph: dict[str, Any]) -> tuple[Tensor, int]:
        if self.layout == "grid":
            grid_shape = graph.pop("grid_shape", None)
            graph.pop("edge_index", None)
            graph.pop("edge_weight", None)
            if x.dim() == 5:  # [b, t, c, h, w]
                return x, x.shape[-2] * x.shape[-1]
            if grid_shape is None:
                raise ValueError(
                    f"{type(self.extractor).__name__} is a grid backbone: pass "
                    "grid_shape=(h, w) with x of shape [b, t, n, c], or x as [b, t, c, h, w]"
                )
            return regions_to_grid(_check_x(x), tuple(grid_shape)), x.shape[2]
        graph.pop("grid_shape", None)
        return _check_x(x), x.shape[2]


def _check_x(x: Tensor) -> Tensor:
    if x.dim() != 4:
        raise ValueError(f"Expected 'x' of shape [b, t, n, c] (got {list(x.shape)})")
    if not torch.is_floating_point(x):
        raise ValueError(f"Expected floating point 'x' (got {x.dtype}); scale the flow first")
    return x
