"""The method registry and the settings dataclass as the single sources of truth."""

from __future__ import annotations

import numpy as np
import pytest
from _cli_helpers import run_cli
from test_pipeline_protocol import TINY, tiny_config

from stbat_plugin.pipeline import api, method_registry
from stbat_plugin.pipeline.cli import build_parser
from stbat_plugin.pipeline.config import TransferConfig, setting_fields
from stbat_plugin.pipeline.method_registry import METHODS, Method, get_method, register_method
from stbat_plugin.pipeline.results import results_table


def test_every_entry_declares_its_capabilities():
    assert {"stbat", "finetune", "maml", "linear", "target-only", "arima", "ha", "persistence",
            "seasonal"} <= set(METHODS)
    for name, m in METHODS.items():
        assert m.name == name and m.summary
        assert m.pretrains == (name in {"stbat", "finetune", "maml", "linear"})
        assert m.zero_shot == (name in {"stbat", "finetune", "maml", "linear", "persistence",
                                        "seasonal"})


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="choose from.*persistence"):
        get_method("arima2")
    with pytest.raises(ValueError, match="already registered"):
        register_method(METHODS["ha"])


def test_a_new_method_is_one_entry(monkeypatch):
    """One register_method call: the API runs it, zero-shot included; the table lists it."""
    monkeypatch.setattr(method_registry, "METHODS", dict(METHODS))

    def zeros(net, task, config, seed, registry, progress):
        fc = METHODS["persistence"].adapt(net, task, config, seed, registry, progress)
        fc.pred = fc.pred * 0
        return fc

    register_method(Method("zero", "always predicts 0", zeros, zero_shot=True, horizon_one=True))
    rows = api.transfer(TINY, ["nyc_bike"], "melbourne_pedestrian", train_days=[3, 0],
                        methods=["zero", "persistence"], config=tiny_config(), progress=False)
    assert {(r["method"], r["train_days"]) for r in rows} == {
        (m, d) for m in ("zero", "persistence") for d in (3, 0)}
    zero = [r for r in rows if r["method"] == "zero" and r["channel"] == "mean"]
    assert all(r["rmse"] > 0 for r in zero)
    assert "| zero |" in results_table(rows)


def test_seasonal_reports_the_lag_it_chose_on_validation():
    cfg = tiny_config(val_days=10, test_days=4)
    rows = api.transfer(TINY, [], "melbourne_pedestrian", train_days=[3, 0],
                        methods=["seasonal", "persistence"], config=cfg, progress=False)
    for r in rows:
        if r["method"] == "seasonal":
            scores = r["info"]["val_rmse_by_lag"]
            assert set(scores) == {24, 168}
            assert r["info"]["lag"] == min(scores, key=scores.__getitem__)
        assert len(r["regions"]["rmse"]) == 55 and r["info"]["region_volume"][0] is not None


def test_horizon_one_methods_are_refused_before_training(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("trained before checking")

    monkeypatch.setattr(api, "_pretrain", forbidden)
    with pytest.raises(ValueError, match="one step ahead"):
        api.transfer(TINY, ["nyc_bike"], "melbourne_pedestrian", methods=["stbat", "ha"],
                     config=tiny_config(horizon=3), progress=False)


def test_stbat_rows_carry_riam_density_of_the_target_regions():
    rows = api.transfer(TINY, ["nyc_bike"], "melbourne_pedestrian", train_days=[3],
                        methods=["stbat"], config=tiny_config(), progress=False)
    dens = rows[0]["info"]["region_log_density"]
    assert len(dens) == 55
    vals = [d for d in dens if d is not None]
    assert len(vals) >= 50 and np.isfinite(vals).all() and np.std(vals) > 0


def _flags(parser, command: str) -> set[str]:
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {o for a in sub._actions for o in a.option_strings}


@pytest.mark.parametrize("command", ["transfer", "pretrain", "adapt"])
def test_every_setting_has_a_flag_with_help(command):
    flags = _flags(build_parser(), command)
    for f in setting_fields():  # the TransferConfig fields and those of TransferConfig.stbat
        flag = "--" + (f.metadata.get("flag") or f.name).replace("_", "-")
        assert flag in flags, f"no flag for {f.name}"
        assert f.metadata["help"]


def test_flags_map_onto_the_config_and_unset_flags_keep_the_defaults():
    from stbat_plugin.pipeline.cli import _config

    args = build_parser().parse_args(
        ["transfer", "--data-dir", "d", "--source", "a", "--target", "b", "--out", "o",
         "--lr", "0.01", "--no-simdcl", "--normalize", "revin", "--time-features",
         "--backbone-kwargs", '{"hidden": 8}'])
    cfg = _config(args)
    assert cfg.lr == 0.01 and cfg.finetune_lr == TransferConfig().finetune_lr  # --lr is --lr only
    assert not cfg.stbat.use_simdcl and cfg.normalize == "revin" and cfg.time_features
    assert cfg.backbone_kwargs == {"hidden": 8}
    default = _config(build_parser().parse_args(
        ["transfer", "--data-dir", "d", "--source", "a", "--target", "b", "--out", "o"]))
    assert default == TransferConfig()


@pytest.mark.parametrize("methods", [",", ",,", "persistence,nope"])
def test_empty_or_unknown_method_lists_are_usage_errors(tmp_path, methods):
    code, _, err = run_cli(["transfer", "--data-dir", TINY, "--source", "nyc_bike", "--target",
                            "melbourne_pedestrian", "--out", tmp_path, "--methods", methods])
    assert code == 2 and ("--methods" in err or "unknown method" in err)


def test_meaningless_runs_are_refused_before_training():
    with pytest.raises(ValueError, match="nothing to run"):
        api.transfer(TINY, ["nyc_bike"], "melbourne_pedestrian", seeds=0,
                     config=tiny_config(), progress=False)
    with pytest.raises(ValueError, match="max_batches_per_epoch"):
        tiny_config(max_batches_per_epoch=0)
