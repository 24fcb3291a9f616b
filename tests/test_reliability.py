"""Never lose a run, never silently wrong: ``stbat transfer`` output, resume and refusals.

- rows are appended to ``OUT/results.jsonl`` as they come; a real ``kill -9`` of the CLI
  followed by ``--resume`` ends with the rows of an uninterrupted run;
- an ``--out`` with results is never overwritten without ``--overwrite``, and ``--resume``
  refuses a folder of another run;
- what can be checked before training (leakage, duplicate sources, device, output folder,
  empty seeds, backbone arguments) fails in seconds with exit code 2 and one line;
- internal errors exit 1, with the traceback only under ``--debug``.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from _cli_helpers import run_cli

from stbat_plugin.pipeline import api, cli
from stbat_plugin.pipeline.results import read_results

REPO = Path(__file__).parents[1]
TINY = REPO / "data" / "tiny"
RUN = ["--data-dir", str(TINY), "--source", "nyc_taxi", "--target", "melbourne_pedestrian",
       "--source-span", "2019-03-25:2019-03-31", "--val-days", "3", "--test-days", "4",
       "--max-epochs", "2", "--finetune-epochs", "2", "--max-batches-per-epoch", "3",
       "--batch-size", "8", "--backbone-kwargs", '{"channels": 8, "hidden": 16}', "--quiet",
       "--methods", "finetune,persistence,linear", "--train-days", "3,0", "--seeds", "2"]
#: fields that measure wall time: the only ones allowed to differ between two runs
TIMING = {"seconds", "pretrain_seconds"}


def _stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _key(row: dict) -> tuple:
    return (row["method"], row["train_days"], row["seed"], row["channel"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ref") / "out"
    code, _, err = run_cli(["transfer", *RUN, "--out", out])
    assert code == 0, err
    return json.loads((out / "results.json").read_text())


def test_rows_reach_the_jsonl_file_as_they_come(tmp_path, monkeypatch):
    """When the 2nd method starts, the 1st method's rows are already on disk."""
    out = tmp_path / "out"
    seen: list[int] = []
    real = api.run_method

    def spy(method, *args, **kwargs):
        seen.append(len(read_results(out / "results.jsonl")))
        return real(method, *args, **kwargs)

    monkeypatch.setattr(api, "run_method", spy)
    code, _, err = run_cli(["transfer", *RUN[:-6], "--methods", "persistence,seasonal",
                            "--train-days", "3", "--seeds", "1", "--out", out])
    assert code == 0, err
    assert seen[0] == 0 and seen[1] > 0


def test_kill_9_then_resume_gives_the_rows_of_an_uninterrupted_run(reference, tmp_path):
    out = tmp_path / "out"
    rows_file = out / "results.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "stbat_plugin.pipeline.cli", "transfer", *RUN,
                                 "--out", str(out)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 240
            while not (rows_file.exists() and b"\n" in rows_file.read_bytes()):
                assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
                assert time.monotonic() < deadline, "no result row after 240 s"
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = read_results(rows_file)
    assert 0 < len(before) < len(reference), "the kill did not land mid-run"
    assert not (out / "results.json").exists()
    code, _, err = run_cli(["transfer", *RUN, "--out", out])  # no --resume: refused, kept
    assert code == 2 and "--resume" in err
    assert read_results(rows_file) == before
    code, _, err = run_cli(["transfer", *RUN, "--out", out, "--resume"])
    assert code == 0, err
    after = json.loads((out / "results.json").read_text())
    assert after[:len(before)] == before  # rows written before the kill are kept as they were
    assert sorted(_stable(after), key=_key) == sorted(_stable(reference), key=_key)
    assert not list(out.glob(".*.tmp"))


