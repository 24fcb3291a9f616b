"""stbat-plugin: Spatio-Temporal Balanced Transfer (STBaT) around any backbone."""

from __future__ import annotations

from stbat_plugin import _compat
from stbat_plugin._registry import (
    BackboneRegistry,
    BackboneSpec,
    build_plugin_manager,
    create_backbone,
    default_registry,
    list_backbones,
)
from stbat_plugin.adapters import BackboneContractError, FeatureExtractor, TapFeatures
from stbat_plugin.backbone import Backbone, CityFacts
from stbat_plugin.hookspecs import hookimpl, hookspec
from stbat_plugin.network import FeedForward, PredictionNetwork
from stbat_plugin.options import STBaTOptions
from stbat_plugin.riam import RIAM
from stbat_plugin.wrapper import BalancedTransfer, Losses

__version__ = "0.1.0"

_compat.install()  # old paths of the pipeline modules (stbat_plugin.api, ...) still import

__all__ = [
    "BalancedTransfer",
    "STBaTOptions",
    "Losses",
    "PredictionNetwork",
    "FeedForward",
    "RIAM",
    "TapFeatures",
    "Backbone",
    "CityFacts",
    "FeatureExtractor",
    "BackboneContractError",
    "BackboneRegistry",
    "BackboneSpec",
    "build_plugin_manager",
    "create_backbone",
    "default_registry",
    "list_backbones",
    "hookimpl",
    "hookspec",
    "__version__",
]
