"""Multi-process pre-training (``torchrun ... stbat pretrain``) on 2 gloo processes on CPU.

Two processes run ``stbat pretrain`` with the environment torchrun gives them, and are held
to a naive one-process twin of distributed data parallelism: at every step each rank's loss
is computed on its own batch (batch ``i`` of the epoch's stream on rank ``i % 2``) with the
same weights, the gradients are averaged, both optimisers step once, and the RIAM state of
every city of the step is refreshed. Weights, RIAM densities and similarities must agree
with the twin (rtol 1e-4, atol 1e-5; measured: equal to the last bit on this machine) and be
identical on both ranks; rank 0 alone writes the checkpoint and prints.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stbat_plugin.pipeline import distributed
from stbat_plugin.pipeline.checkpoint import load_checkpoint
from stbat_plugin.pipeline.distributed import DistributedError, device_for, launch_env, shard_batches

REPO = Path(__file__).parents[1]
TINY = REPO / "data" / "tiny"
WORLD = 2
EPOCHS = 2
# 5 batches per epoch: 2 steps of 2 batches per epoch, the 5th dropped
ARGS = ["--data-dir", str(TINY), "--source", "nyc_bike,nyc_taxi", "--source-span",
        "2019-03-25:2019-03-31", "--backbone-kwargs", '{"channels": 8, "hidden": 16}',
        "--max-epochs", str(EPOCHS), "--patience", "5", "--max-batches-per-epoch", "5",
        "--batch-size", "8", "--quiet", "--seed", "3"]
RTOL, ATOL = 1e-4, 1e-5
ENV = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


# --------------------------------------------------------------------------- the environment
def test_no_launcher_means_one_process_and_no_group():
    assert launch_env({}) is None
    with distributed.session("cpu") as ctx:  # this test process has no RANK / WORLD_SIZE
        assert ctx is None and not torch.distributed.is_initialized()
    assert distributed.active() is None
    assert distributed.on_rank0(lambda: 7) == 7


def test_torchrun_environment_is_parsed():
    env = launch_env(ENV)
    assert env == distributed.LaunchEnv(1, 2, 1, 2, "127.0.0.1", 29500)
    one = launch_env({**ENV, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert one is not None and one.world_size == 1
    with distributed.session("cpu") as ctx:  # --nproc-per-node 1: still no process group
        assert ctx is None


@pytest.mark.parametrize("change, match", [
    ({"MASTER_PORT": None}, "MASTER_PORT is not"),
    ({"MASTER_ADDR": None, "MASTER_PORT": None}, "MASTER_ADDR, MASTER_PORT are not"),
    ({"WORLD_SIZE": None}, "RANK is set but WORLD_SIZE"),
    ({"RANK": "one"}, "RANK='one' is not a whole number"),
    ({"RANK": "2"}, "0 <= RANK < WORLD_SIZE"),
    ({"WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE >= 1"),
    ({"LOCAL_RANK": "2"}, "LOCAL_RANK=2 with LOCAL_WORLD_SIZE=2"),
    ({"MASTER_PORT": "70000"}, "not a TCP port"),
])
def test_bad_environment_is_a_clear_error(change, match):
    environ = {k: v for k, v in {**ENV, **change}.items() if v is not None}
    with pytest.raises(DistributedError, match=match):
        launch_env(environ)


def test_devices_and_backends():
    env = launch_env(ENV)
    assert env is not None
    assert device_for("cuda", env) == "cuda:1" and device_for("cpu", env) == "cpu"
    assert distributed.backend_for("cuda:1") == "nccl" and distributed.backend_for("cpu") == "gloo"
    with pytest.raises(DistributedError, match="would put them all on one GPU"):
        device_for("cuda:0", env)
    single = launch_env({**ENV, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    assert single is not None and device_for("cuda:3", single) == "cuda:3"
    with pytest.raises(DistributedError, match="cpu .gloo. or cuda .nccl."):
        device_for("mps", env)


def test_batches_are_dealt_round_robin_and_the_remainder_dropped():
    items = [(f"c{i % 3}", i) for i in range(7)]
    shares = [list(shard_batches(items, r, 3)) for r in range(3)]
    assert [[b for _, b, _ in s] for s in shares] == [[0, 3], [1, 4], [2, 5]]  # 6 dropped
    assert shares[1][0] == ("c1", 1, ("c0", "c1", "c2"))
    assert all(s[1][2] == ("c0", "c1", "c2") for s in shares)
    with pytest.raises(DistributedError, match="2 source batch.es., fewer than the 3 processes"):
        list(shard_batches(items[:2], 0, 3))


def test_other_commands_refuse_to_run_under_torchrun(monkeypatch):
    from _cli_helpers import run_cli

    for key, value in {**ENV, "RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    code, _, err = run_cli(["datasets", "--data-dir", TINY])
    assert code == 2 and "only `stbat pretrain` runs on several processes" in err


def test_train_iteration_votes_and_obeys_the_gradient_sync():
    """The hook between backward and step: called for both optimisers, with ``ok=False`` when
    this process skips, and a refusal (another process skipped) leaves everything as it was."""
    from stbat_plugin import BalancedTransfer

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.out = nn.Linear(6, 8), nn.Linear(8, 1)

        def forward(self, x):
            return self.out(self.encoder(x[..., 0].transpose(1, 2))).unsqueeze(1)

    torch.manual_seed(0)
    model = BalancedTransfer(Net(), tap="encoder", feature_dim=8, region_features=torch.rand(5, 4))
    opts = model.configure_optimizers()
    calls: list[tuple[int, bool]] = []
    model.grad_sync = lambda opt, ok: calls.append((opts.index(opt), ok)) or ok
    x, y = torch.rand(4, 6, 5, 1), torch.rand(4, 1, 5, 1)
    assert not model.train_iteration(x, y, opts).skipped and calls == [(0, True), (1, True)]
    calls.clear()
    bad = y.clone()
    bad[0, 0, 0, 0] = float("nan")
    assert model.train_iteration(x, bad, opts, on_nonfinite="skip").skipped
    assert calls == [(0, False)]  # it still takes part in the collective, voting no
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.grad_sync = lambda opt, ok: False  # another process could not step
    assert model.train_iteration(x, y, opts).skipped
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# --------------------------------------------------------------------------- 2 processes
def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _collectives(ctx: distributed.Distributed) -> dict:
    """The collectives on small known values (run on every rank)."""
    out: dict = {}
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=gen), torch.randn(8, 1, generator=gen)
    torch.manual_seed(0)
    lin = nn.Linear(3, 1)
    part = slice(4 * ctx.rank, 4 * ctx.rank + 4)  # this rank's half of the global batch
    nn.functional.mse_loss(lin(x[part]), y[part]).backward()
    out["ok"] = ctx.sync_gradients(lin.parameters(), bucket_elements=2)  # 2 buckets: 3 + 1
    out["grads"] = [p.grad.clone() for p in lin.parameters()]
    a, b, c = (nn.Parameter(torch.ones(2)) for _ in range(3))
    a.grad = torch.full((2,), float(ctx.rank + 1))
    b.grad = torch.full((2,), 4.0) if ctx.rank == 0 else None  # used on rank 0 only
    out["partial"] = (ctx.sync_gradients([a, b, c]), a.grad.clone(), b.grad.clone(), c.grad)
    a.grad = torch.ones(2)
    out["skip"] = (ctx.sync_gradients([a], ok=ctx.rank == 0), a.grad)
    try:
        ctx.on_rank0(lambda: (_ for _ in ()).throw(FileExistsError("--save exists")))
    except FileExistsError as exc:
        out["error"] = (str(exc), getattr(exc, "from_rank0", False))
    out["value"] = ctx.on_rank0(lambda: f"from rank {ctx.rank}")
    return out


class _Stop(Exception):
    """Stands for a kill right after a checkpoint was written."""


def _run_cli(argv: list[str], stop_after: int | None = None) -> dict:
    """``stbat ARGV`` in this process, recording the checkpoints written and the run states."""
    from stbat_plugin.pipeline import api, cli, methods

    saves, states = [], []
    real_save, real_state = api.save_checkpoint, methods.training_state

    def save(*a, **k):
        saves.append((k["epoch"], k["complete"]))
        real_save(*a, **k)
        if k["epoch"] == stop_after:
            raise _Stop("stopped")

    def state(*a, **k):
        s = real_state(*a, **k)
        states.append({"model": {**s["model"], **_flat(s["imbalance"])}, "loop": s["loop"]})
        return s

    api.save_checkpoint, methods.training_state = save, state
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.main(argv)
    finally:
        api.save_checkpoint, methods.training_state = real_save, real_state
    return {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
            "saves": saves, "states": states,
            "left_open": torch.distributed.is_initialized() or distributed.active() is not None}


def _worker(rank: int, ports: list[int], out: Path, argv: list[str]) -> None:
    """One process of the launch: the environment torchrun would give it, then the CLI: a
    whole pre-training, and one stopped after epoch 1 then resumed."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(ports[0]), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    record: dict = {}
    with distributed.session("cpu") as ctx:
        assert ctx is not None
        record["collectives"] = _collectives(ctx)
    part = ["pretrain", *argv[1:-1], str(out / "part.ckpt")]
    for port, key, args, stop in ((ports[1], "full", argv, None), (ports[2], "stopped", part, 1),
                                  (ports[3], "resumed", [*part, "--resume"], None)):
        os.environ["MASTER_PORT"] = str(port)  # each session is a new rendezvous
        record[key] = _run_cli(args, stop)
    torch.save(record, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> dict:
    """``stbat pretrain`` on 2 gloo processes (what torchrun starts), and what each did."""
    import multiprocessing

    out = tmp_path_factory.mktemp("dist")
    argv = ["pretrain", *ARGS, "--save", str(out / "model.ckpt")]
    mp = multiprocessing.get_context("spawn")
    ports = _free_ports(4)
    procs = [mp.Process(target=_worker, args=(r, ports, out, argv)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * WORLD, "a process failed or hung"
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"collectives": [r["collectives"] for r in ranks], "ranks": [r["full"] for r in ranks],
            "stopped": [r["stopped"] for r in ranks], "resumed": [r["resumed"] for r in ranks],
            "checkpoint": out / "model.ckpt", "part": out / "part.ckpt", "argv": argv}


def test_gradients_are_averaged_like_one_process_on_the_whole_batch(launch):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=gen), torch.randn(8, 1, generator=gen)
    torch.manual_seed(0)
    lin = nn.Linear(3, 1)
    nn.functional.mse_loss(lin(x), y).backward()  # one process, the concatenated 2 x 4 batch
    for c in launch["collectives"]:
        assert c["ok"] is True
        for got, want in zip(c["grads"], [p.grad for p in lin.parameters()], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_missing_gradients_count_as_zero_and_a_skip_is_agreed(launch):
    for col in launch["collectives"]:
        ok, a, b, c = col["partial"]
        assert ok and torch.equal(a, torch.full((2,), 1.5)) and torch.equal(b, torch.full((2,), 2.0))
        assert c is None  # no rank had a gradient: none is made up
        assert col["skip"] == (False, None)  # rank 1 could not step: nobody does
        assert col["value"] == "from rank 0"
    assert [c["error"] for c in launch["collectives"]] == [("--save exists", False),
                                                          ("--save exists", True)]


def test_rank_0_alone_writes_the_checkpoint_and_prints(launch):
    rank0, rank1 = launch["ranks"]
    assert rank0["code"] == rank1["code"] == 0
    assert rank0["saves"] == [(1, False), (2, False), (EPOCHS, True)] and rank1["saves"] == []
    assert "pre-trained stbat on nyc_bike,nyc_taxi with 2 processes" in rank0["stdout"]
    assert rank1["stdout"] == ""
    assert not rank0["left_open"] and not rank1["left_open"]
    payload = load_checkpoint(launch["checkpoint"])
    assert payload["complete"] and payload["data"]["processes"] == WORLD
    best = rank0["states"][-1]["loop"]["best_epoch"]
    assert best >= 1
    trained = rank0["states"][best - 1]["model"]
    for k, v in payload["state_dict"].items():  # the best epoch's transferable network
        assert torch.equal(v, trained[f"net.{k}"]), k


def test_both_ranks_hold_identical_weights_and_riam_state(launch):
    rank0, rank1 = launch["ranks"]
    assert len(rank0["states"]) == len(rank1["states"]) == EPOCHS
    riam_state = [k for k in rank0["states"][0]["model"] if k.startswith("cities.")]
    assert {k.rsplit(".", 1)[1] for k in riam_state} == {"descriptors", "valid", "log_density",
                                                         "delta"}
    for a, b in zip(rank0["states"], rank1["states"], strict=True):
        # the same validation error, so the same early-stopping decisions
        assert [h["val"] for h in a["loop"]["history"]] == [h["val"] for h in b["loop"]["history"]]
        assert a["loop"]["best_epoch"] == b["loop"]["best_epoch"]
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), k


def _twin(argv: list[str]) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """Data parallelism in one process, written plainly: each step, every rank's batch is
    scored with the same weights (with that rank's own random generator), the gradients are
    averaged, each optimiser steps once, and every city of the step is refreshed."""
    from stbat_plugin.pipeline import api
    from stbat_plugin.pipeline.cli import _config, build_parser
    from stbat_plugin.pipeline.methods import _loaders, seed_everything, stbat_setup, validation_error
    from stbat_plugin.pipeline.tasks import fold_channels, round_robin

    args = build_parser().parse_args(argv)
    config = _config(args)
    src = api.prepare_sources(args.data_dir, args.source, config)
    seed_everything(args.seed)
    model, net, step = stbat_setup(src.tasks, config, src.descriptors, None)
    opt_stblm, opt_riam = step.optimizers
    tasks = {t.name: t for t in src.tasks}
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    rank_rng = [torch.get_rng_state() for _ in range(WORLD)]

    def averaged(losses: list[torch.Tensor], params: list[nn.Parameter]) -> None:
        per_rank = [torch.autograd.grad(loss, params, allow_unused=True) for loss in losses]
        for i, p in enumerate(params):
            grads = [g[i] for g in per_rank]
            p.grad = None if all(g is None for g in grads) else \
                sum(torch.zeros_like(p) if g is None else g for g in grads) / WORLD

    states, vals = [], []
    for _ in range(EPOCHS):
        model.train()
        stream = list(round_robin(_loaders(src.tasks, config, gen), rng,
                                  config.max_batches_per_epoch))
        for g in range(len(stream) // WORLD):
            group = stream[g * WORLD:(g + 1) * WORLD]
            losses, stats = [], []
            for r, (name, batch) in enumerate(group):
                torch.set_rng_state(rank_rng[r])
                city = model.cities[name]
                if not city.fresh:
                    model.refresh_imbalance(city)
                x, y, m = fold_channels(batch, config.device)
                loss, _, st = model.stblm_loss(x, y, state=city, mask=m,
                                               **tasks[name].graph_kwargs(model.net, "cpu"))
                losses.append(loss)
                stats.append(st)
                rank_rng[r] = torch.get_rng_state()
            averaged(losses, model.stblm_parameters())
            opt_stblm.step()
            averaged([model.riam_loss(model.cities[name], *st)[0]
                      for (name, _), st in zip(group, stats, strict=True)],
                     model.riam_parameters())
            opt_riam.step()
            for name in sorted({name for name, _ in group}):
                model.refresh_imbalance(name)
        model.eval()
        vals.append(validation_error(net, src.tasks, config.device))
        states.append({k: v.detach().clone() for k, v in
                       {**model.state_dict(), **_flat(model.imbalance_state())}.items()})
    return states, vals


def _flat(imbalance: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The cities' RIAM state (not in ``state_dict``) under ``cities.CITY.NAME``, as the model's."""
    return {f"cities.{city}.{k}": v for city, bufs in imbalance.items() for k, v in bufs.items()}


def test_two_processes_match_data_parallelism_in_one_process(launch):
    states, vals = _twin(launch["argv"])
    rank0 = launch["ranks"][0]["states"]
    assert len(states) == len(rank0) == EPOCHS
    worst = 0.0
    for epoch, (want, got) in enumerate(zip(states, rank0, strict=True), start=1):
        assert want.keys() == got["model"].keys()
        for k, v in want.items():
            torch.testing.assert_close(got["model"][k], v, rtol=RTOL, atol=ATOL,
                                       msg=lambda m, k=k, e=epoch: f"epoch {e}, {k}: {m}")
            if v.is_floating_point():
                worst = max(worst, float((got["model"][k] - v).abs().max()))
        # validation is split over the ranks and summed in float64: the same within rounding
        assert got["loop"]["history"][epoch]["val"] == pytest.approx(vals[epoch - 1], rel=1e-6)
    assert worst <= ATOL
    moved = [k for k in states[0] if not torch.equal(states[0][k], states[1][k])]
    assert any(k.startswith("net.") for k in moved) and any(k.startswith("riam.") for k in moved)
    assert any(k.endswith("log_density") for k in moved) and any(k.endswith("delta") for k in moved)


def test_an_error_on_rank_0_stops_every_rank_and_the_run_resumes_exactly(launch):
    stopped, resumed = launch["stopped"], launch["resumed"]
    assert [r["code"] for r in stopped] == [1, 1]  # _Stop is no input error: exit code 1
    assert "_Stop: stopped" in stopped[0]["stderr"] and stopped[1]["stderr"] == ""
    assert stopped[0]["saves"] == [(1, False)] and stopped[1]["saves"] == []
    assert [r["code"] for r in resumed] == [0, 0]
    assert resumed[0]["saves"] == [(2, False), (EPOCHS, True)] and resumed[1]["saves"] == []
    full, part = load_checkpoint(launch["checkpoint"]), load_checkpoint(launch["part"])
    for k, v in full["state_dict"].items():
        assert torch.equal(v, part["state_dict"][k]), k
    for a, b in zip(launch["ranks"][0]["states"][1:], resumed[0]["states"], strict=True):
        for k, v in a["model"].items():  # RIAM state included
            assert torch.equal(v, b["model"][k]), k


def test_a_run_of_2_processes_is_not_resumed_by_one(launch, tmp_path):
    from _cli_helpers import run_cli

    path = tmp_path / "m.ckpt"
    payload = torch.load(launch["checkpoint"], weights_only=True)
    payload["complete"], payload["resume"] = False, {"loop": {}}
    torch.save(payload, path)
    code, _, err = run_cli([*launch["argv"][:-1], path, "--resume"])
    assert code == 2 and "pre-trained with 2 process(es), this run has 1" in err, err


# --------------------------------------------------------------------------- real torchrun
@pytest.mark.slow
def test_torchrun_launch_end_to_end(tmp_path):
    """The real launcher: ``torchrun --nproc-per-node 2 $(command -v stbat) pretrain``."""
    stbat = shutil.which("stbat", path=str(Path(sys.executable).parent))
    assert stbat is not None
    ckpt = tmp_path / "model.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", stbat, "pretrain", *ARGS, "--save",
                           str(ckpt)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("pre-trained stbat") == 1, done.stdout
    assert load_checkpoint(ckpt)["data"]["processes"] == 2
