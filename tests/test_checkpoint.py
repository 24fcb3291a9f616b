"""Pre-train once, adapt everywhere: ``stbat pretrain --save`` / ``stbat adapt --checkpoint``.

The checkpoint round trip must give exactly the metrics of the in-memory path, carry what
is needed to rebuild and check the network, refuse mismatched settings clearly, and be
written atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _cli_helpers import run_cli

import stbat_plugin
from stbat_plugin.pipeline import api
from stbat_plugin.pipeline.checkpoint import (
    FORMAT,
    CheckpointError,
    checkpoint_config,
    from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from stbat_plugin.pipeline.config import TransferConfig

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny"
SOURCE_SPAN = "2019-03-25:2019-03-31"
SMALL_NET = {"channels": 8, "hidden": 16}
TARGET = "melbourne_pedestrian"
TINY_RUN = ["--val-days", "3", "--test-days", "4", "--max-epochs", "1", "--finetune-epochs", "1",
            "--max-batches-per-epoch", "2", "--batch-size", "8", "--quiet"]
PRETRAIN_ARGS = ["--data-dir", str(TINY), "--source", "nyc_bike", "--source-span", SOURCE_SPAN,
                 "--backbone-kwargs", json.dumps(SMALL_NET), "--seed", "0", *TINY_RUN]


def the_config() -> TransferConfig:
    """The config the CLI builds from PRETRAIN_ARGS (CLI --lr sets finetune_lr too)."""
    return TransferConfig(val_days=3, test_days=4, max_epochs=1, finetune_epochs=1,
                          max_batches_per_epoch=2, batch_size=8, backbone_kwargs=dict(SMALL_NET),
                          source_span=SOURCE_SPAN)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A checkpoint written by ``stbat pretrain``."""
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    code, out, err = run_cli(["pretrain", *PRETRAIN_ARGS, "--save", path])
    assert code == 0, err
    assert f"saved {path}" in out
    return path


@pytest.fixture(scope="module")
def in_memory():
    """The same pre-training through the Python API, kept in memory."""
    return api.pretrain(TINY, ["nyc_bike"], method="stbat", config=the_config(), seed=0,
                        progress=False)


def _adapt_cli(ckpt: Path, days: int, *extra) -> dict:
    code, out, err = run_cli(["adapt", "--checkpoint", ckpt, "--data-dir", TINY, "--target", TARGET,
                              "--train-days", days, "--seed", "0", *TINY_RUN, *extra])
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("days", [3, 0])
def test_adapt_prints_metrics(ckpt, days):
    # no --backbone/--backbone-kwargs: the checkpoint's own model settings are used
    result = _adapt_cli(ckpt, days)
    assert set(result) == {"pedestrians", "mean"}
    for vals in result.values():
        assert set(vals) == {"rmse", "mae"}
        assert math.isfinite(vals["rmse"]) and 0 < vals["mae"] <= vals["rmse"]


@pytest.mark.parametrize("days", [3, 0])
def test_checkpoint_round_trip_gives_the_in_memory_metrics(ckpt, in_memory, tmp_path, days):
    cfg = the_config()
    direct = api.adapt(in_memory, TINY, TARGET, days, config=cfg, seed=0, progress=False)
    saved = tmp_path / "api.ckpt"
    api.pretrain(TINY, ["nyc_bike"], config=cfg, seed=0, save=saved, progress=False)
    via_api = api.adapt(saved, TINY, TARGET, days, config=cfg, seed=0, progress=False)
    via_cli = _adapt_cli(ckpt, days, "--backbone-kwargs", json.dumps(SMALL_NET))
    for other in (via_api, via_cli):
        assert set(other) == set(direct)
        for ch in direct:
            for metric in ("rmse", "mae"):
                assert other[ch][metric] == pytest.approx(direct[ch][metric], rel=1e-5, abs=1e-5)
    # the in-memory network is not changed by adapting it (each adaptation fine-tunes a copy)
    again = api.adapt(in_memory, TINY, TARGET, days, config=cfg, seed=0, progress=False)
    assert again["mean"]["rmse"] == pytest.approx(direct["mean"]["rmse"], rel=1e-6)


def test_cli_and_api_pretraining_save_the_same_weights(ckpt, in_memory):
    state = load_checkpoint(ckpt)["state_dict"]
    mine = in_memory.net.state_dict()
    assert state.keys() == mine.keys()
    for key, value in mine.items():
        torch.testing.assert_close(state[key], value.cpu(), rtol=1e-6, atol=1e-6)


def test_checkpoint_carries_config_version_backbone_and_data(ckpt):
    payload = load_checkpoint(ckpt)
    assert payload["format"] == FORMAT
    assert payload["library_version"] == stbat_plugin.__version__
    assert payload["method"] == "stbat"
    assert payload["backbone"] == "graph_stnet"
    assert TransferConfig.from_dict(payload["config"]) == the_config()
    data = payload["data"]
    assert data["sources"] == ["nyc_bike"] and data["descriptors"] == "poi" and data["seed"] == 0
    assert data["channels"] == {"nyc_bike": ["pickup", "dropoff"]}
    start, end = data["spans"]["nyc_bike"]
    assert start.startswith("2019-03-25") and end.startswith("2019-03-31T23")
    assert all(isinstance(v, torch.Tensor) for v in payload["state_dict"].values())


