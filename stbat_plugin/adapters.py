"""Turning a user's model into a feature extractor, without editing its code.

Three ways, in this order:

1. the model has ``forward_features(x, **graph) -> [b, n, d]``: used as is;
2. ``tap="name"``: the output of the named submodule is the feature (a forward hook);
3. a plugin claims the model through the ``stbat_adapt_backbone`` hook.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import einops
from torch import Tensor, nn

__all__ = ["FeatureExtractor", "TapFeatures", "BackboneContractError", "resolve_backbone"]


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the wrapper needs: per-region features ``[b, n, d]`` of ``feature_dim`` d."""

    feature_dim: int

    def forward_features(self, x: Tensor, **graph: Any) -> Tensor: ...


class BackboneContractError(TypeError):
    """The model does not provide per-region features in a way the wrapper can use."""


class _StopForward(Exception):
    pass


class TapFeatures(nn.Module):
    """Use the output of a named submodule of ``model`` as the per-region features.

    The full model is called as ``model(x, **graph)``; a forward hook captures the
    submodule's output and stops the forward pass there, so no work after the tap
    is done. The model's own code is not touched.

    Args:
        model: any ``nn.Module``.
        submodule: dotted name as in ``model.named_modules()``, e.g. ``"encoder.gru"``.
        feature_dim: size ``d`` of the tapped features.
        rearrange: einops pattern taking the tapped output to ``b n d``, e.g.
            ``"b d n -> b n d"`` (default: ``None``, already ``[b, n, d]``).
        layout: ``"graph"`` or ``"grid"`` (default: ``"graph"``).

    Shapes:
        x: ``[b, t, n, c]`` -> ``[b, n, d]``.
    """

    def __init__(
        self,
        model: nn.Module,
        submodule: str,
        *,
        feature_dim: int,
        rearrange: str | None = None,
        layout: str = "graph",
    ):
        super().__init__()
        names = dict(model.named_modules())
        if submodule not in names:
            listing = ", ".join(n for n in names if n) or "(none)"
            raise BackboneContractError(
                f"tap={submodule!r}: no such submodule in {type(model).__name__}; "
                f"its submodules are: {listing}"
            )
        self.model = model
        self.submodule = submodule
        self.feature_dim = int(feature_dim)
        self.rearrange = rearrange
        self.layout = layout

    def forward_features(self, x: Tensor, **graph: Any) -> Tensor:
        captured: list[Tensor] = []

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _StopForward

        handle = self.model.get_submodule(self.submodule).register_forward_hook(hook)
        try:
            self.model(x, **graph)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise BackboneContractError(
                f"tap={self.submodule!r} was never called during {type(self.model).__name__}.forward"
            )
        z = captured[0]
        return einops.rearrange(z, self.rearrange) if self.rearrange else z

    def forward(self, x: Tensor, **graph: Any) -> Tensor:
        return self.forward_features(x, **graph)


def resolve_backbone(
    model: nn.Module,
    *,
    tap: str | None = None,
    feature_dim: int | None = None,
    tap_rearrange: str | None = None,
    registry: Any = None,
) -> nn.Module:
    """Return a module with ``forward_features`` and ``feature_dim`` for ``model``.

    Raises:
        BackboneContractError: listing the three ways to make a model usable.
    """
    if tap is not None:
        if feature_dim is None:
            raise BackboneContractError(
                f"tap={tap!r} needs feature_dim=<size d of that submodule's per-region output>"
            )
        return TapFeatures(model, tap, feature_dim=feature_dim, rearrange=tap_rearrange)
    extractor = model if hasattr(model, "forward_features") else None
    if extractor is None:
        from stbat_plugin._registry import default_registry

        extractor = (registry or default_registry()).adapt(model)
    if extractor is None:
        raise BackboneContractError(_HOW_TO_FIX.format(name=type(model).__name__))
    if feature_dim is not None:
        extractor.feature_dim = int(feature_dim)
    if not isinstance(getattr(extractor, "feature_dim", None), int):
        raise BackboneContractError(
            f"{type(extractor).__name__} has forward_features but no int 'feature_dim'; "
            "pass BalancedTransfer(..., feature_dim=d) with the size d of its features"
        )
    return extractor


_HOW_TO_FIX = (
    "{name} does not expose per-region features [b, n, d], which STBaT needs. Fix it one of "
    "three ways: (1) give the model a method forward_features(x, **graph) -> [b, n, d] and an "
    "int attribute feature_dim; (2) name the submodule whose output is the per-region "
    "representation: BalancedTransfer(model, tap='encoder', feature_dim=64); (3) install or "
    "register a plugin whose stbat_adapt_backbone hook claims this model class "
    "(see docs/plugins.md)."
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


