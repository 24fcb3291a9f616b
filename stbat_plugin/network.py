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

from stbat_plugin._features import accepted_kwargs, feature_shape_hint
from stbat_plugin.adapters import regions_to_grid
from stbat_plugin.backbone import CityFacts, backbone_layout, city_context

__all__ = ["FeedForward", "PredictionNetwork", "NLinear", "NORMALIZATIONS", "window_norm"]

#: per-window, per-region input normalisations (see :func:`window_norm`)
NORMALIZATIONS = ("none", "revin", "last", "revin-last")
#: variance floor of ``revin``, in scaled units (a flat window is divided by ``sqrt(EPS)``)
EPS = 1e-5


def window_norm(x: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    r"""Offset and scale of each input window, per region and channel.

    - ``"none"``: offset 0, scale 1.
    - ``"revin"``: the window mean and standard deviation (RevIN, Kim et al., ICLR 2022,
      without its affine part): :math:`\hat x = (x - \bar x) / \sqrt{\mathrm{Var}(x) + \epsilon}`.
    - ``"last"``: the last value, scale 1: the network predicts the change from it
      (a residual-to-last-value head, as NLinear).
    - ``"revin-last"``: the last value and the window standard deviation: the change from
      the last value, in units of the window's spread.

    Shapes:
        x: ``[b, t, n, c]`` -> offset, scale ``[b, 1, n, c]``.
    """
    if mode == "none":
        return torch.zeros_like(x[:, -1:]), torch.ones_like(x[:, -1:])
    if mode == "last":
        return x[:, -1:], torch.ones_like(x[:, -1:])
    if mode in ("revin", "revin-last"):
        var, mean = torch.var_mean(x, dim=1, keepdim=True, unbiased=False)
        return (mean if mode == "revin" else x[:, -1:]), (var + EPS).sqrt()
    raise ValueError(f"Expected 'normalize' in {list(NORMALIZATIONS)} (got {mode!r})")


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
        normalize: per-window input normalisation of the ``out_channels`` forecast
            channels, undone on the output (:func:`window_norm`; default: ``"none"``).
            The lag channels are normalised with the same offset and scale as their series;
            further input channels (e.g. time-of-day covariates) pass unchanged. With
            ``"last"`` and ``"revin-last"`` the head's last layer starts at zero, so the
            untrained network repeats the last value.
        linear_skip: add a linear map of the (normalised) input window, and of the lag
            channels, to the head's output, an autoregressive highway as in LSTNet (Lai et
            al., SIGIR 2018): the network then contains NLinear, and the backbone learns what
            a linear map of the window misses. Needs ``window`` (default: ``False``).
        window: input steps ``t`` (needed by ``linear_skip``; default: ``None``).
        lag_channels: seasonal lag inputs ``l`` per forecast channel (default: ``0``). The
            input channels are then ``[series (c_out), lag 1 (c_out), ..., lag l (c_out),
            other]``: lag ``i`` of forecast channel ``j`` at index ``c_out (1 + i) + j``.

    Shapes:
        x: ``[b, t, n, c]`` (grid backbones also take ``[b, t, c, h, w]``) ->
        ``[b, s, n, c_out]``.
    """

    def __init__(self, extractor: nn.Module, *, horizon: int = 1, out_channels: int = 1,
                 hidden: int = 256, normalize: str = "none", linear_skip: bool = False,
                 window: int | None = None, lag_channels: int = 0):
        super().__init__()
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"Expected 'normalize' in {list(NORMALIZATIONS)} (got {normalize!r})")
        if linear_skip and (window is None or window < 1):
            raise ValueError(f"linear_skip=True needs the input window t >= 1 (got window={window})")
        if isinstance(lag_channels, bool) or not isinstance(lag_channels, int) or lag_channels < 0:
            raise ValueError(f"Expected 'lag_channels' a whole number >= 0 (got {lag_channels!r})")
        self.lag_channels = lag_channels
        self.normalize = normalize
        self.extractor: Any = extractor
        self.feature_dim = int(getattr(extractor, "feature_dim"))  # noqa: B009
        self.layout = backbone_layout(extractor)
        self.horizon = int(horizon)
        self.out_channels = int(out_channels)
        self.head = FeedForward(self.feature_dim, hidden, self.horizon * self.out_channels)
        if normalize in ("last", "revin-last"):  # start as persistence
            last: Any = self.head[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.window = window
        self.skip = nn.Linear(int(window or 1) * (1 + lag_channels), self.horizon) \
            if linear_skip else None
        if self.skip is not None:  # starts at zero: the skip adds nothing until trained
            nn.init.zeros_(self.skip.weight)
            nn.init.zeros_(self.skip.bias)

    def prepare_city(self, city: CityFacts) -> dict[str, Any]:
        """The extractor's per-city context (:meth:`~stbat_plugin.backbone.Backbone.prepare_city`;
        ``{}`` when it has none): extra keyword arguments of every forward on that city."""
        return city_context(self.extractor, city)

    def forward_features(self, x: Tensor, **graph: Any) -> Tensor:
        """Per-region features ``z`` ``[b, n, d]`` (Eq. 8) of the normalised input, with shape checks."""
        return self.forward_with_features(x, **graph)[1]

    def forward_with_features(self, x: Tensor, **graph: Any) -> tuple[Tensor, Tensor]:
        """Prediction ``[b, s, n, c]`` (in the input's units) and features ``[b, n, d]``."""
        # x: [b, t, n, c_in]; c_in = c (1 + l) + covariates
        if x.dim() != 4 and (self.normalize != "none" or self.skip is not None
                             or self.lag_channels):
            raise ValueError(f"Expected 'x' of shape [b, t, n, c] with normalize, linear_skip or "
                             f"lag_channels (got {list(x.shape)})")
        if x.dim() != 4:
            z = self._features(x, graph)
            return self.forward_head(z), z
        c, width = self.out_channels, self.out_channels * (1 + self.lag_channels)
        if _check_x(x).shape[-1] < width:
            raise ValueError(f"Expected 'x' with at least {width} channels: {c} series and "
                             f"{self.lag_channels} lag input(s) each (got {list(x.shape)})")
        if self.normalize == "none":
            history, x_in = x[..., :width], x
        else:
            offset, scale = window_norm(x[..., :c], self.normalize)
            history = (x[..., :width] - offset.repeat(1, 1, 1, 1 + self.lag_channels)) \
                / scale.repeat(1, 1, 1, 1 + self.lag_channels)
            x_in = torch.cat([history, x[..., width:]], dim=-1)
        z = self._features(x_in, graph)
        out = self.forward_head(z)
        if self.skip is not None:
            if history.shape[1] != self.window:
                raise ValueError(f"Expected 'x' with t = {self.window} steps for linear_skip "
                                 f"(got {list(x.shape)})")
            ar = self.skip(einops.rearrange(history, "b t n (l c) -> b n c (l t)", c=c))
            out = out + einops.rearrange(ar, "b n c s -> b s n c")
        return (out, z) if self.normalize == "none" else (out * scale + offset, z)

    def _features(self, x: Tensor, graph: dict[str, Any]) -> Tensor:
        graph = dict(graph)
        x, n = self._to_backbone_layout(x, graph)
        forward_features = self.extractor.forward_features
        z = forward_features(x, **accepted_kwargs(forward_features, graph))
        expected = (x.shape[0], n, self.feature_dim)
        if tuple(z.shape) != expected:
            what = "changed the number of regions" if z.dim() == 3 and z.shape[:1] == x.shape[:1] \
                and z.shape[1] != n else "returned features of the wrong shape"
            hint = feature_shape_hint(z.shape, b=x.shape[0], n=n, t=x.shape[1], d=self.feature_dim,
                                      tap=False)
            raise ValueError(f"Backbone {type(self.extractor).__name__} {what}: expected [b, n, d] = "
                             f"{list(expected)}, got {list(z.shape)}; {hint}")
        return z

    def forward_head(self, z: Tensor) -> Tensor:
        """``[b, n, d] -> [b, s, n, c]`` (Eq. 9), applied to each region (normalised units)."""
        out = self.head(z)  # [b, n, s*c]
        return einops.rearrange(out, "b n (s c) -> b s n c", s=self.horizon, c=self.out_channels)

    def forward(self, x: Tensor, **graph: Any) -> Tensor:
        return self.forward_with_features(x, **graph)[0]

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


class NLinear(nn.Module):
    r"""NLinear (Zeng et al., AAAI 2023): the last value plus a linear map of the window.

    :math:`\hat y = x_{t} + W (x - x_{t}) + V (x^{lag} - x_{t})`, one map
    :math:`W \in \mathbb{R}^{s \times t}` (with a bias) and, with seasonal lag inputs, one
    map :math:`V \in \mathbb{R}^{s \times l t}` of the ``l`` lag windows, shared by every
    region and channel, starting at zero (= persistence). Only the first ``out_channels``
    series (and their lag channels) are used (covariates are ignored); graph keyword
    arguments are accepted and ignored, so it runs wherever the deep networks run.

    Args:
        window: input steps ``t``. horizon: steps ``s`` (default: ``1``).
        out_channels: forecast channels ``c`` (default: ``1``).
        lag_channels: seasonal lag inputs ``l`` per forecast channel, laid out as in
            :class:`PredictionNetwork` (default: ``0``).

    Shapes:
        x: ``[b, t, n, c_in]`` -> ``[b, s, n, c]``.
    """

    def __init__(self, window: int, *, horizon: int = 1, out_channels: int = 1,
                 lag_channels: int = 0):
        super().__init__()
        if isinstance(lag_channels, bool) or not isinstance(lag_channels, int) or lag_channels < 0:
            raise ValueError(f"Expected 'lag_channels' a whole number >= 0 (got {lag_channels!r})")
        self.window, self.horizon, self.out_channels = int(window), int(horizon), int(out_channels)
        self.lag_channels = lag_channels
        self.linear = nn.Linear(self.window, self.horizon)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.lag_linear = nn.Linear(self.window * lag_channels, self.horizon, bias=False) \
            if lag_channels else None
        if self.lag_linear is not None:
            nn.init.zeros_(self.lag_linear.weight)

    def forward(self, x: Tensor, **graph: Any) -> Tensor:
        # x: [b, t, n, c_in]
        x = _check_x(x)
        if x.shape[1] != self.window:
            raise ValueError(f"Expected 'x' with t = {self.window} steps (got {list(x.shape)})")
        c = self.out_channels
        if x.shape[-1] < c * (1 + self.lag_channels):
            raise ValueError(f"Expected 'x' with at least {c * (1 + self.lag_channels)} channels: "
                             f"{c} series and {self.lag_channels} lag input(s) each (got "
                             f"{list(x.shape)})")
        v = x[..., :c]
        last = v[:, -1:]
        out = self.linear(einops.rearrange(v - last, "b t n c -> b n c t"))
        if self.lag_linear is not None:
            lags = x[..., c : c * (1 + self.lag_channels)] - last.repeat(1, 1, 1, self.lag_channels)
            out = out + self.lag_linear(einops.rearrange(lags, "b t n (l c) -> b n c (l t)", c=c))
        return einops.rearrange(out, "b n c s -> b s n c") + last
