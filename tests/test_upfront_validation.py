"""Issue 10 audit: what can be checked before training is checked first, in every command.

Each case here failed late (after training), with a traceback, or not at all before the
audit. The refusal tests run the command in-process with training patched to fail, so a
check that came too late fails the test; every refusal is exit code 2 with one line naming
the flag or file.

- an output folder that cannot be written: ``transfer``, ``pretrain``, ``adapt`` and
  ``experiment`` (the probe, and a real read-only folder);
- ``experiment``: every task and variant of the spec (city files, splits, the backbone on
  every city) before its first unit, not when that task's turn comes;
- ``adapt``: ``--out``, ``--train-days``, ``--seed``, leakage (a target the checkpoint was
  pre-trained on over the same days) and one forward pass of the network on the target,
  before the fine-tuning;
- seeds numpy cannot take, repeated methods or train days, a broken source file in a run
  that does not pre-train, a directory named ``x.npz`` in ``stbat datasets``;
- argparse usage errors are one line too.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from _cli_helpers import run_cli

from stbat_plugin.data import ScalerError
from stbat_plugin.pipeline import api
from stbat_plugin.pipeline.checkpoint import save_checkpoint
from stbat_plugin.pipeline.config import TransferConfig
from stbat_plugin.pipeline.experiment import run_experiment
from stbat_plugin.pipeline.method_registry import get_method
from stbat_plugin.pipeline.tasks import target_task

REPO = Path(__file__).parents[1]
TINY = REPO / "data" / "tiny"
SMALL = ["--val-days", "3", "--test-days", "4", "--max-epochs", "1", "--finetune-epochs", "1",
         "--max-batches-per-epoch", "2", "--batch-size", "8", "--quiet",
         "--backbone-kwargs", '{"channels": 8, "hidden": 16}']
SPAN = ["--source-span", "2019-03-25:2019-03-31"]
TRANSFER = ["transfer", "--data-dir", TINY, "--source", "nyc_taxi", "--target",
            "melbourne_pedestrian", *SPAN, *SMALL, "--methods", "finetune,persistence"]
PRETRAIN = ["pretrain", "--data-dir", TINY, "--source", "nyc_taxi", *SPAN, *SMALL]


def _no_training(monkeypatch) -> None:
    def fail(*a, **k):
        raise AssertionError("training started although the run could not succeed")

    for name in ("_pretrain", "run_method", "adapt_to_target"):
        monkeypatch.setattr(api, name, fail)


def _one_line_error(code: int, err: str, *words: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith(("INFO", "WARN"))]
    assert code == 2 and len(lines) == 1 and " error: " in lines[0], err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An (untrained) finetune checkpoint of the SMALL settings: what `adapt` reads."""
    config = TransferConfig(val_days=3, test_days=4, finetune_epochs=1, batch_size=8,
                            backbone_kwargs={"channels": 8, "hidden": 16})
    net = get_method("finetune").network(config, None)
    path = tmp_path_factory.mktemp("ckpt") / "m.ckpt"
    return save_checkpoint(path, net.state_dict(), config=config, method="finetune",
                           data={"sources": ["nyc_taxi"], "seed": 0})


def _spec(tmp_path: Path, data: Path, second_task: str) -> Path:
    spec = tmp_path / "spec.toml"
    spec.write_text(
        f'[experiment]\nname = "x"\ndata_dir = "{data}"\nmethods = ["persistence"]\n'
        'train_days = [3]\nseeds = 1\n[defaults]\nval_days = 3\ntest_days = 4\n'
        'source_span = "2019-03-25:2019-03-31"\nmax_epochs = 1\nmax_batches_per_epoch = 2\n'
        'backbone_kwargs = {channels = 8, hidden = 16}\n'
        '[[task]]\nname = "fine"\nsources = ["nyc_bike"]\ntarget = "nyc_bike_grid2014"\n'
        + second_task)
    return spec


# --------------------------------------------------------------------------- the output folder
def _refuse_probe(monkeypatch) -> None:
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if str(kwargs.get("prefix", "")).startswith(".stbat-write-probe"):
            raise PermissionError(13, "Permission denied")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("command", ["transfer", "pretrain", "adapt", "experiment"])
def test_unwritable_output_fails_before_any_training(tmp_path, monkeypatch, checkpoint, command):
    """Old: `adapt --out` failed after the fine-tuning; `experiment` with a bare OSError."""
    _no_training(monkeypatch)
    _refuse_probe(monkeypatch)
    out = tmp_path / "out"
    argv = {"transfer": [*TRANSFER, "--out", out],
            "pretrain": [*PRETRAIN, "--save", out / "m.ckpt"],
            "adapt": ["adapt", "--checkpoint", checkpoint, "--data-dir", TINY, "--target",
                      "melbourne_pedestrian", "--train-days", "3", *SMALL[:4], "--quiet",
                      "--out", out],
            "experiment": ["experiment", _spec(tmp_path, TINY, ""), "--out", out, "--quiet"],
            }[command]
    code, _, err = run_cli(argv)
    flag = "--save" if command == "pretrain" else "--out"
    _one_line_error(code, err, flag, "not writable", "Permission denied")
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="root without CAP_DAC_OVERRIDE needs setpriv (non-root: "
                           "tests/test_reliability.py::test_read_only_out_fails_before_training)")
