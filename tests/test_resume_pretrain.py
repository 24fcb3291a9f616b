"""Checkpoints that resume: ``stbat pretrain --save X`` after a ``kill -9``, then ``--resume``.

The checkpoint is written after every epoch with the best network so far and the run's
state (model, optimisers, trainer bookkeeping, random generators), marked incomplete until
the end. Resuming gives bit-identical weights to an uninterrupted run; a file from another
run is never replaced without ``--overwrite``; a damaged, diverged or mismatched checkpoint
is refused with a message that names it; no temporary file outlives a killed writer.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _cli_helpers import run_cli

from stbat_plugin.pipeline import api
from stbat_plugin.pipeline import io as _io
from stbat_plugin.pipeline.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from stbat_plugin.pipeline.config import TransferConfig

REPO = Path(__file__).parents[1]
TINY = REPO / "data" / "tiny"
ARGS = ["--data-dir", str(TINY), "--source", "nyc_bike,nyc_taxi", "--source-span",
        "2019-03-25:2019-03-31", "--backbone-kwargs", '{"channels": 8, "hidden": 16}',
        "--max-epochs", "5", "--patience", "5", "--max-batches-per-epoch", "4",
        "--batch-size", "8", "--quiet", "--seed", "3"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "model.ckpt"
    code, _, err = run_cli(["pretrain", *ARGS, "--save", path])
    assert code == 0, err
    return path


def test_finished_checkpoint_is_complete_with_its_epoch(reference):
    payload = load_checkpoint(reference)
    assert payload["complete"] is True and payload["epoch"] == 5 and "resume" not in payload


@pytest.mark.parametrize("method", ["stbat", "finetune"])
def test_resume_after_an_interrupted_epoch_gives_identical_weights(tmp_path, method, reference):
    """Stopped after epoch 2 (the incomplete checkpoint of a 5-epoch run), then resumed."""
    full, part = tmp_path / "full.ckpt", tmp_path / "part.ckpt"
    args = [*ARGS, "--method", method]
    if method == "stbat":
        full = reference
    else:
        assert run_cli(["pretrain", *args, "--save", full])[0] == 0
    stop_after = 2

    class Stop(Exception):
        pass

    real = api.save_checkpoint

    def save_then_stop(*a, **k):
        real(*a, **k)
        if not k.get("complete", True) and k.get("epoch") == stop_after:
            raise Stop  # like a kill right after the epoch's checkpoint

    api.save_checkpoint = save_then_stop
    try:
        with pytest.raises(Stop):  # through the API: the CLI's error handler would catch Stop
            from stbat_plugin.pipeline.cli import _config, build_parser

            parsed = build_parser().parse_args(["pretrain", *args, "--save", str(part)])
            api.pretrain(parsed.data_dir, parsed.source, method=method, config=_config(parsed),
                         seed=parsed.seed, save=parsed.save, progress=False)
    finally:
        api.save_checkpoint = real
    saved = torch.load(part, weights_only=True)
    assert saved["complete"] is False and saved["epoch"] == stop_after
    with pytest.raises(CheckpointError, match="interrupted.*--resume"):
        load_checkpoint(part)
    code, _, err = run_cli(["pretrain", *args, "--save", part])
    assert code == 2 and "--resume" in err and "--overwrite" in err
    code, _, err = run_cli(["pretrain", *args, "--save", part, "--resume"])
    assert code == 0, err
    a, b = _weights(full), _weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_kill_9_during_pretraining_then_resume(tmp_path, reference):
    path = tmp_path / "model.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "stbat_plugin.pipeline.cli", "pretrain", *ARGS,
                                 "--save", str(path)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 240
            while not path.exists():
                assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
                assert time.monotonic() < deadline, "no checkpoint after 240 s"
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    _assert_holds_what_resume_needs(torch.load(path, weights_only=True))
    code, _, err = run_cli(["pretrain", *ARGS, "--save", path, "--resume"])
    assert code == 0, err
    a, b = _weights(reference), _weights(path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def _assert_holds_what_resume_needs(payload: dict) -> None:
    """An incomplete checkpoint: epoch, library version, the best network, and the run's
    state: model, optimisers, RIAM state of every city, every random generator."""
    from stbat_plugin import __version__

    assert payload["complete"] is False and payload["epoch"] >= 1
    assert payload["library_version"] == __version__
    state = payload["resume"]
    assert {"loop", "model", "imbalance", "optimizers", "rng", "best_net"} <= state.keys()
    assert state["loop"]["epoch"] == payload["epoch"]
    assert {"torch", "loader", "round_robin", "numpy"} <= state["rng"].keys()
    assert len(state["optimizers"]) >= 1 and all(o["state"] for o in state["optimizers"])
    assert state["imbalance"] and set(state["imbalance"]) <= {"nyc_bike", "nyc_taxi"}
    for bufs in state["imbalance"].values():
        assert bufs and all(bool(torch.isfinite(v).all()) for v in bufs.values())


def test_resume_refuses_a_checkpoint_of_another_library_version(reference, tmp_path):
    path = tmp_path / "m.ckpt"
    payload = torch.load(reference, weights_only=True)
    payload["complete"], payload["resume"] = False, {"loop": {}}
    payload["library_version"] = "0.0.1"
    torch.save(payload, path)
    before = path.read_bytes()
    code, _, err = run_cli(["pretrain", *ARGS, "--save", path, "--resume"])
    assert code == 2 and "library version: was 0.0.1" in err and "--overwrite" in err, err
    assert path.read_bytes() == before


def test_resume_of_a_complete_checkpoint_trains_nothing(reference, tmp_path, monkeypatch):
    path = tmp_path / "m.ckpt"
    path.write_bytes(reference.read_bytes())
    monkeypatch.setattr(api, "_pretrain", lambda *a, **k: pytest.fail("trained again"))
    code, _, err = run_cli(["pretrain", *ARGS, "--save", path, "--resume"])
    assert code == 0, err
    assert path.read_bytes() == reference.read_bytes()


def test_resume_refuses_another_run(reference, tmp_path):
    path = tmp_path / "m.ckpt"
    payload = torch.load(reference, weights_only=True)
    payload["complete"], payload["resume"] = False, {"loop": {}}
    torch.save(payload, path)
    before = path.read_bytes()
    code, _, err = run_cli(["pretrain", *ARGS[:-1], "4", "--save", path, "--resume"])
    assert code == 2 and "another pre-training" in err and "seed" in err, err
    assert path.read_bytes() == before


def test_existing_checkpoint_is_replaced_only_with_overwrite(tmp_path, monkeypatch):
    path = tmp_path / "m.ckpt"
    path.write_bytes(b"a better model from another run")
    monkeypatch.setattr(api, "prepare_sources", lambda *a, **k: pytest.fail("started"))
    code, _, err = run_cli(["pretrain", *ARGS, "--save", path])
    assert code == 2 and "already exists" in err
    assert path.read_bytes() == b"a better model from another run"
    code, _, err = run_cli(["pretrain", *ARGS, "--save", path, "--resume", "--overwrite"])
    assert code == 2 and "contradict" in err


# --------------------------------------------------------------------------- damaged files
def _save(path: Path, state: dict, **kw) -> None:
    save_checkpoint(path, state, config=TransferConfig(), method="finetune", data={}, **kw)


def test_nan_weights_are_refused_by_name(tmp_path):
    path = tmp_path / "m.ckpt"
    _save(path, {"w": torch.tensor([1.0, float("nan")]), "b": torch.ones(2)})
    with pytest.raises(CheckpointError, match=r"NaN or inf weights in \['w'\]"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_config_are_a_clear_error(reference, tmp_path):
    path = tmp_path / "m.ckpt"
    payload = torch.load(reference, weights_only=True)
    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key] = torch.zeros(3, 3, 3)
    torch.save(payload, path)
    code, _, err = run_cli(["adapt", "--checkpoint", path, "--data-dir", TINY, "--target",
                            "melbourne_pedestrian", "--train-days", "0", "--val-days", "3",
                            "--test-days", "4", "--quiet"])
    assert code == 2 and "do not fit" in err and "Traceback" not in err


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not a zip", b"\x80\x04K\x01."])
def test_damaged_files_are_refused_with_their_path(tmp_path, content):
    path = tmp_path / "m.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)


def test_other_library_version_is_read_with_a_warning(tmp_path, caplog):
    path = tmp_path / "m.ckpt"
    _save(path, {"w": torch.ones(2)})
    payload = torch.load(path, weights_only=True)
    payload["library_version"] = "0.0.1"
    torch.save(payload, path)
    with caplog.at_level(logging.WARNING):
        load_checkpoint(path)
    assert "0.0.1" in caplog.text


def test_orphan_temp_file_of_a_killed_writer_is_removed_on_the_next_write(tmp_path):
    path = tmp_path / "m.ckpt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    orphan = tmp_path / f".m.ckpt.{dead}.abc123.tmp"
    orphan.write_bytes(b"half")
    mine = tmp_path / f".m.ckpt.{os.getpid()}.xyz789.tmp"  # a live writer's: kept
    mine.write_bytes(b"in progress")
    _save(path, {"w": torch.ones(2)})
    assert not orphan.exists() and mine.exists()
    assert _io.remove_orphan_temps(path) == []


def test_files_get_the_process_umask(tmp_path):
    old = os.umask(0o022)
    try:
        _save(tmp_path / "m.ckpt", {"w": torch.ones(2)})
    finally:
        os.umask(old)
    assert (tmp_path / "m.ckpt").stat().st_mode & 0o777 == 0o644


def test_results_written_by_transfer_are_json_without_nan(tmp_path):
    from stbat_plugin.pipeline.results import write_results

    rows = [{"method": "ha", "sources": "a", "target": "b", "train_days": 3, "channel": "mean",
             "seed": 0, "rmse": 1.0, "mae": 0.5}]
    write_results(rows, tmp_path)
    json.loads((tmp_path / "results.json").read_text(), parse_constant=pytest.fail)
