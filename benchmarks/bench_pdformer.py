"""PDFormer's spatial attention: dense ``[n, n]`` mask vs edge lists, time and peak memory.

Run: ``.venv/bin/python benchmarks/bench_pdformer.py [--sizes 69,675,1200,5000] [--batch 4]
[--repeat 3]``

One forward + backward of ``PDFormer`` (default widths, ``t = 6``, one channel) with
``spatial_attention="dense"`` and ``"sparse"``, each in its own child process: median CPU
time of ``--repeat`` passes after one warm-up, and, in another child, the peak memory of one
pass (``VmHWM`` minus ``VmRSS`` after the inputs are built, the peak reset with
``/proc/self/clear_refs``; that child runs with ``MALLOC_MMAP_THRESHOLD_=65536``, so the peak
is that of live memory, as in ``bench_iteration.py``; the timing child keeps glibc's default,
since a mapping per large block would slow the gathers of the sparse path). Graphs:
``69``: NYC taxi zones (real adjacency); ``675``: Montevideo bus stops (real graph); other
sizes: an 8-neighbour grid of ``n / 50`` x 50 cells. ``auto`` is the mode the model picks
(:data:`stbat_backbones.pdformer.SPARSE_BELOW_DENSITY`); ``pairs`` is the share of the
``n^2`` pairs within 2 hops. ``--baseline DIR`` adds a column for another version of the
code (``PYTHONPATH=DIR``, e.g. an export of an older commit with ``backbones`` linked as
``stbat_backbones``), built with its defaults.
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

import torch

ROOT = Path(__file__).resolve().parents[1]


def graph(n: int) -> torch.Tensor:
    from stbat_plugin.data import build_graph, grid_graph, load_city

    if n in (69, 675):
        return build_graph(load_city(ROOT / "data", "nyc_taxi" if n == 69 else "montevideo_bus")
                           ).edge_index
    if n % 50:
        raise ValueError(f"--sizes: other sizes than 69 and 675 must be multiples of 50 (got {n})")
    return torch.as_tensor(grid_graph(n // 50, 50))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(n: int, mode: str, kind: str, args: argparse.Namespace) -> None:
    """Print ``{"seconds": ...}`` (``kind="time"``) or ``{"peak_mb": ...}`` (``"memory"``)."""
    from stbat_backbones.pdformer import PDFormer

    torch.set_num_threads(args.threads)
    ei = graph(n)
    x = torch.rand(args.batch, 6, n, 1, generator=torch.Generator().manual_seed(0))
    base = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    torch.manual_seed(0)
    model = PDFormer() if mode == "baseline" else PDFormer(spatial_attention=mode)
    times = []
    for i in range(args.repeat + 1 if kind == "time" else 1):
        start = time.process_time()
        model(x, edge_index=ei).square().mean().backward()
        if i:
            times.append(time.process_time() - start)
    print(json.dumps({"seconds": statistics.median(times)} if kind == "time" else
                     {"peak_mb": (_status_kb("VmHWM") - base) / 1024}))


def _run_child(n: int, mode: str, kind: str, args: argparse.Namespace) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(n), mode, kind,
           "--batch", str(args.batch), "--repeat", str(args.repeat), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if kind == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    if mode == "baseline":
        env["PYTHONPATH"] = str(Path(args.baseline).resolve())
    # outside the repository, so that PYTHONPATH (not the working directory) picks the code
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/")
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="69,675,1200,5000")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline", default=None, help="PYTHONPATH of the code to compare with")
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1], args.child[2], args)
        return
    from stbat_backbones.pdformer import Neighbourhood, neighbourhood_edges

    print(f"PDFormer forward + backward, batch {args.batch}, t=6, {args.threads} thread(s), "
          f"median CPU time of {args.repeat}")
    modes = ("dense", "sparse") + (("baseline",) if args.baseline else ())
    print("| n | pairs within 2 hops | auto | dense s | dense peak MB | sparse s | sparse peak MB |"
          + (" baseline s | baseline peak MB |" if args.baseline else ""))
    print("|---" * (3 + 2 * len(modes)) + "|")
    for n in (int(v) for v in args.sizes.split(",")):
        edges = neighbourhood_edges(graph(n), n, 2)
        auto = "dense" if Neighbourhood(edges, n, "auto").mask is not None else "sparse"
        row = []
        for mode in modes:
            for kind in ("time", "memory"):
                r = _run_child(n, mode, kind, args)
                row.append("failed" if r is None else f"{r['seconds']:.2f}" if kind == "time"
                           else f"{r['peak_mb']:.0f}")
        print(f"| {n} | {edges.shape[1] / n**2:.2%} | {auto} | " + " | ".join(row) + " |",
              flush=True)


if __name__ == "__main__":
    main()
