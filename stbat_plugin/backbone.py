"""The backbone contract, declared once: :class:`Backbone` and the :class:`CityFacts` it prepares for.

STBaT needs per-region features ``[b, n, d]`` (:meth:`Backbone.forward_features`) of size
:attr:`Backbone.feature_dim`. A backbone may also declare its input :attr:`Backbone.layout`
(default ``"graph"``) and compute per-city context once per city
(:meth:`Backbone.prepare_city`, default: none). The functions below are the one place where
those two optional members are read; ``check_backbone`` verifies them.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from stbat_plugin._features import BackboneContractError, accepted_kwargs

__all__ = ["Backbone", "CityFacts", "LAYOUTS", "backbone_layout", "declared_layout",
           "city_context"]

#: input layouts: ``"graph"`` takes ``[b, t, n, c]`` plus ``edge_index`` / ``edge_weight``,
#: ``"grid"`` takes ``[b, t, c, h, w]``
LAYOUTS = ("graph", "grid")


@dataclass(frozen=True)
class CityFacts:
    """The facts about one city that a backbone may use in :meth:`Backbone.prepare_city`.

    Args:
        num_regions: ``n``, regions (nodes or grid cells, row-major).
        steps_per_day: time steps in a day (``24`` for hourly data, ``48`` for 30 minutes).
        train_flow: the scaled **training slice** ``[T, n, c]`` only, so validation and test
            flow cannot leak into the context; ``T`` may be ``0`` (a zero-shot target).
        coords: ``[n, 2]`` (lat, lon) of the regions, or ``None`` when the city has none
            (default: ``None``).
        edge_index: ``[2, E]`` the city's graph, as ``forward_features`` gets it (default: ``None``).
        edge_weight: ``[E]`` its weights (default: ``None``).

    Shapes:
        train_flow: ``[T, n, c]``; coords: ``[n, 2]``; edge_index: ``[2, E]``.
    """

    num_regions: int
    steps_per_day: int
    train_flow: Tensor
    coords: Tensor | None = None
    edge_index: Tensor | None = None
    edge_weight: Tensor | None = None

    def __post_init__(self) -> None:
        if self.train_flow.dim() != 3 or self.train_flow.shape[1] != self.num_regions:
            raise ValueError(f"Expected 'train_flow' of shape [T, n={self.num_regions}, c] (got "
                             f"{list(self.train_flow.shape)})")
        if self.steps_per_day < 1:
            raise ValueError(f"Expected steps_per_day >= 1 (got {self.steps_per_day})")
        if self.coords is not None and tuple(self.coords.shape) != (self.num_regions, 2):
            raise ValueError(f"Expected 'coords' of shape [n={self.num_regions}, 2] (got "
                             f"{list(self.coords.shape)})")


@runtime_checkable
class Backbone(Protocol):
    """What ``BalancedTransfer`` needs from a backbone, and what it may use.

    Required: :meth:`forward_features` and an int :attr:`feature_dim` (a model with only
    these is a :class:`~stbat_plugin.adapters.FeatureExtractor`). Optional, with defaults:
    :attr:`layout` (``"graph"``) and :meth:`prepare_city` (no per-city context).
    """

    #: size ``d`` of the features
    feature_dim: int
    #: ``"graph"`` or ``"grid"`` (:data:`LAYOUTS`)
    layout: str

    def forward_features(self, x: Tensor, **graph: Any) -> Tensor:
        """Per-region features ``[b, n, d]`` of ``x`` ``[b, t, n, c]`` (grid: ``[b, t, c, h, w]``)."""
        ...

    def prepare_city(self, city: CityFacts) -> dict[str, Any]:
        """Context of one city, computed once: its items become extra keyword arguments of
        every ``forward_features`` call on that city (which must also run without them)."""
        ...


def declared_layout(model: Any) -> str | None:
    """The layout ``model`` declares, checked, or ``None`` when it declares none.

    Raises:
        BackboneContractError: a declared layout that is not in :data:`LAYOUTS`.
    """
    layout = getattr(model, "layout", None)
    if layout is None:
        return None
    if layout not in LAYOUTS:
        raise BackboneContractError(f"{type(model).__name__}.layout must be one of {list(LAYOUTS)} "
                                    f"(got {layout!r}); declare layout = 'graph' or 'grid'")
    return str(layout)


def backbone_layout(model: Any) -> str:
    """``model.layout`` (checked), or ``"graph"`` when it declares none."""
    return declared_layout(model) or "graph"


def city_context(model: Any, city: CityFacts) -> dict[str, Any]:
    """``model.prepare_city(city)``, or ``{}`` for a model without one.

    The form ``prepare_city(train_flow, **graph)`` of earlier versions is still called, with
    the training slice and the graph, and a ``DeprecationWarning``.

    Raises:
        BackboneContractError: ``prepare_city`` returned something other than a dict.
    """
    prepare = getattr(model, "prepare_city", None)
    if prepare is None:
        return {}
    if _legacy_form(prepare):
        warnings.warn(f"{type(model).__name__}.prepare_city(train_flow, **graph) is deprecated: "
                      "define prepare_city(self, city: CityFacts) and read city.train_flow, "
                      "city.steps_per_day, city.edge_index (docs/plugins.md)", DeprecationWarning,
                      stacklevel=2)
        graph = {"edge_index": city.edge_index, "edge_weight": city.edge_weight}
        context = prepare(city.train_flow, **accepted_kwargs(prepare, graph))
    else:
        context = prepare(city)
    if context is None:
        return {}
    if not isinstance(context, dict):
        raise BackboneContractError(f"{type(model).__name__}.prepare_city must return a dict of "
                                    f"keyword arguments for forward_features (got "
                                    f"{type(context).__name__})")
    return context


def _legacy_form(prepare: Any) -> bool:
    """``prepare_city(train_flow, **graph)``: a first argument named like a flow or annotated
    as a tensor, or graph arguments after it; ``prepare_city(city)`` (a first argument
    annotated ``CityFacts`` or named ``city``) otherwise."""
    try:
        params = list(inspect.signature(prepare).parameters.values())
    except (TypeError, ValueError):  # no signature to read: the current form
        return False
    if not params or params[0].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                            inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return False
    first = params[0]
    annotation = str(first.annotation if isinstance(first.annotation, str) else
                     getattr(first.annotation, "__name__", ""))
    if "CityFacts" in annotation or first.name in ("city", "city_info", "facts", "info"):
        return False
    return "flow" in first.name or "Tensor" in annotation or len(params) > 1
