"""``TransferConfig.stbat``: the STBaT settings nested once, flat in flags, files and rows.

The settings are declared in ``STBaTOptions`` only; ``TransferConfig`` nests them, the CLI
makes one flag of each, and the flat names of earlier files (checkpoints, result rows in
``docs/study``, experiment specs) still read.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import pytest
import torch
from _cli_helpers import run_cli

from stbat_plugin import STBaTOptions
from stbat_plugin.pipeline import api
from stbat_plugin.pipeline.cli import _config, build_parser
from stbat_plugin.pipeline.config import STBAT_FIELDS, TransferConfig, setting_fields
from stbat_plugin.pipeline.experiment import load_spec
from stbat_plugin.pipeline.methods import _build_stbat

REPO = Path(__file__).parents[1]
PARSE = ["transfer", "--data-dir", "d", "--source", "a", "--target", "b", "--out", "o"]


def test_the_pipeline_default_differs_from_the_wrappers_in_simdcl_weight_only():
    pipeline, core = TransferConfig().stbat, STBaTOptions()
    assert pipeline == dataclasses.replace(core, simdcl_weight=0.01)


def test_to_dict_is_flat_and_round_trips():
    config = TransferConfig.from_dict({"window": 6, "tau": 3.0, "use_poi": False})
    flat = config.to_dict()
    assert "stbat" not in flat and flat["tau"] == 3.0 and flat["use_poi"] is False
    assert set(flat) == {f.name for f in setting_fields()}
    assert TransferConfig.from_dict(flat) == config
    assert config.stbat.tau == 3.0 and config.window == 6


def test_from_dict_takes_the_nested_shape_too_but_not_both():
    nested = TransferConfig.from_dict({"window": 6, "stbat": {"tau": 3.0}})
    assert nested.stbat.tau == 3.0 and nested.stbat.simdcl_weight == 0.01  # pipeline default
    assert TransferConfig.from_dict(dataclasses.asdict(nested)) == nested
    with pytest.raises(ValueError, match=r"\['tau'\] are given twice"):
        TransferConfig.from_dict({"tau": 1.0, "stbat": {"tau": 3.0}})
    with pytest.raises(ValueError, match=r"Unknown config keys \['taus'\]"):
        TransferConfig.from_dict({"taus": 1.0})
    with pytest.raises(ValueError, match="loss must be one of"):
        TransferConfig.from_dict({"loss": "maee"})


@pytest.mark.parametrize("name", ["results_a", "results_b", "results_c"])
def test_result_rows_of_earlier_runs_still_read(name):
    with gzip.open(REPO / "docs" / "study" / f"{name}.jsonl.gz", "rt") as fh:
        rows = [json.loads(line) for line in fh]
    for row in rows[:: max(1, len(rows) // 20)]:
        config = TransferConfig.from_dict(row["config"])
        assert config.to_dict().items() >= {k: v for k, v in row["config"].items()
                                            if k in STBAT_FIELDS}.items()
        assert row["method"] in (api.method_label(row["method"].split()[0], config),
                                 row["method"])


def test_spec_files_with_flat_stbat_names_still_build():
    spec = load_spec(REPO / "examples" / "experiments" / "paper_ablation.toml")
    configs = {t.name: spec.config(t, spec.variants()[0]) for t in spec.tasks}
    assert configs["nyc2mel.no-poi"].stbat.use_poi is False
    assert configs["nyc2mel.no-wloss"].stbat.use_weighted_loss is False
    assert api.method_label("stbat", configs["nyc2mel.no-simdcl"]) == "stbat (w/o SimDCL)"
    sweep = load_spec(REPO / "examples" / "experiments" / "paper_sensitivity.toml")
    d8 = next(t for t in sweep.tasks if t.name == "D-8")
    assert sweep.config(d8, sweep.variants()[0]).stbat.embed_dim == 8


def test_every_stbat_setting_is_a_flag_with_its_old_name():
    args = build_parser().parse_args(PARSE + ["--embed-dim", "8", "--bandwidth", "0.5",
                                              "--tau", "2", "--beta", "0.1",
                                              "--simdcl-weight", "0.5", "--no-poi", "--no-fdp",
                                              "--no-simdcl", "--no-wloss", "--simdcl-chunk", "64",
                                              "--simdcl-anchors", "32", "--loss", "huber"])
    assert _config(args).stbat == STBaTOptions(
        embed_dim=8, bandwidth=0.5, tau=2.0, beta=0.1, simdcl_weight=0.5, use_poi=False,
        use_fdp=False, use_simdcl=False, use_weighted_loss=False, simdcl_chunk=64,
        simdcl_anchors=32, loss="huber")
    assert _config(build_parser().parse_args(PARSE)) == TransferConfig()


def test_help_shows_the_stbat_settings_with_the_pipeline_defaults():
    code, out, _ = run_cli(["transfer", "--help"])
    assert code == 0 and "STBaT settings" in out
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["transfer"]
    helps = {o: a.help for a in sub._actions for o in a.option_strings}
    assert helps["--simdcl-weight"].endswith("(default: 0.01)")
    assert "(default: 'mse')" in helps["--loss"]
    code, _, err = run_cli(PARSE + ["--loss", "maee"])
    assert code == 2 and "invalid choice: 'maee'" in err


def test_build_stbat_passes_the_options_unchanged(registry, nyc_taxi):
    config = TransferConfig.from_dict({"backbone_kwargs": {"channels": 8, "hidden": 16},
                                       "tau": 0.5, "use_fdp": False})
    model = _build_stbat([], config, {"default": nyc_taxi.poi.numpy()}, registry)
    assert model.options is config.stbat
    assert model.riam is not None and model.riam.fdp_mu is None


def test_the_flat_names_of_earlier_versions_work_with_a_warning():
    with pytest.warns(DeprecationWarning, match=r"TransferConfig\(tau=...\) is deprecated"):
        config = TransferConfig(tau=2.0, window=6)
    assert config.stbat.tau == 2.0 and config.stbat.simdcl_weight == 0.01
    with pytest.warns(DeprecationWarning, match="use TransferConfig.stbat.tau"):
        assert config.tau == 2.0
    with pytest.warns(DeprecationWarning):
        config.beta = 0.5  # not a silent new attribute: it reaches the options
    assert config.stbat.beta == 0.5 and "beta" not in vars(config)
    with pytest.raises(AttributeError):
        _ = config.no_such_setting


def test_a_checkpoint_config_written_flat_loads(tmp_path):
    from stbat_plugin.pipeline.checkpoint import load_checkpoint, save_checkpoint

    config = TransferConfig.from_dict({"use_simdcl": False, "embed_dim": 16})
    path = save_checkpoint(tmp_path / "m.ckpt", {"w": torch.zeros(1)}, config=config,
                           method="stbat", data={})
    saved = load_checkpoint(path)["config"]
    assert saved["use_simdcl"] is False and "stbat" not in saved
    assert TransferConfig.from_dict(saved) == config


def test_a_run_written_before_a_setting_existed_still_resumes(tmp_path):
    import json as _json

    from stbat_plugin.pipeline.runfolder import RUN_FILE, RunFolder

    identity = {"command": "transfer", "sources": ["a"], "target": "b",
                "config": TransferConfig().to_dict()}
    older = {**identity, "config": {k: v for k, v in identity["config"].items()
                                    if k not in ("loss", "projector_dim", "min_sigma")}}
    (tmp_path / RUN_FILE).write_text(_json.dumps(older))
    with RunFolder(tmp_path, resume=True).open(identity) as done:
        assert done == set()
    other = {**identity, "config": {**identity["config"], "tau": 3.0}}
    with pytest.raises(ValueError, match="tau: was 1.0, now 3.0"), \
            RunFolder(tmp_path, resume=True).open(other):
        pass
