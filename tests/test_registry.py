"""The pluggy plugin manager and the backbone registry built from it."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
from torch import nn

import stbat_plugin
from stbat_plugin import (
    BackboneRegistry,
    BalancedTransfer,
    TapFeatures,
    build_plugin_manager,
    create_backbone,
    hookimpl,
    list_backbones,
)
from stbat_plugin.testing import ring_graph


class TinyGRU(nn.Module):
    """A plugin's backbone: a GRU per region."""

    layout = "graph"

    def __init__(self, in_channels: int = 1, hidden: int = 4):
        super().__init__()
        self.gru = nn.GRU(in_channels, hidden, batch_first=True)
        self.feature_dim = hidden

    def forward_features(self, x: torch.Tensor, **_: Any) -> torch.Tensor:
        b, t, n, c = x.shape
        _, h = self.gru(x.permute(0, 2, 1, 3).reshape(b * n, t, c))
        return h[-1].reshape(b, n, -1)


class GRUPlugin:
    """A plugin as a class (its canonical name in pluggy is the class name)."""

    @hookimpl
    def stbat_register_backbones(register):
        register("tiny_gru", TinyGRU, layout="graph", description="GRU per region")


def _module_plugin(name: str, backbone_name: str, factory=TinyGRU, layout: str = "graph"):
    """A plugin as a module object, as an installed plugin would be."""
    module = types.ModuleType(name)

    @hookimpl
    def stbat_register_backbones(register):
        register(backbone_name, factory, layout=layout)

    module.stbat_register_backbones = stbat_register_backbones
    return module


def _registry(*plugins, entrypoints: bool = False) -> BackboneRegistry:
    return BackboneRegistry(build_plugin_manager(load_entrypoints=entrypoints, plugins=plugins))


# --------------------------------------------------------------------------- built-ins
def test_builtins_come_through_entry_points(registry):
    assert {"stnet", "graph_stnet"} <= set(registry.names())
    specs = {s.name: s for s in registry.specs()}
    assert specs["stnet"].layout == "grid" and specs["graph_stnet"].layout == "graph"
    assert specs["stnet"].distribution == "stbat-plugin"
    assert specs["stnet"].version == stbat_plugin.__version__
    assert registry.names() == sorted(registry.names())


def test_no_entry_points_no_builtins(empty_registry):
    assert empty_registry.names() == []


def test_default_registry_helpers():
    assert {"stnet", "graph_stnet"} <= set(list_backbones())
    model = create_backbone("graph_stnet", in_channels=2, hidden=8)
    assert model.feature_dim == 8


# --------------------------------------------------------------------------- plugins
def test_class_plugin_appears():
    reg = _registry(GRUPlugin)
    assert reg.names() == ["tiny_gru"]
    spec = reg.get("tiny_gru")
    assert spec.plugin == "GRUPlugin" and spec.description == "GRU per region"
    assert spec.distribution is None
    model = reg.create("tiny_gru", in_channels=2, hidden=3)
    assert isinstance(model, TinyGRU) and model.feature_dim == 3


def test_module_plugin_next_to_builtins():
    reg = _registry(_module_plugin("my_plugin", "my_net"), entrypoints=True)
    assert {"stnet", "graph_stnet", "my_net"} <= set(reg.names())
    assert reg.get("my_net").plugin == "my_plugin"


def test_registries_are_independent():
    with_plugin = _registry(GRUPlugin)
    without = _registry()
    assert "tiny_gru" in with_plugin.names() and "tiny_gru" not in without.names()
    assert "tiny_gru" not in list_backbones()


def test_duplicate_name_names_both_plugins():
    with pytest.raises(ValueError, match="registered twice") as info:
        _registry(_module_plugin("first_plugin", "clash"), _module_plugin("second_plugin", "clash"))
    assert "first_plugin" in str(info.value) and "second_plugin" in str(info.value)


def test_duplicate_of_a_builtin_names_the_builtin_plugin():
    with pytest.raises(ValueError, match="registered twice") as info:
        _registry(_module_plugin("shadow", "stnet"), entrypoints=True)
    assert "plugin 'stnet'" in str(info.value) and "plugin 'shadow'" in str(info.value)


