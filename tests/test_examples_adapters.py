"""The adapter examples run (fast) and do what they claim: tap, and a family-claiming plugin."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch
from _examples import load_example
from torch import nn

from stbat_plugin import (
    BackboneContractError,
    BackboneRegistry,
    BalancedTransfer,
    TapFeatures,
    build_plugin_manager,
)
from stbat_plugin.testing import check_backbone


@pytest.fixture(scope="module")
def foreign() -> ModuleType:
    return load_example("adapt_foreign_model")


@pytest.fixture(scope="module")
def family() -> ModuleType:
    return load_example("plugin_family_adapter")


def test_adapt_foreign_model_main_trains(foreign, tiny_data_dir):
    torch.manual_seed(0)
    totals = foreign.main(root=tiny_data_dir, steps=3)
    assert len(totals) == 3 and all(math.isfinite(v) for v in totals)


def test_tap_gives_per_region_features_without_editing_the_model(foreign, nyc_taxi):
    their = foreign.TheirForecaster()
    model = BalancedTransfer(their, tap="encoder", feature_dim=32, tap_rearrange="b d n -> b n d",
                             region_features=nyc_taxi.poi, out_channels=2)
    x, _ = nyc_taxi.batch(size=3)
    assert model.net.forward_features(x).shape == (3, nyc_taxi.n, 32)
    assert not hasattr(their, "forward_features") and model(x).shape == (3, 1, nyc_taxi.n, 2)


def test_plugin_family_adapter_main_trains(family, tiny_data_dir):
    torch.manual_seed(0)
    totals = family.main(root=tiny_data_dir, steps=2)
    assert set(totals) == {"TheirMLPNet", "TheirTCNNet"}
    assert all(math.isfinite(v) for run in totals.values() for v in run)


def test_family_plugin_claims_every_subclass_and_nothing_else(family, empty_registry, nyc_taxi):
    registry = BackboneRegistry(build_plugin_manager(plugins=[family.TheirFamilyPlugin()]))
    for net in (family.TheirMLPNet(), family.TheirTCNNet()):
        extractor = registry.adapt(net)
        assert isinstance(extractor, TapFeatures) and extractor.feature_dim == net.hidden
    assert registry.adapt(nn.Linear(2, 2)) is None
    with pytest.raises(BackboneContractError, match="stbat_adapt_backbone"):
        BalancedTransfer(family.TheirMLPNet(), registry=empty_registry,
                         region_features=nyc_taxi.poi)


def test_foreign_forward_x_model_passes_check_backbone(foreign):
    """Old: ``TypeError: forward() got an unexpected keyword argument 'edge_index'``."""
    report = check_backbone(foreign.TheirForecaster(in_channels=1), tap="encoder", feature_dim=32,
                            tap_rearrange="b d n -> b n d")
    assert report.unreached == ("head.weight", "head.bias")


def test_defect_family_model_inside_pretrain_gets_no_graph_arguments(family, nyc_taxi):
    """Old: ``TheirMLPNet.forward(x)`` got ``edge_index`` inside ``methods.pretrain("stbat")``."""
    registry = BackboneRegistry(build_plugin_manager(plugins=[family.TheirFamilyPlugin()]))
    model = BalancedTransfer(family.TheirMLPNet(), registry=registry, out_channels=2,
                             region_features=nyc_taxi.poi)
    x, y = nyc_taxi.batch(size=4)
    losses = model.train_iteration(x, y, model.configure_optimizers(),
                                   edge_index=nyc_taxi.edge_index)
    assert math.isfinite(losses.total)


def _docs_section_blocks(title: str) -> list[str]:
    text = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    start = text.index(f"## {title}\n")
    section = text[start:text.index("\n## ", start + 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_docs_wrapping_snippets_run():
    blocks = _docs_section_blocks("Wrapping a model you did not write")
    assert len(blocks) >= 3
    for code in blocks:
        exec(compile(code, "docs/plugins.md", "exec"), {})
