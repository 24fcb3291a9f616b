"""The backbone contract (``stbat_plugin.backbone``): layout declared once, ``prepare_city``
with the city's facts, the deprecated ``prepare_city(train_flow, **graph)`` form, the
per-instance cache of the pipeline, and ``pdformer`` on 30-minute data."""

from __future__ import annotations

import types
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from _data_synth import city_arrays, hourly_stamps
from torch import Tensor, nn

from stbat_backbones.pdformer import PDFormer, semantic_neighbours
from stbat_plugin import BackboneRegistry, PredictionNetwork, build_plugin_manager, hookimpl
from stbat_plugin.backbone import Backbone, CityFacts, backbone_layout, city_context
from stbat_plugin.data import city_from_arrays
from stbat_plugin.pipeline.config import TransferConfig
from stbat_plugin.pipeline.tasks import source_task
from stbat_plugin.testing import check_backbone


class MeanNet(nn.Module):
    """Per-region mean over the window, as features; records the facts it was prepared with."""

    layout = "graph"

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.lin = nn.Linear(in_channels, 4)
        self.feature_dim = 4
        self.seen: list[CityFacts] = []

    def forward_features(self, x: Tensor, scale: Tensor | None = None, **_: Any) -> Tensor:
        z = self.lin(x).mean(dim=1)
        return z if scale is None else z * scale

    def forward(self, x: Tensor, **graph: Any) -> Tensor:
        return self.forward_features(x, **graph)

    def prepare_city(self, city: CityFacts) -> dict[str, Any]:
        self.seen.append(city)
        return {"scale": torch.tensor(2.0)}


class LegacyNet(MeanNet):
    """The form of earlier versions: ``prepare_city(train_flow, **graph)``."""

    def prepare_city(self, train_flow: Tensor, edge_index: Tensor | None = None  # type: ignore[override]
                     ) -> dict[str, Any]:
        self.legacy_args = (train_flow, edge_index)
        return {"scale": torch.tensor(3.0)}


def _facts(flow: Tensor, steps_per_day: int = 24, edge_index: Tensor | None = None) -> CityFacts:
    return CityFacts(num_regions=flow.shape[1], steps_per_day=steps_per_day, train_flow=flow,
                     edge_index=edge_index)


def _registry(*plugins: object) -> BackboneRegistry:
    return BackboneRegistry(build_plugin_manager(load_entrypoints=False, plugins=plugins))


def _plugin(factory: Any, **kwargs: Any) -> types.ModuleType:
    module = types.ModuleType("contract_plugin")

    @hookimpl
    def stbat_register_backbones(register):
        register("net", factory, **kwargs)

    module.stbat_register_backbones = stbat_register_backbones  # type: ignore[attr-defined]
    return module


# --------------------------------------------------------------------------- the Protocol
def test_a_full_backbone_satisfies_the_protocol_and_its_context_is_used():
    net = MeanNet()
    assert isinstance(net, Backbone) and backbone_layout(net) == "graph"
    flow = torch.rand(48, 5, 1)
    assert city_context(net, _facts(flow)) == {"scale": torch.tensor(2.0)}
    assert net.seen[0].num_regions == 5 and net.seen[0].train_flow is flow


def test_city_facts_are_checked():
    with pytest.raises(ValueError, match=r"train_flow.*\[T, n=4, c\]"):
        CityFacts(num_regions=4, steps_per_day=24, train_flow=torch.rand(10, 5, 1))
    with pytest.raises(ValueError, match="coords"):
        CityFacts(num_regions=4, steps_per_day=24, train_flow=torch.rand(10, 4, 1),
                  coords=torch.rand(4, 3))
    with pytest.raises(ValueError, match="steps_per_day"):
        CityFacts(num_regions=4, steps_per_day=0, train_flow=torch.rand(10, 4, 1))


def test_the_old_prepare_city_form_still_works_with_a_deprecation_warning():
    net, flow, ei = LegacyNet(), torch.rand(30, 5, 1), torch.tensor([[0, 1], [1, 0]])
    with pytest.warns(DeprecationWarning, match=r"prepare_city\(self, city: CityFacts\)"):
        context = city_context(net, _facts(flow, edge_index=ei))
    assert context == {"scale": torch.tensor(3.0)}
    assert net.legacy_args[0] is flow and net.legacy_args[1] is ei


def test_a_model_without_prepare_city_gets_no_context_and_the_graph_layout():
    plain = nn.Linear(2, 2)
    assert city_context(plain, _facts(torch.rand(3, 4, 1))) == {}
    assert backbone_layout(plain) == "graph"


def test_prepare_city_must_return_a_dict():
    class Bad(MeanNet):
        def prepare_city(self, city: CityFacts) -> Any:
            return [1, 2]

    with pytest.raises(TypeError, match="must return a dict"):
        city_context(Bad(), _facts(torch.rand(3, 4, 1)))
    with pytest.raises(AssertionError, match="check 'prepare_city' failed"):
        check_backbone(Bad())