@pytest.mark.parametrize("extra, words", [
    (["--backbone", "stnet"], ["graph_stnet", "stnet", "--backbone graph_stnet"]),
    (["--window", "4"], ["window", "(24, 4)"]),
    (["--backbone-kwargs", '{"channels": 8, "hidden": 32}'], ["backbone_kwargs"]),
])
def test_adapt_with_mismatched_settings_is_a_clear_error(ckpt, extra, words):
    code, out, err = run_cli(["adapt", "--checkpoint", ckpt, "--data-dir", TINY, "--target",
                              TARGET, "--train-days", "0", *TINY_RUN, *extra])
    assert code == 2, err
    assert err.startswith("stbat adapt: error:") and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert out == ""


def test_api_load_checks_backbone_and_config(ckpt):
    with pytest.raises(CheckpointError, match="stnet"):
        load_checkpoint(ckpt, expect_backbone="stnet")
    with pytest.raises(CheckpointError, match="horizon"):
        load_checkpoint(ckpt, expect_config=TransferConfig(backbone_kwargs=dict(SMALL_NET),
                                                           horizon=2))
    # training-only settings (epochs, lr, days) may differ from pre-training
    load_checkpoint(ckpt, expect_config=TransferConfig(backbone_kwargs=dict(SMALL_NET),
                                                       max_epochs=9, lr=0.1, val_days=7))


def test_missing_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    code, _, err = run_cli(["adapt", "--checkpoint", tmp_path / "nope.ckpt", "--data-dir", TINY,
                            "--target", TARGET, "--train-days", "0", *TINY_RUN])
    assert code == 2 and "No checkpoint" in err and "stbat pretrain --save" in err
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a torch file")
    code, _, err = run_cli(["adapt", "--checkpoint", junk, "--data-dir", TINY,
                            "--target", TARGET, "--train-days", "0", *TINY_RUN])
    assert code == 2 and "not a readable stbat checkpoint" in err
    other = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not an stbat checkpoint"):
        load_checkpoint(other)


# --------------------------------------------------------------------------- atomic writes
def test_save_leaves_only_the_checkpoint_in_its_folder(ckpt):
    assert [p.name for p in ckpt.parent.iterdir()] == ["model.ckpt"]


def test_failing_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    cfg = TransferConfig()
    save_checkpoint(path, {"w": torch.ones(3)}, config=cfg, method="stbat", data={"v": 1})
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, {"w": torch.zeros(3)}, config=cfg, method="stbat", data={"v": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.ckpt"]
    monkeypatch.undo()
    torch.testing.assert_close(load_checkpoint(path)["state_dict"]["w"], torch.ones(3))


def test_failing_save_through_the_cli_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"previous")

    def broken_save(obj, f, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    code, _, err = run_cli(["pretrain", *PRETRAIN_ARGS, "--max-batches-per-epoch", "1",
                            "--save", path, "--overwrite"])
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.ckpt"]


# --------------------------------------------------------------------------- settings
def test_adapt_reads_the_checkpoint_once(ckpt, monkeypatch):
    reads = []
    load = torch.load

    def counting_load(f, *args, **kwargs):
        reads.append(Path(f))
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    _adapt_cli(ckpt, 0)
    assert reads == [ckpt]


def test_checkpoint_settings_come_from_one_place(ckpt):
    payload = load_checkpoint(ckpt)
    # None: the checkpoint's own settings, all of them
    assert checkpoint_config(ckpt, payload) == the_config()
    # a mapping (the flags given to `stbat adapt`): model settings from the checkpoint,
    # the given ones over the defaults for the rest
    cfg = checkpoint_config(ckpt, payload, {"val_days": 7, "finetune_epochs": 2})
    assert cfg.backbone_kwargs == SMALL_NET and cfg.model_signature() == the_config().model_signature()
    assert (cfg.val_days, cfg.finetune_epochs, cfg.max_epochs) == (7, 2, TransferConfig().max_epochs)
    with pytest.raises(CheckpointError, match=r"window.*\(24, 4\)"):
        checkpoint_config(ckpt, payload, {"window": 4})
    # a whole config: used as given, its model settings checked
    with pytest.raises(CheckpointError, match="use --backbone graph_stnet"):
        checkpoint_config(ckpt, payload, TransferConfig(backbone="stnet"))
    whole = TransferConfig(backbone_kwargs=dict(SMALL_NET), lr=0.5)
    assert checkpoint_config(ckpt, payload, whole) is whole
    pre = from_checkpoint(ckpt, {"val_days": 7})
    assert pre.path == ckpt and pre.method == "stbat" and pre.config.val_days == 7
