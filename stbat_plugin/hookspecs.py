"""Hook specifications of stbat-plugin (pluggy).

A plugin is any module or object with functions marked ``@stbat_plugin.hookimpl``
whose names match the stubs below. Publish it under the entry-point group
``stbat``; the built-in backbones in ``backbones/`` use that very path.

Hooks run at set-up time only (building the registry, wrapping a model); the
training loop never calls ``pm.hook.*``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from stbat_plugin._registry import Register

PROJECT_NAME = "stbat"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def stbat_register_backbones(register: Register) -> None:
    """Register backbone factories.

    Call ``register(name, factory, layout=None, description="")`` once per
    backbone. ``factory(**kwargs)`` must return an ``nn.Module`` with
    ``forward_features(x, **graph) -> [b, n, d]`` and an int ``feature_dim``
    (:class:`stbat_plugin.backbone.Backbone`), e.g. a ``TapFeatures`` around a model nobody
    wrote for STBaT, or a model that this or another plugin's ``stbat_adapt_backbone``
    claims (see ``docs/plugins.md``). The layout is ``"graph"`` (input ``[b, t, n, c]``
    plus ``edge_index`` / ``edge_weight``) or ``"grid"`` (input ``[b, t, c, h, w]``),
    declared once: by the factory class's ``layout`` attribute, or by ``layout=`` for a
    factory that is a function (both given must agree; neither: ``"graph"``).

    Example::

        @hookimpl
        def stbat_register_backbones(register):
            register("my_gru", MyGRU, description="a GRU per region")  # MyGRU.layout = "graph"
    """


@hookspec(firstresult=True)
def stbat_adapt_backbone(model: nn.Module) -> Any:
    """Claim a model that has no ``forward_features`` of its own.

    Return a module exposing ``forward_features(x, **graph) -> [b, n, d]`` and
    ``feature_dim`` that wraps ``model`` (without editing or modifying it), or ``None``
    to let other plugins try. The first non-``None`` answer wins. ``TapFeatures`` takes
    the ``tap_*`` keywords of ``BalancedTransfer`` without the prefix.

    Example::

        @hookimpl
        def stbat_adapt_backbone(model):
            if isinstance(model, TheirNet):
                return TapFeatures(model, "encoder", feature_dim=model.hidden)
            return None
    """
