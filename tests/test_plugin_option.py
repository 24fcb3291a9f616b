"""Registry plumbing: every method builds its network through the given registry, and the
API and the CLI (``--plugin``) take the plugins to use. Plugins here are example files that
are not installed: the models in them are ``forward(x)`` models nobody wrote for STBaT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _cli_helpers import run_cli

from stbat_plugin import BackboneRegistry, build_plugin_manager
from stbat_plugin._registry import load_plugin, registry_with_plugins
from stbat_plugin.pipeline import api
from stbat_plugin.pipeline.config import TransferConfig
from stbat_plugin.pipeline.methods import build_network
from stbat_plugin.testing import check_backbone

ROOT = Path(__file__).parents[1]
FAMILY = f"{ROOT / 'examples' / 'plugin_family_adapter.py'}:TheirFamilyPlugin"
WRAPPED = str(ROOT / "examples" / "plugin_wrapped_models.py")
TINY = ROOT / "data" / "tiny"
TINY_RUN = ["--data-dir", TINY, "--source", "nyc_taxi", "--target", "melbourne_pedestrian",
            "--train-days", "3", "--seeds", "1", "--val-days", "3", "--test-days", "4",
            "--max-epochs", "1", "--finetune-epochs", "1", "--max-batches-per-epoch", "2",
            "--batch-size", "8", "--source-span", "2019-03-25:2019-03-31", "--quiet"]


def test_defect_build_network_resolves_through_the_given_registry():
    """Old: ``resolve_backbone`` got the default registry, so a model claimed by an explicit
    plugin trained with "stbat" (which passed it on) but failed with "finetune"."""
    family = load_plugin(FAMILY)
    registry = BackboneRegistry(build_plugin_manager(plugins=[family]))  # not installed
    net = build_network(TransferConfig(backbone="their_mlp"), registry)
    x = torch.rand(2, 24, 7, 2)  # the series and its default 1-day lag input
    assert net(x, edge_index=torch.zeros(2, 0, dtype=torch.long)).shape == (2, 1, 7, 1)


@pytest.mark.parametrize("backbone", ["their_mlp", "their_tcn"])
def test_family_models_pass_check_backbone_through_the_plugin(backbone):
    registry = registry_with_plugins([FAMILY])
    report = check_backbone(registry.create(backbone), window=24, registry=registry)
    assert not report.strict and report.unreached == ("readout.weight", "readout.bias")


def test_defect_cli_transfer_with_a_plugin_trains_every_method(tmp_path):
    """``forward(x)`` models of a plugin file through ``stbat transfer``: stbat and finetune."""
    code, out, err = run_cli(["transfer", "--plugin", FAMILY, "--backbone", "their_mlp",
                              "--methods", "stbat,finetune", "--out", tmp_path, *TINY_RUN])
    assert code == 0, err
    rows = json.loads((tmp_path / "results.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert {r["method"] for r in rows} == {"stbat", "finetune"}
    assert {r["backbone"] for r in rows} == {"their_mlp"}


def test_readme_model_runs_through_stbat_transfer_as_a_plugin(tmp_path):
    readme = (ROOT / "README.md").read_text()
    plugin_source = Path(WRAPPED).read_text()
    start = readme.index("class MyNet")
    assert readme[start:readme.index("\npoi = ", start)].strip() in plugin_source  # the same model
    code, out, err = run_cli(["transfer", "--plugin", WRAPPED, "--backbone", "readme_mynet",
                              "--methods", "stbat", "--out", tmp_path, *TINY_RUN])
    assert code == 0, err
    assert "stbat" in out


def test_readme_model_passes_check_backbone():
    model = load_plugin(f"{WRAPPED}:MyNet")
    report = check_backbone(model, tap="encoder", feature_dim=32)
    assert report.unreached == ("out.weight", "out.bias") and report.dtype == torch.float32


def test_pretrain_and_adapt_take_the_registry(tmp_path):
    registry = registry_with_plugins([FAMILY])
    config = TransferConfig(backbone="their_mlp", val_days=3, test_days=4, max_epochs=1,
                            max_batches_per_epoch=2, batch_size=8, finetune_epochs=1,
                            source_span="2019-03-25:2019-03-31")
    api.pretrain(TINY, ["nyc_taxi"], method="finetune", config=config, save=tmp_path / "m.ckpt",
                 registry=registry, progress=False)
    metrics = api.adapt(tmp_path / "m.ckpt", TINY, "melbourne_pedestrian", 0, registry=registry,
                        progress=False)
    assert metrics["mean"]["rmse"] > 0


def test_cli_backbones_lists_plugin_models_and_bad_plugins_are_usage_errors():
    code, out, _ = run_cli(["backbones", "--plugin", WRAPPED])
    assert code == 0 and "readme_mynet" in out and "node_embedding_net" in out
    code, _, err = run_cli(["backbones", "--plugin", "no_such_module_here"])
    assert code == 2 and "plugin 'no_such_module_here': cannot import" in err
    code, _, err = run_cli(["backbones", "--plugin", f"{WRAPPED}:Missing"])
    assert code == 2 and "has no attribute 'Missing'" in err
