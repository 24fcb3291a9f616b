"""Pre-flight: a backbone that cannot run on a city fails before any pre-training, naming the
city, the backbone and the reason (and the per-node parameter), with a usage error in the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _cli_helpers import run_cli
from torch import nn

from stbat_plugin import TapFeatures
from stbat_plugin._registry import registry_with_plugins
from stbat_plugin.network import PredictionNetwork
from stbat_plugin.pipeline import api
from stbat_plugin.pipeline.config import TransferConfig
from stbat_plugin.pipeline.preflight import PreflightError, preflight, preflight_methods
from stbat_plugin.pipeline.tasks import source_task, target_task

ROOT = Path(__file__).parents[1]
PLUGIN = ROOT / "examples" / "plugin_wrapped_models.py"
TINY = ROOT / "data" / "tiny"
SMALL = {"val_days": 3, "test_days": 4, "max_epochs": 1, "finetune_epochs": 1,
         "max_batches_per_epoch": 2, "batch_size": 8, "source_span": "2019-03-25:2019-03-31"}


@pytest.fixture(scope="module")
def plugins():
    return registry_with_plugins([str(PLUGIN)])


@pytest.fixture(scope="module")
def cities():
    config = TransferConfig(**SMALL)
    taxi = source_task(api.load(TINY, "nyc_taxi", config.source_span), config)
    melbourne = target_task(api.load(TINY, "melbourne_pedestrian", None), 3, config)
    return taxi, melbourne


def _no_pretraining(monkeypatch) -> list:
    called: list = []
    monkeypatch.setattr(api, "_pretrain", lambda *a, **k: called.append(a) or pytest.fail(
        "pre-training started"))
    return called


def test_defect_node_embeddings_are_refused_before_pretraining(monkeypatch, plugins):
    """Old: found out after the whole pre-training, by a raw RuntimeError on the target."""
    called = _no_pretraining(monkeypatch)
    config = TransferConfig(backbone="node_embedding_net", backbone_kwargs={"num_nodes": 69},
                            **SMALL)
    with pytest.raises(PreflightError) as info:
        api.transfer(TINY, ["nyc_taxi"], "melbourne_pedestrian", methods=["stbat"],
                     config=config, registry=plugins, progress=False)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and not called
    assert "backbone 'node_embedding_net'" in message
    assert "target city 'melbourne_pedestrian' (n=55 regions)" in message
    assert "It ran on source city 'nyc_taxi' (n=69)" in message
    assert "'node_embedding' [69, 16] are sized to 69 regions" in message


def test_defect_the_cli_refuses_it_with_a_usage_error(tmp_path):
    code, out, err = run_cli(
        ["transfer", "--plugin", PLUGIN, "--data-dir", TINY, "--source", "nyc_taxi", "--target",
         "melbourne_pedestrian", "--methods", "stbat", "--backbone", "node_embedding_net",
         "--backbone-kwargs", '{"num_nodes": 69}', "--out", tmp_path / "out", "--quiet",
         "--val-days", "3", "--test-days", "4"])
    assert code == 2 and "Traceback" not in err
    assert "stbat transfer: error: Pre-flight" in err and "'node_embedding' [69, 16]" in err
    assert not (tmp_path / "out").exists()


def test_pretrain_with_sources_of_one_n_probes_one_region_more(monkeypatch, plugins):
    _no_pretraining(monkeypatch)
    config = TransferConfig(backbone="node_embedding_net", backbone_kwargs={"num_nodes": 69},
                            **SMALL)
    with pytest.raises(PreflightError, match=r"one region more \(ring graph\) \(n=70.*"
                                             r"'node_embedding' \[69, 16\]"):
        api.pretrain(TINY, ["nyc_taxi", "nyc_bike"], config=config, registry=plugins,
                     progress=False)


def test_a_window_the_backbone_was_not_built_for(monkeypatch, plugins):
    _no_pretraining(monkeypatch)
    config = TransferConfig(backbone="readme_mynet", window=6, **SMALL)  # MyNet built for 24
    with pytest.raises(PreflightError, match=r"'readme_mynet' does not run on source city "
                                             r"'nyc_taxi' \(n=69 regions\): RuntimeError"):
        api.pretrain(TINY, ["nyc_taxi"], config=config, registry=plugins, progress=False)


def test_compatible_backbones_pass_and_are_left_alone(cities):
    for backbone in ("graph_stnet", "pdformer"):
        config = TransferConfig(backbone=backbone, **SMALL)
        preflight_methods(["stbat", "finetune", "linear", "persistence"], list(cities), config)


class Lazy(nn.Module):
    """(Re)creates a per-region parameter at the n of each input."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 4))

    def forward(self, x):
        if self.weight.shape[0] != x.shape[2]:
            self.weight = nn.Parameter(torch.zeros(x.shape[2], 4))
        return x[:, -1, :, :1] + self.weight


def test_parameters_created_per_city_are_refused(cities):
    net = PredictionNetwork(TapFeatures(Lazy(), "", feature_dim=4))
    with pytest.raises(PreflightError, match=r"target city 'melbourne_pedestrian'.*change shape "
                                             r"with the city: 'weight' \[69, 4\] "
                                             r"-> \[55, 4\]"):
        preflight(net, list(cities), backbone="lazy")


def test_a_model_built_for_another_city_names_its_parameter(monkeypatch, plugins):
    _no_pretraining(monkeypatch)
    config = TransferConfig(backbone="node_embedding_net", backbone_kwargs={"num_nodes": 100},
                            **SMALL)
    with pytest.raises(PreflightError, match=r"source city 'nyc_taxi' \(n=69 regions\).*It ran on "
                                             r"a copy of it with 100 regions.*'node_embedding' "
                                             r"\[100, 16\] are sized to 100"):
        api.pretrain(TINY, ["nyc_taxi"], config=config, registry=plugins, progress=False)
