"""Epoch time of multi-process pre-training (torchrun, gloo on CPU) against one process.

Run: ``.venv/bin/python benchmarks/bench_distributed.py [--procs 2] [--rounds 3]
[-- extra stbat pretrain flags]``

Each round runs the same ``stbat pretrain`` twice, one after the other: as one process, then
under ``torchrun --standalone --nproc-per-node N``. Inside each run the trainer's epochs
(training only) and the validations are timed on rank 0; per-epoch medians over the rounds
and the ratio N processes / 1 process are printed. Both runs see the same global stream of
source batches per epoch (``--max-batches-per-epoch``): one process steps on each batch, N
processes step once per N batches (one each), so the ratio is the wall time of an epoch of
the same data. Defaults: ``nyc_bike`` + ``nyc_taxi`` (69 zones) of March 2019, graph_stnet
with channels 16 / hidden 32, batch 32, 32 batches per epoch, 2 epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["--data-dir", str(ROOT / "data"), "--source", "nyc_bike,nyc_taxi", "--source-span",
           "2019-03-01:2019-03-31", "--backbone-kwargs", '{"channels": 16, "hidden": 32}',
           "--batch-size", "32", "--max-batches-per-epoch", "32", "--max-epochs", "2",
           "--patience", "5", "--quiet"]


def worker(out: str, flags: list[str]) -> None:
    """One ``stbat pretrain`` (in a torchrun process or alone), timing epochs and validations."""
    import torch

    from stbat_plugin.pipeline import cli, distributed
    from stbat_plugin.pipeline.trainer import Trainer

    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"epoch": [], "validate": []}
    real_epoch, real_fit = Trainer._epoch, Trainer.fit

    def epoch(self, *a, **k):
        start = time.perf_counter()
        try:
            return real_epoch(self, *a, **k)
        finally:
            times["epoch"].append(time.perf_counter() - start)

    def fit(self, model, batches, step, validate, **k):
        def timed() -> float:
            start = time.perf_counter()
            try:
                return validate()
            finally:
                times["validate"].append(time.perf_counter() - start)
        return real_fit(self, model, batches, step, timed, **k)

    Trainer._epoch, Trainer.fit = epoch, fit  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        code = cli.main(["pretrain", *flags, "--save", str(Path(tmp) / "m.ckpt")])
    env = distributed.launch_env()
    if code == 0 and (env is None or env.rank == 0):
        Path(out).write_text(json.dumps(times))
    sys.exit(code)


def run(procs: int, flags: list[str]) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        me = [str(Path(__file__).resolve()), "--worker", str(out), "--", *flags]
        cmd = [sys.executable, *me] if procs == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(procs), *me]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("flags", nargs="*", help="stbat pretrain flags (after --)")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.flags)
        return
    flags = args.flags or DEFAULT
    results: dict[int, dict[str, list[float]]] = {1: {"epoch": [], "validate": []},
                                                   args.procs: {"epoch": [], "validate": []}}
    for r in range(args.rounds):
        for procs in (1, args.procs):
            t = run(procs, flags)
            for key in t:
                results[procs][key] += t[key]
            print(f"round {r + 1}, {procs} process(es): epochs {[round(x, 2) for x in t['epoch']]}"
                  f" s, validations {[round(x, 2) for x in t['validate']]} s", flush=True)
    one, many = results[1], results[args.procs]
    print(f"\nmedian over {args.rounds} rounds (s)   1 process   {args.procs} processes   ratio")
    for key in ("epoch", "validate"):
        a, b = statistics.median(one[key]), statistics.median(many[key])
        print(f"{key:<30} {a:>9.2f}   {b:>11.2f}   {b / a:>5.2f}")


if __name__ == "__main__":
    main()