def test_resume_of_a_finished_run_runs_nothing(reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reference))
    identity = {"command": "transfer", "sources": ["nyc_taxi"], "target": "melbourne_pedestrian",
                "config": reference[0]["config"]}
    (out / "run.json").write_text(json.dumps(identity))

    def fail(*a, **k):
        raise AssertionError("a finished row was run again")

    monkeypatch.setattr(api, "run_method", fail)
    code, _, err = run_cli(["transfer", *RUN, "--out", out, "--resume"])
    assert code == 0, err
    assert json.loads((out / "results.json").read_text()) == reference


def test_resume_refuses_the_folder_of_another_run(reference, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli(["transfer", *RUN[:-6], "--methods", "persistence", "--train-days",
                            "3", "--seeds", "1", "--out", out])
    assert code == 0, err
    kept = (out / "results.jsonl").read_bytes()
    code, _, err = run_cli(["transfer", *RUN[:-6], "--methods", "persistence", "--train-days",
                            "3", "--seeds", "1", "--out", out, "--resume", "--val-days", "4"])
    assert code == 2 and "val_days" in err and "another run" in err, err
    assert (out / "results.jsonl").read_bytes() == kept
    code, _, err = run_cli(["transfer", *RUN[:-6], "--methods", "persistence", "--train-days",
                            "3", "--seeds", "1", "--out", out, "--overwrite", "--val-days", "4"])
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["config"]["val_days"] == 4


def test_resume_and_overwrite_together_are_refused(tmp_path):
    code, _, err = run_cli(["transfer", *RUN, "--out", tmp_path / "o", "--resume", "--overwrite"])
    assert code == 2 and "contradict" in err


# --------------------------------------------------------------------------- up-front checks
def _no_training(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("training started although the run could not succeed")

    monkeypatch.setattr(api, "run_method", fail)
    monkeypatch.setattr(api, "prepare_sources", fail)


@pytest.mark.parametrize("extra, words", [
    (["--source", "nyc_taxi,nyc_bike,nyc_taxi"], ["more than once", "nyc_taxi"]),
    (["--source", "nyc_taxi,melbourne_pedestrian", "--source-span",
      "nyc_taxi=2019-03-25:2019-03-31"], ["also a source", "overlapping", "--allow-leakage"]),
    (["--device", "cuda:7"], ["--device"]),
    (["--device", "banana"], ["--device", "banana"]),
    (["--seeds", "0"], ["--seeds"]),
    (["--backbone-kwargs", '{"hidden": -4}'], ["graph_stnet", "--backbone-kwargs"]),
    (["--backbone-kwargs", '{"no_such_arg": 1}'], ["no_such_arg", "--backbone-kwargs"]),
    (["--lr", "0"], ["lr"]),
    (["--bandwidth", "inf"], ["bandwidth"]),
])
def test_bad_runs_fail_in_seconds_with_one_line(tmp_path, monkeypatch, extra, words):
    if extra[0] == "--backbone-kwargs":
        monkeypatch.setattr(api, "run_method", lambda *a, **k: pytest.fail("trained"))
    else:
        _no_training(monkeypatch)
    out = tmp_path / "out"
    code, _, err = run_cli(["transfer", *RUN, *extra, "--out", out])
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("stbat transfer: error:") and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in line, line
    assert not (out / "results.jsonl").exists()


def test_leakage_runs_when_explicitly_allowed(tmp_path, caplog):
    out = tmp_path / "out"
    code, _, err = run_cli(["transfer", *RUN[:-6], "--source", "nyc_taxi,melbourne_pedestrian",
                            "--source-span", "nyc_taxi=2019-03-25:2019-03-31",
                            "--methods", "persistence", "--train-days", "3", "--seeds", "1",
                            "--allow-leakage", "--out", out])
    assert code == 0, err
    assert "also a source over overlapping time (--allow-leakage)" in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_fails_before_training(tmp_path, monkeypatch):
    _no_training(monkeypatch)
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code, _, err = run_cli(["transfer", *RUN, "--out", parent / "out"])
    finally:
        parent.chmod(0o755)
    assert code == 2 and "not writable" in err


def test_unwritable_out_fails_before_training(tmp_path, monkeypatch):
    """A folder that cannot be created (a file in its path) fails before any training."""
    _no_training(monkeypatch)
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(["transfer", *RUN, "--out", tmp_path / "file" / "out"])
    assert code == 2 and "is a file" in err


def test_probe_write_failure_is_reported_as_not_writable(tmp_path, monkeypatch):
    from stbat_plugin.pipeline import runfolder

    def refuse(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(runfolder.tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError, match="not writable.*Read-only"):
        runfolder.check_writable(tmp_path / "out")


# --------------------------------------------------------------------------- error contract
def test_internal_error_exits_1_without_traceback_unless_debug(monkeypatch, capsys):
    def bug(*a, **k):
        raise TypeError("unsupported operand type(s)")

    monkeypatch.setattr(api, "datasets", bug)
    assert cli.main(["datasets", "--data-dir", str(TINY)]) == 1
    err = capsys.readouterr().err
    assert "internal error: TypeError" in err and "--debug" in err and "Traceback" not in err
    assert cli.main(["--debug", "datasets", "--data-dir", str(TINY)]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("exc, words", [
    (FileNotFoundError(2, "No such file or directory", "x.npz"), ["No such file", "x.npz"]),
    (ValueError("bad\nthing"), ["bad thing"]),
    (KeyError("Unknown city 'x'"), ["Unknown city 'x'"]),
    (MemoryError(), ["out of memory", "--batch-size"]),
    (EOFError("Ran out of input"), ["damaged"]),
    (torch.OutOfMemoryError("CUDA out of memory.\nTried to allocate 2 GiB"),
     ["out of memory", "--batch-size"]),
    (zipfile.BadZipFile("File is not a zip file"), ["damaged", "not a zip file"]),
    (pickle.UnpicklingError("invalid load key, 'x'."), ["damaged", "invalid load key"]),
    (FloatingPointError("city 'x': prediction loss became [nan]"), ["prediction loss", "nan"]),
])
def test_known_errors_are_one_line_user_errors(monkeypatch, capsys, exc, words):
    def raise_it(*a, **k):
        raise exc

    monkeypatch.setattr(api, "datasets", raise_it)
    assert cli.main(["datasets", "--data-dir", str(TINY)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    for word in words:
        assert word in err


def test_ctrl_c_exits_130_and_says_what_is_kept(monkeypatch, capsys):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "datasets", interrupt)
    assert cli.main(["datasets", "--data-dir", str(TINY)]) == 130
    assert "kept" in capsys.readouterr().err


def test_experiment_spec_refuses_duplicate_sources(tmp_path):
    from stbat_plugin.pipeline.experiment import load_spec

    spec = tmp_path / "spec.toml"
    spec.write_text(f'[experiment]\nname = "x"\ndata_dir = "{TINY}"\nmethods = ["persistence"]\n'
                    'train_days = [3]\nseeds = 1\n[[task]]\nname = "t"\n'
                    'sources = ["nyc_bike", "nyc_taxi", "nyc_bike"]\ntarget = "melbourne_pedestrian"\n')
    with pytest.raises(ValueError, match="sources: duplicate names"):
        load_spec(spec)


def test_target_split_without_observed_cells_fails_before_training(tmp_path, monkeypatch):
    """Test days with no observed cell: refused when the task is built, not after training."""
    import numpy as np

    _no_training(monkeypatch)
    with np.load(TINY / "melbourne_pedestrian.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    observed = arrays.get("observed", np.ones(arrays["flow"].shape[:2], bool)).copy()
    observed[-4 * 24:] = False  # the 4 test days
    arrays["observed"] = observed
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "melbourne_pedestrian.npz", **arrays)
    (data / "nyc_taxi.npz").symlink_to(TINY / "nyc_taxi.npz")
    code, _, err = run_cli(["transfer", *RUN[2:], "--data-dir", data, "--out", tmp_path / "o"])
    assert code == 2 and "test part" in err and "no observed cell" in err, err