def test_check_backbone_runs_the_context_of_prepare_city():
    calls: list[CityFacts] = []

    class Recorded(MeanNet):
        def prepare_city(self, city: CityFacts) -> dict[str, Any]:
            calls.append(city)  # check_backbone works on a copy: record outside it
            return {"scale": torch.tensor(2.0)}

    check_backbone(Recorded())
    assert len(calls) == 1 and calls[0].train_flow.shape == (48, 12, 1)


# --------------------------------------------------------------------------- layout, once
def test_layout_comes_from_the_class_when_register_does_not_give_it():
    class GridNet(MeanNet):
        layout = "grid"

    assert _registry(_plugin(GridNet)).get("net").layout == "grid"
    assert _registry(_plugin(GridNet, layout="grid")).get("net").layout == "grid"  # agree
    with pytest.raises(ValueError, match=r"disagrees with GridNet.layout = 'grid'"):
        _registry(_plugin(GridNet, layout="graph"))


def test_a_function_factory_is_checked_when_it_builds_its_model():
    class GridNet(MeanNet):
        layout = "grid"

    registry = _registry(_plugin(lambda: GridNet(), layout="graph"))
    with pytest.raises(ValueError, match="registered with layout 'graph'.*declares layout 'grid'"):
        registry.create("net")


def test_an_unknown_layout_is_refused_naming_the_choices():
    class MeshNet(MeanNet):
        layout = "mesh"

    with pytest.raises(TypeError, match=r"MeshNet.layout must be one of \['graph', 'grid'\]"):
        PredictionNetwork(MeshNet())


def test_builtins_declare_their_layout_once(registry):
    for spec in registry.specs():
        assert backbone_layout(registry.create(spec.name)) == spec.layout, spec.name


# --------------------------------------------------------------------------- the pipeline
def _half_hourly_city(days: int = 6, n: int = 6):
    """A 30-minute city whose regions 0-2 peak in the morning and 3-5 in the evening."""
    steps = 48 * days
    t = np.arange(steps) % 48
    morning, evening = np.exp(-((t - 16) ** 2) / 8.0), np.exp(-((t - 36) ** 2) / 8.0)
    rng = np.random.default_rng(0)
    flow = np.stack([morning] * (n // 2) + [evening] * (n - n // 2), axis=1)[..., None]
    flow = (10 * flow + rng.random(flow.shape)).astype(np.float32)
    coords = np.stack([40 + np.arange(n) * 0.01, -74 + np.arange(n) * 0.01], axis=1)
    arrays = city_arrays(num_steps=steps, num_regions=n, num_channels=1, flow=flow,
                         timestamps=hourly_stamps(steps, minutes=30), coords=coords)
    return city_from_arrays("half_hourly", arrays)


def test_the_pipeline_hands_prepare_city_the_training_slice_and_steps_per_day():
    task = source_task(_half_hourly_city(), TransferConfig(window=6))
    backbone = MeanNet()
    kwargs = task.graph_kwargs(PredictionNetwork(backbone), "cpu")
    facts = backbone.seen[0]
    train = task.split.train
    assert facts.steps_per_day == 48 and facts.num_regions == 6
    assert facts.train_flow.shape == (train.stop - train.start, 6, 1)
    assert torch.equal(facts.train_flow, torch.as_tensor(task.scaled[train]))
    assert facts.coords is not None and facts.coords.shape == (6, 2)
    assert torch.equal(facts.edge_index, kwargs["edge_index"])
    assert kwargs["scale"] == torch.tensor(2.0)


def test_pdformer_folds_daily_profiles_by_the_citys_steps_per_day():
    task = source_task(_half_hourly_city(), TransferConfig(window=6))
    model = PDFormer(semantic_k=2)
    got = task.graph_kwargs(PredictionNetwork(model), "cpu")["semantic_index"]
    train = torch.as_tensor(task.scaled[task.split.train])
    assert torch.equal(got, semantic_neighbours(train, 2, 48))
    # the morning regions find each other; folding by 24 (the old fixed value) mixes them up
    neighbours = got[0].reshape(6, 2)
    assert (neighbours[:3] < 3).all() and (neighbours[3:] >= 3).all()
    assert not torch.equal(got, semantic_neighbours(train, 2, 24))


def test_the_context_is_cached_per_model_instance_not_per_class():
    task = source_task(_half_hourly_city(), TransferConfig(window=6))
    few, many = PredictionNetwork(PDFormer(semantic_k=1)), PredictionNetwork(PDFormer(semantic_k=3))
    assert task.graph_kwargs(few, "cpu")["semantic_index"].shape[1] == 6 * 1
    assert task.graph_kwargs(many, "cpu")["semantic_index"].shape[1] == 6 * 3
    assert task.graph_kwargs(few, "cpu") is task.graph_kwargs(few, "cpu")  # computed once


def test_a_legacy_plugin_runs_through_the_pipeline_with_a_warning():
    task = source_task(_half_hourly_city(), TransferConfig(window=6))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kwargs = task.graph_kwargs(PredictionNetwork(LegacyNet()), "cpu")
    assert kwargs["scale"] == torch.tensor(3.0)
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