def test_unknown_name_suggests_close_matches(registry):
    with pytest.raises(KeyError) as info:
        registry.create("graph_stnt")
    message = str(info.value)
    assert "did you mean 'graph_stnet'" in message
    assert "Installed: graph_stnet" in message and "stnet" in message
    with pytest.raises(KeyError) as info:
        registry.get("zzzzzz")
    assert "did you mean" not in str(info.value)


def test_factory_returning_non_module_raises():
    reg = _registry(_module_plugin("bad_factory", "not_a_model", factory=lambda **_: "oops"))
    with pytest.raises(TypeError, match="returned str, not nn.Module"):
        reg.create("not_a_model")


def test_bad_layout_raises():
    with pytest.raises(ValueError, match="layout must be one of") as info:
        _registry(_module_plugin("bad_layout", "mesh_net", layout="mesh"))
    assert "bad_layout" in str(info.value)


def test_non_callable_factory_raises():
    with pytest.raises(TypeError, match="must be callable"):
        _registry(_module_plugin("bad_callable", "x", factory=42))


# --------------------------------------------------------------------------- adapters
class RawModel(nn.Module):
    """A third-party model with no forward_features: an encoder then a pooled head."""

    def __init__(self, hidden: int = 5):
        super().__init__()
        self.encoder = nn.Linear(2, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x, **_):
        return self.head(torch.relu(self.encoder(x[:, -1])).mean(1))


class AdapterPlugin:
    calls: list[str] = []

    @hookimpl
    def stbat_adapt_backbone(model):
        AdapterPlugin.calls.append(type(model).__name__)
        if isinstance(model, RawModel):
            return TapFeatures(model, "encoder", feature_dim=model.encoder.out_features)
        return None


class DeclinePlugin:
    @hookimpl
    def stbat_adapt_backbone(model):
        return None


def test_adapt_hook_claims_a_raw_model(nyc_taxi):
    reg = _registry(AdapterPlugin, DeclinePlugin)
    raw = RawModel()
    adapted = reg.adapt(raw)
    assert isinstance(adapted, TapFeatures)  # firstresult: one answer, not a list
    assert reg.adapt(nn.Linear(2, 2)) is None
    torch.manual_seed(0)
    model = BalancedTransfer(raw, registry=reg, region_features=nyc_taxi.poi, out_channels=2,
                             predictor_hidden=16, projector_dim=16)
    x, y = nyc_taxi.batch(0, 4)
    assert model(x).shape == (4, 1, nyc_taxi.n, 2)
    losses = model.train_iteration(x, y, model.configure_optimizers())
    assert losses.pred > 0 and losses.simdcl > 0
    assert raw.encoder.weight.grad is not None  # the raw model is trained through the tap


def test_adapt_first_result_wins():
    first = TapFeatures(RawModel(), "encoder", feature_dim=5)

    class Eager:
        @hookimpl
        def stbat_adapt_backbone(model):
            return first

    AdapterPlugin.calls.clear()
    reg = _registry(AdapterPlugin, Eager)  # pluggy calls the last registered first
    assert reg.adapt(RawModel()) is first
    assert AdapterPlugin.calls == []


def test_adapter_of_another_registry_is_not_used(empty_registry):
    with pytest.raises(stbat_plugin.BackboneContractError):
        BalancedTransfer(RawModel(), registry=empty_registry, use_simdcl=False,
                         use_weighted_loss=False)


def test_hooks_are_not_called_per_batch(nyc_taxi):
    AdapterPlugin.calls.clear()
    reg = _registry(AdapterPlugin)
    model = BalancedTransfer(RawModel(), registry=reg, use_simdcl=False,
                             use_weighted_loss=False, predictor_hidden=8)
    assert AdapterPlugin.calls == ["RawModel"]
    x, y = nyc_taxi.batch(0, 4)
    opts = model.configure_optimizers()
    for _ in range(2):
        model.train_iteration(x, y[..., :1], opts, edge_index=ring_graph(nyc_taxi.n))
    assert AdapterPlugin.calls == ["RawModel"]