def test_real_read_only_out_fails_before_training_even_for_root(tmp_path):
    """A real read-only folder: root writes anywhere, so the CLI runs without the capability
    that lets it (as a normal user would)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--",
                           sys.executable, "-m", "stbat_plugin.pipeline.cli",
                           *map(str, TRANSFER), "--out", str(folder / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    _one_line_error(done.returncode, done.stderr, "--out", "not writable", "Permission denied")
    assert list(folder.iterdir()) == []


# --------------------------------------------------------------------------- experiment
def _bad_data(tmp_path: Path, edit) -> Path:
    """data/tiny with one city rewritten by ``edit(name, arrays)`` (the others linked)."""
    data = tmp_path / "data"
    data.mkdir()
    for path in TINY.glob("*.npz"):
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
        if edit(path.stem, arrays):
            np.savez(data / path.name, **arrays)
        else:
            (data / path.name).symlink_to(path)
    return data


def _unobserved_test_days(name, arrays):
    if name == "melbourne_pedestrian":
        arrays["observed"] = arrays["observed"].copy()
        arrays["observed"][-4 * 24:] = False  # the 4 test days
        return True
    return False


def _negative_adjacency(name, arrays):
    if name == "nyc_taxi":
        arrays["adjacency"] = -arrays["adjacency"]
        return True
    return False


SECOND_TASKS = {
    # the second task's target has no observed cell on its test days
    "splits": (_unobserved_test_days, '[[task]]\nname = "late"\nsources = ["nyc_taxi"]\n'
               'target = "melbourne_pedestrian"\nmethods = ["finetune"]\n', ["test part"]),
    # the second task's backbone cannot run on its cities
    "backbone": (None, '[[task]]\nname = "late"\nsources = ["nyc_taxi"]\ntarget = "nyc_bike"\n'
                 'methods = ["finetune"]\n[task.config]\nbackbone = "stnet"\n', ["Pre-flight"]),
    # a source of a task that does not pre-train: its file is still checked
    "source file": (_negative_adjacency, '[[task]]\nname = "late"\nsources = ["nyc_taxi"]\n'
                    'target = "nyc_bike"\n', ["nyc_taxi", "adjacency", "negative"]),
}


@pytest.mark.parametrize("case", list(SECOND_TASKS))
def test_experiment_checks_every_task_before_the_first_unit_runs(tmp_path, monkeypatch, case):
    """Old: found when the task's turn came, after every unit before it had trained."""
    edit, task, words = SECOND_TASKS[case]
    data = _bad_data(tmp_path, edit) if edit else TINY
    _no_training(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as info:
        run_experiment(_spec(tmp_path, data, task), out)
    message = str(info.value)
    for word in ["[[task]] 'late'", *words]:
        assert word in message, message
    assert not (out / "results.jsonl").exists()


def test_experiment_check_errors_are_one_line_in_the_cli(tmp_path, monkeypatch):
    data = _bad_data(tmp_path, _unobserved_test_days)
    _no_training(monkeypatch)
    code, _, err = run_cli(["experiment", _spec(tmp_path, data, SECOND_TASKS["splits"][1]),
                            "--out", tmp_path / "out", "--quiet"])
    _one_line_error(code, err, "spec.toml", "[[task]] 'late'", "no observed cell")


# --------------------------------------------------------------------------- adapt, seeds
@pytest.mark.parametrize("extra, words", [
    (["--train-days", "-1"], ["--train-days", ">= 0"]),
    (["--train-days", "3", "--seed", "-1"], ["--seed", "4294967295"]),
    (["--train-days", "3", "--out", "FILE/sub"], ["--out", "is a file"]),
])
def test_adapt_checks_its_flags_before_fine_tuning(tmp_path, monkeypatch, checkpoint, extra,
                                                   words):
    _no_training(monkeypatch)
    (tmp_path / "FILE").write_text("x")
    extra = [str(tmp_path / e) if e.startswith("FILE") else e for e in extra]
    code, _, err = run_cli(["adapt", "--checkpoint", checkpoint, "--data-dir", TINY,
                            "--target", "melbourne_pedestrian", *SMALL[:4], "--quiet", *extra])
    _one_line_error(code, err, *words)


def test_adapt_runs_the_network_on_the_target_before_fine_tuning(tmp_path, monkeypatch):
    """A network with per-node parameters of another city. Old: a raw RuntimeError in the
    first fine-tuning step, exit code 1 (an internal error)."""
    from stbat_plugin._registry import registry_with_plugins

    plugin = str(REPO / "examples" / "plugin_wrapped_models.py")
    config = TransferConfig(backbone="node_embedding_net", backbone_kwargs={"num_nodes": 69})
    net = get_method("finetune").network(config, registry_with_plugins([plugin]))
    path = save_checkpoint(tmp_path / "m.ckpt", net.state_dict(), config=config,
                           method="finetune", data={})
    _no_training(monkeypatch)
    code, _, err = run_cli(["adapt", "--checkpoint", path, "--data-dir", TINY, "--target",
                            "melbourne_pedestrian", "--train-days", "3", *SMALL[:4], "--quiet",
                            "--plugin", plugin])
    _one_line_error(code, err, "Pre-flight", "node_embedding_net",
                    "target city 'melbourne_pedestrian' (n=55 regions)", "'node_embedding' [69")


def test_adapt_refuses_a_target_the_checkpoint_was_pretrained_on_over_the_same_days(
        tmp_path, checkpoint, caplog):
    """Old: exit 0, the test days of nyc_taxi seen in pre-training (leakage), no warning."""
    import torch

    payload = torch.load(checkpoint, weights_only=True)
    payload["data"]["spans"] = {"nyc_taxi": ("2019-03-25T00:00", "2019-03-31T23:00")}
    path = tmp_path / "m.ckpt"
    torch.save(payload, path)
    argv = ["adapt", "--checkpoint", path, "--data-dir", TINY, "--target", "nyc_taxi",
            "--train-days", "0", *SMALL[:4], "--quiet"]
    code, _, err = run_cli(argv)
    _one_line_error(code, err, "'nyc_taxi' is also a source over overlapping time",
                    "--allow-leakage")
    code, out, err = run_cli([*argv, "--allow-leakage"])
    assert code == 0 and '"mean"' in out, err
    assert "--allow-leakage" in caplog.text
    code, _, err = run_cli([*argv, "--target-span", "2019-03-04:2019-03-24"])  # other days
    assert code == 0, err


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_numpy_cannot_take_is_refused_before_pretraining(tmp_path, monkeypatch, seed):
    """Old: `pretrain --seed -1` failed after loading the sources with 'expected
    non-negative integer', naming no flag."""
    _no_training(monkeypatch)
    monkeypatch.setattr(api, "prepare_sources", lambda *a, **k: pytest.fail("loaded"))
    code, _, err = run_cli([*PRETRAIN, "--seed", seed, "--save", tmp_path / "m.ckpt"])
    _one_line_error(code, err, "--seed", seed)
    with pytest.raises(ValueError, match="--seeds"):
        api.transfer(TINY, ["nyc_taxi"], "melbourne_pedestrian", seeds=[0, int(seed)],
                     methods=["persistence"], progress=False)


# --------------------------------------------------------------------------- repeats, files
@pytest.mark.parametrize("extra, words", [
    (["--methods", "persistence,ha,persistence"], ["methods", "persistence", "more than once"]),
    (["--methods", "persistence", "--train-days", "3,0,3"], ["train days", "'3'", "--train-days"]),
])
def test_a_method_or_train_days_given_twice_is_refused(tmp_path, monkeypatch, extra, words):
    """Old: exit 0 with every row written twice (and counted twice in the means)."""
    _no_training(monkeypatch)
    code, _, err = run_cli([*TRANSFER[:-2], *extra, "--out", tmp_path / "out"])
    _one_line_error(code, err, *words)
    assert not (tmp_path / "out").exists()


def test_a_broken_source_file_is_refused_when_no_method_pretrains(tmp_path):
    """Old: exit 0; the named source was never opened."""
    data = _bad_data(tmp_path, _negative_adjacency)
    code, _, err = run_cli(["transfer", "--data-dir", data, *TRANSFER[3:-2], "--methods",
                            "persistence", "--out", tmp_path / "out"])
    _one_line_error(code, err, "nyc_taxi.npz", "adjacency", "negative")


def test_datasets_refuses_a_directory_named_npz(tmp_path):
    """Old: skipped silently (the listing left it out)."""
    (tmp_path / "nyc_taxi.npz").symlink_to(TINY / "nyc_taxi.npz")
    (tmp_path / "folder.npz").mkdir()
    code, _, err = run_cli(["datasets", "--data-dir", tmp_path])
    _one_line_error(code, err, "folder.npz", "is a directory")


def test_target_days_without_observed_cells_name_the_days_and_the_fix():
    city = api.load(TINY, "melbourne_pedestrian", None)
    blind = dataclasses.replace(city, observed=np.zeros_like(city.observed))
    with pytest.raises(ScalerError, match=r"target city 'melbourne_pedestrian', scaler fitted on "
                                          r"2022-03-.*zero observed cells.*--target-span"):
        target_task(blind, 3, TransferConfig(val_days=3, test_days=4))


# --------------------------------------------------------------------------- usage errors
@pytest.mark.parametrize("argv", [
    ["transfer", "--data-dir", "d", "--source", "a", "--target", "b", "--out", "o",
     "--methods", ","],
    ["transfer", "--data-dir", "d", "--source", "a", "--target", "b", "--out", "o",
     "--train-days", "abc"],
    ["pretrain", "--data-dir", "d", "--source", "a"],
    ["no-such-command"],
])
def test_usage_errors_are_one_line_with_exit_code_2(argv):
    """Old: argparse printed the whole usage (30+ lines) before the error."""
    code, _, err = run_cli(argv)
    line = _one_line_error(code, err)
    assert line.startswith("stbat") and line.endswith("--help)"), line
