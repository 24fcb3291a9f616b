"""Turning a user's model into a feature extractor, without editing its code.

Three ways, tried in this order by :func:`resolve_backbone`:

1. ``tap="name"``: a named submodule's output (or input) is the feature
   (:class:`~stbat_plugin.taps.TapFeatures`, a forward hook); an explicit tap wins, even
   over the model's own ``forward_features``;
2. the model has ``forward_features(x, **graph) -> [b, n, d]``: used as is;
3. a plugin claims the model through the ``stbat_adapt_backbone`` hook.

The user's model object is never modified: a ``feature_dim=`` that the model does not
declare wraps it instead of setting an attribute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import einops
from torch import Tensor, nn

from stbat_plugin._features import BackboneContractError, accepted_kwargs
from stbat_plugin.backbone import LAYOUTS, CityFacts, city_context, declared_layout
from stbat_plugin.taps import TapFeatures

__all__ = ["FeatureExtractor", "TapFeatures", "BackboneContractError", "resolve_backbone"]


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the wrapper needs: per-region features ``[b, n, d]`` of ``feature_dim`` d (the
    required part of :class:`~stbat_plugin.backbone.Backbone`)."""

    feature_dim: int

    def forward_features(self, x: Tensor, **graph: Any) -> Tensor: ...


class WithFeatureDim(nn.Module):
    """A model with ``forward_features`` seen with another ``feature_dim``, untouched.

    Args:
        model: has ``forward_features`` (and possibly ``layout`` and ``prepare_city``).
        feature_dim: size ``d`` of its features.
    """

    def __init__(self, model: nn.Module, feature_dim: int):
        super().__init__()
        self.model, self.feature_dim = model, int(feature_dim)
        self.layout = declared_layout(model) or "graph"

    def forward_features(self, x: Tensor, **graph: Any) -> Tensor:
        model: Any = self.model
        return model.forward_features(x, **accepted_kwargs(model.forward_features, graph))

    def prepare_city(self, city: CityFacts) -> dict[str, Any]:
        return city_context(self.model, city)

    def forward(self, x: Tensor, **graph: Any) -> Tensor:
        return self.forward_features(x, **graph)


def resolve_backbone(
    model: nn.Module,
    *,
    tap: str | None = None,
    feature_dim: int | None = None,
    tap_input: bool = False,
    tap_select: int | str | None = None,
    tap_calls: str | None = None,
    tap_rearrange: str | None = None,
    tap_reduce_time: str | None = None,
    input_rearrange: str | None = None,
    graph_kwargs: Sequence[str] | None = None,
    registry: Any = None,
) -> nn.Module:
    """Return a module with ``forward_features`` and ``feature_dim`` for ``model``.

    Args:
        model: the user's model (never modified).
        tap: name of the submodule giving the features; the ``tap_*`` options,
            ``input_rearrange`` and ``graph_kwargs`` are those of
            :class:`~stbat_plugin.taps.TapFeatures` (``input``, ``select``, ``calls``,
            ``rearrange``, ``reduce_time``).
        feature_dim: size ``d`` of the features (required with ``tap``; otherwise it
            overrides the model's own ``feature_dim`` through a wrapper).
        registry: whose ``stbat_adapt_backbone`` hooks may claim the model (default: the
            installed plugins).

    Raises:
        BackboneContractError: listing the three ways to make a model usable.
    """
    options: dict[str, Any] = {"input": tap_input, "select": tap_select, "calls": tap_calls,
               "rearrange": tap_rearrange, "reduce_time": tap_reduce_time,
               "input_rearrange": input_rearrange, "graph_kwargs": graph_kwargs}
    if tap is not None:
        if feature_dim is None:
            raise BackboneContractError(
                f"tap={tap!r} needs feature_dim=<size d of that submodule's per-region output>")
        layout = getattr(model, "layout", "graph")
        return TapFeatures(model, tap, feature_dim=feature_dim,
                           layout=layout if layout in LAYOUTS else "graph", **options)
    given = sorted((k if k in ("input_rearrange", "graph_kwargs") else "tap_" + k)
                   for k, v in options.items() if v is not None and v is not False)
    if given:
        raise BackboneContractError(f"{', '.join(given)} only apply with tap=<submodule name>")
    extractor = model if hasattr(model, "forward_features") else None
    if extractor is None:
        from stbat_plugin._registry import default_registry

        extractor = (registry or default_registry()).adapt(model)
    if extractor is None:
        raise BackboneContractError(_HOW_TO_FIX.format(name=type(model).__name__))
    own = getattr(extractor, "feature_dim", None)
    if feature_dim is not None and own != feature_dim:
        return WithFeatureDim(extractor, feature_dim)
    if not isinstance(own, int):
        raise BackboneContractError(
            f"{type(extractor).__name__} has forward_features but no int 'feature_dim'; "
            "pass BalancedTransfer(..., feature_dim=d) with the size d of its features"
        )
    return extractor


_HOW_TO_FIX = (
    "{name} does not expose per-region features [b, n, d], which STBaT needs. Fix it one of "
    "three ways: (1) give the model a method forward_features(x, **graph) -> [b, n, d] and an "
    "int attribute feature_dim; (2) name the submodule whose output (or input, tap_input=True) "
    "is the per-region representation: BalancedTransfer(model, tap='encoder', feature_dim=64); "
    "(3) install or register a plugin whose stbat_adapt_backbone hook claims this model class "
    "(see 'Wrapping a model you did not write' in docs/plugins.md)."
)


def grid_to_regions(x: Tensor) -> Tensor:
    """``[b, t, c, h, w] -> [b, t, (h w), c]`` (row-major regions)."""
    return einops.rearrange(x, "b t c h w -> b t (h w) c")


def regions_to_grid(x: Tensor, grid_shape: tuple[int, int]) -> Tensor:
    """``[b, t, n, c] -> [b, t, c, h, w]`` with ``n = h * w`` row-major."""
    h, w = (int(v) for v in grid_shape)
    if h * w != x.shape[2]:
        raise ValueError(f"grid_shape {h}x{w}={h * w} does not match n={x.shape[2]} regions")
    return einops.rearrange(x, "b t (h w) c -> b t c h w", h=h, w=w)


