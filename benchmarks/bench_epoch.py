"""Pre-training throughput (windows per second) of each built-in backbone on the full NYC data.

Run: ``.venv/bin/python benchmarks/bench_epoch.py [--backbones stnet,graph_stnet,...]
[--batches 8] [--rounds 3] [--baseline DIR] [--profile]``

Each measurement is one child process: it prepares the source cities exactly as ``stbat
pretrain`` does (full series, pipeline defaults of ``TransferConfig``: window 24, channels
folded into the batch, batch 32), builds the STBaT set-up (``stbat_setup``), runs one
warm-up batch, then times ``--batches`` batches of a fresh epoch iterator (``round_robin``
over the cities' loaders, as ``methods.pretrain``): loading, channel folding, the graph
context and ``train_iteration``. Validation is not included. Windows are counted before
channel folding (one window = ``[t, n, c]``). Sources: ``nyc_bike`` + ``nyc_taxi``
(69 zones, 2 years hourly); ``stnet`` needs a grid city, so it runs on
``nyc_bike_grid2014`` (16 x 8 cells, no POI: the temporal-profile descriptors).

``--baseline DIR`` also runs every child with ``PYTHONPATH=DIR``, where ``DIR`` holds
``stbat_plugin`` and ``stbat_backbones`` of another version (e.g. an export of an older
commit, with ``backbones`` linked as ``stbat_backbones``), interleaved with the current
code; the ratio current / baseline is printed per backbone (median over rounds).
``--profile`` prints the torch.profiler table of the timed batches of each child instead.
``--loading`` measures what the data path alone costs: one whole epoch of every source's
training windows (``nyc_bike`` + ``nyc_taxi``) through the loaders, ``round_robin`` and
``fold_channels``, no model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ("stnet", "graph_stnet", "pdformer", "gwnet", "stgcn")
SOURCES = {"stnet": ["nyc_bike_grid2014"]}
DEFAULT_SOURCES = ["nyc_bike", "nyc_taxi"]


def child(backbone: str, batches: int, threads: int, profile: bool, data_dir: str) -> None:
    """One measurement: print ``{"windows": W, "seconds": S, "cpu_seconds": C}`` last."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from stbat_plugin.pipeline.api import prepare_sources
    from stbat_plugin.pipeline.config import TransferConfig
    from stbat_plugin.pipeline.methods import _loaders, seed_everything, stbat_setup
    from stbat_plugin.pipeline.tasks import round_robin

    config = TransferConfig(backbone=backbone)
    src = prepare_sources(data_dir, SOURCES.get(backbone, DEFAULT_SOURCES), config)
    seed_everything(0)
    _, _, step = stbat_setup(src.tasks, config, src.descriptors, None)
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)

    def run(count: int) -> int:
        windows = 0
        for item in round_robin(_loaders(src.tasks, config, gen), rng, count):
            step(item)
            windows += int(item[1]["x"].shape[0])
        return windows

    run(1)  # warm-up: first-call allocations, graph context, caches
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            start, start_cpu = time.perf_counter(), time.process_time()
            windows = run(batches)
            seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    else:
        start, start_cpu = time.perf_counter(), time.process_time()
        windows = run(batches)
        seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    print(json.dumps({"windows": windows, "seconds": seconds, "cpu_seconds": cpu}))


def loading(threads: int, data_dir: str) -> None:
    """Windows per second of the data path alone over one whole epoch (``--loading``)."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from stbat_plugin.pipeline.api import prepare_sources
    from stbat_plugin.pipeline.config import TransferConfig
    from stbat_plugin.pipeline.methods import _loaders
    from stbat_plugin.pipeline.tasks import fold_channels, round_robin

    config = TransferConfig()
    src = prepare_sources(data_dir, DEFAULT_SOURCES, config)
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    windows = batches = 0
    start = time.process_time()
    for _, batch in round_robin(_loaders(src.tasks, config, gen), rng):
        fold_channels(batch, "cpu")
        windows, batches = windows + int(batch["x"].shape[0]), batches + 1
    cpu = time.process_time() - start
    print(f"data path alone, one epoch: {batches} batches, {windows} windows, {cpu:.2f} s CPU "
          f"= {cpu / batches * 1e3:.2f} ms per batch, {windows / cpu:.0f} windows/s")


def measure(backbone: str, args: argparse.Namespace, pythonpath: str | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", backbone,
           "--batches", str(args.batches), "--threads", str(args.threads),
           "--data-dir", args.data_dir] + (["--profile"] if args.profile else [])
    # run outside the repository, so that PYTHONPATH (not the working directory) picks the code
    out = subprocess.run(cmd, env=env, cwd="/", capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{backbone} ({pythonpath or 'current'}) failed:\n{out.stderr[-3000:]}")
    lines = out.stdout.strip().splitlines()
    if args.profile:
        print(f"--- {backbone} ({'baseline' if pythonpath else 'current'})")
        print("\n".join(lines[:-1]))
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--batches", type=int, default=8, help="timed batches per child")
    parser.add_argument("--rounds", type=int, default=3, help="children per backbone and version")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline", default=None, help="PYTHONPATH of the code to compare with")
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--loading", action="store_true", help="time the data path alone")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batches, args.threads, args.profile, args.data_dir)
        return
    if args.loading:
        loading(args.threads, args.data_dir)
        return
    versions = {"current": None} if args.baseline is None else \
        {"baseline": str(Path(args.baseline).resolve()), "current": None}
    rates: dict[tuple[str, str, str], list[float]] = {}
    names = [b for b in args.backbones.split(",") if b]
    for _ in range(args.rounds):
        for backbone in names:
            for version, path in versions.items():  # interleaved
                r = measure(backbone, args, path)
                for clock, key in (("wall", "seconds"), ("cpu", "cpu_seconds")):
                    rates.setdefault((backbone, version, clock), []).append(r["windows"] / r[key])
    print(f"pre-training throughput, STBaT, TransferConfig defaults, {args.batches} batches of "
          f"32 windows per child, {args.threads} thread(s), median of {args.rounds} children; "
          "windows per second of wall / CPU time")
    header = "| backbone | " + " | ".join(f"{v} (wall / cpu)" for v in versions)
    print(header + (" | current / baseline (wall / cpu) |" if args.baseline else " |"))
    print("|---" * (len(versions) + 1 + bool(args.baseline)) + "|")
    for backbone in names:
        med = {(v, c): statistics.median(rates[(backbone, v, c)]) for v in versions
               for c in ("wall", "cpu")}
        row = f"| {backbone} | " + " | ".join(f"{med[(v, 'wall')]:.1f} / {med[(v, 'cpu')]:.1f}"
                                             for v in versions)
        ratio = " |" if not args.baseline else " | " + " / ".join(
            f"{med[('current', c)] / med[('baseline', c)]:.2f}x" for c in ("wall", "cpu")) + " |"
        print(row + ratio, flush=True)


if __name__ == "__main__":
    main()
