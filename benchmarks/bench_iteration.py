"""Time and peak memory of one STBaT iteration vs one plain iteration of the same network.

Run: ``.venv/bin/python benchmarks/bench_iteration.py [--cases tiny,stnet460,graph675,graph5000]
[--iters 10] [--warmup 2] [--batch 32] [--no-memory]``

STBaT: ``BalancedTransfer.train_iteration`` (step 1: weighted loss + SimDCL, step 2: RIAM,
refresh of rho and delta). Plain: ``transferable()`` (backbone + predictor) with the
unweighted loss of Eq. 15 and one Adam step, the same optimiser as STBaT's step 1. Both at
the paper's widths (64 channels, 128 LSTM units, predictor and projector 256, RIAM 16/32),
``t = 6``, ``s = 1``, the paper's setting (no input normalisation, no skip).

Cases:

- ``tiny``: graph ST-net on the tiny NYC taxi data (69 zones, 2 channels).
- ``stnet460``: ST-net on a 20 x 23 grid (460 cells, the paper's grid), 1 channel
  (the paper trains pickup and drop-off as separate tasks), synthetic flow.
- ``graph675``: graph ST-net on Montevideo (675 bus stops, the real flow and graph).
- ``graph5000``: graph ST-net on a 50 x 100 grid graph (5,000 regions, 8 neighbours),
  synthetic flow.

POI counts are random (k = 14) where the city has none: their values do not change the cost.

Time: the two steps alternate on the same batch (interleaved, each going first in every
other round), ``--warmup`` rounds are dropped, and the median of ``--iters`` rounds is
reported, in wall time and in process CPU time (with one thread, CPU time does not count the
time the process waits for a core, so it is the steadier figure on a shared machine).

Memory: each method runs alone in a child process. After the data is in memory, the child
reads its resident set (``VmRSS``), resets its peak (``echo 5 > /proc/self/clear_refs``),
builds the model and optimisers and runs ``--warmup + --mem-iters`` iterations; the
reported peak is ``VmHWM - VmRSS`` at the reset: parameters, optimiser state, STBaT's
per-city state and the iteration's activations, without the interpreter and the data.
The children run with ``MALLOC_MMAP_THRESHOLD_=65536`` (``--mmap-threshold``): every block
above 64 KiB is its own mapping, returned to the system when freed, so the high-water mark
is the peak of live memory. With glibc's default (``--mmap-threshold 0``) freed blocks stay
in the heap and the peak also depends on how allocations of different sizes interleave
(STBaT's many small tensors between the backbone's large ones).

``--simdcl-anchors m`` builds STBaT with SimDCL over ``m`` sampled anchors per step.
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
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CASES = ("tiny", "stnet460", "graph675", "graph5000")
DESCRIPTION = {
    "tiny": "graph_stnet, NYC taxi tiny, n=69, c=2",
    "stnet460": "stnet, 20 x 23 grid, n=460, c=1",
    "graph675": "graph_stnet, Montevideo, n=675, c=1",
    "graph5000": "graph_stnet, 50 x 100 grid graph, n=5000, c=1",
}


def _windows(flow: torch.Tensor, batch: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = np.linspace(0, flow.shape[0] - window - 1, batch).astype(int)
    x = torch.stack([flow[s:s + window] for s in starts])
    y = torch.stack([flow[s + window:s + window + 1] for s in starts])
    return x, y


def _synthetic_flow(steps: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Daily cycles of random phase and size, plus noise: ``[steps, n, 1]`` in [0, 1]."""
    hours = torch.arange(steps, dtype=torch.float32)[:, None]
    phase, size = torch.rand(n, generator=gen) * 24, torch.rand(n, generator=gen)
    flow = size * (1 + torch.sin(2 * torch.pi * (hours + phase) / 24)) / 2
    flow = flow + 0.1 * torch.rand(steps, n, generator=gen)
    return (flow / flow.max())[..., None]


def build_case(case: str, batch: int) -> dict[str, Any]:
    """Batch ``x``, ``y``, descriptors, graph keywords and the backbone of a case."""
    from stbat_plugin.data import build_graph, load_city
    from stbat_plugin.data.graph import grid_graph

    gen = torch.Generator().manual_seed(0)
    window = 6
    if case == "tiny":
        with np.load(ROOT / "data" / "tiny" / "nyc_taxi.npz") as d:
            flow = torch.from_numpy(d["flow"]).float()
            poi = torch.from_numpy(d["poi"]).float()
            adjacency = torch.from_numpy(d["adjacency"])
        flow = flow / flow.max()
        graph = {"edge_index": torch.nonzero(adjacency > 0).t().contiguous()}
        backbone = ("graph_stnet", {"in_channels": 2})
    elif case == "stnet460":
        h, w = 20, 23
        flow = _synthetic_flow(24 * 14, h * w, gen)
        graph = {"grid_shape": (h, w)}
        backbone = ("stnet", {})
    elif case == "graph675":
        city = load_city(ROOT / "data", "montevideo_bus")
        flow = torch.as_tensor(city.flow, dtype=torch.float32)
        flow = flow / flow.max()
        g = build_graph(city)
        graph = {"edge_index": g.edge_index, "edge_weight": g.edge_weight}
        backbone = ("graph_stnet", {})
    elif case == "graph5000":
        h, w = 50, 100
        flow = _synthetic_flow(24 * 14, h * w, gen)
        graph = {"edge_index": torch.as_tensor(grid_graph(h, w))}
        backbone = ("graph_stnet", {})
    else:
        raise ValueError(f"Unknown case {case!r}; choose from {list(CASES)}")
    n, c = flow.shape[1], flow.shape[2]
    if case != "tiny":
        poi = torch.poisson(torch.rand(n, 14, generator=gen) * 5, generator=gen)
    x, y = _windows(flow, batch, window)
    return {"x": x, "y": y, "poi": poi, "graph": graph, "backbone": backbone, "channels": c}


def build_methods(data: dict[str, Any], which: tuple[str, ...]) -> dict[str, Any]:
    """Step functions of ``which`` (``"stbat"``, ``"plain"``), starting from the same weights
    (and the STBaT model itself under ``"model"``)."""
    import copy

    from stbat_plugin import BalancedTransfer, create_backbone
    from stbat_plugin import functional as SF
    from stbat_plugin.network import PredictionNetwork

    name, kwargs = data["backbone"]
    x, y, graph = data["x"], data["y"], data["graph"]
    torch.manual_seed(0)
    steps: dict[str, Any] = {}
    if "stbat" in which:
        extra = {} if data.get("anchors") is None else {"simdcl_anchors": data["anchors"]}
        model = BalancedTransfer(create_backbone(name, **kwargs), region_features=data["poi"],
                                 out_channels=data["channels"], **extra)
        opts = model.configure_optimizers(lr=1e-3)
        steps["stbat"] = lambda: model.train_iteration(x, y, opts, **graph)
        steps["model"] = model
        plain = copy.deepcopy(model.transferable()) if "plain" in which else None
    else:
        plain = PredictionNetwork(create_backbone(name, **kwargs), out_channels=data["channels"])
    if plain is not None:
        plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)

        def plain_step() -> None:
            loss = SF.weighted_prediction_loss(plain(x, **graph), y)
            plain_opt.zero_grad(set_to_none=True)
            loss.backward()
            plain_opt.step()

        steps["plain"] = plain_step
    return steps


def time_case(case: str, args: argparse.Namespace) -> dict[str, float]:
    data = {**build_case(case, args.batch), "anchors": args.simdcl_anchors}
    steps = build_methods(data, ("stbat", "plain"))
    model = steps.pop("model")
    wall: dict[str, list[float]] = {"stbat": [], "plain": []}
    cpu: dict[str, list[float]] = {"stbat": [], "plain": []}
    for it in range(args.warmup + args.iters):
        order = list(steps.items()) if it % 2 == 0 else list(steps.items())[::-1]
        for name, step in order:  # interleaved, alternating which goes first
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            if it >= args.warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    med = {f"{kind}_{name}": statistics.median(values[name])
           for kind, values in (("wall", wall), ("cpu", cpu)) for name in ("stbat", "plain")}
    if args.breakdown:
        med.update(breakdown(model, data, args))
    return med


def breakdown(model: Any, data: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    """CPU time of STBaT's own parts, median of ``--iters``: refresh of rho and delta,
    SimDCL forward + backward (on the projector's output), RIAM's step-2 loss + backward."""
    from stbat_plugin import functional as SF

    state = model._city(None)
    with torch.no_grad():
        _, z = model.net.forward_with_features(data["x"], **data["graph"])
        mu, sigma = SF.region_feature_stats(z[:, state.valid])
    d = model.projector(torch.cat([mu, sigma], dim=-1)).detach().requires_grad_()

    def simdcl() -> None:
        loss = model._simdcl(d, state) if hasattr(model, "_simdcl") else \
            SF.simdcl_loss(d, state.delta, model.tau)
        loss.backward()

    def riam() -> None:
        model.riam_loss(state, mu, sigma)[0].backward()

    parts = {"refresh": lambda: model.refresh_imbalance(state), "simdcl": simdcl, "riam": riam}
    out = {}
    for name, part in parts.items():
        times = []
        for _ in range(args.iters):
            start = time.process_time()
            part()
            times.append(time.process_time() - start)
        out[f"part_{name}"] = statistics.median(times)
    return out


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(case: str, method: str, args: argparse.Namespace) -> None:
    """Run in a child: print ``{"peak_mb": ..., "base_mb": ...}`` (see the module docstring)."""
    data = {**build_case(case, args.batch), "anchors": args.simdcl_anchors}
    import gc

    gc.collect()
    base = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    steps = build_methods(data, (method,))
    for _ in range(args.warmup + args.mem_iters):
        steps[method]()
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - base) / 1024, "base_mb": base / 1024}))


def memory_case(case: str, args: argparse.Namespace) -> dict[str, float]:
    out = {}
    for method in ("stbat", "plain"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", case, method,
               "--batch", str(args.batch), "--warmup", str(args.warmup),
               "--mem-iters", str(args.mem_iters), "--threads", str(args.threads)]
        if args.simdcl_anchors is not None:
            cmd += ["--simdcl-anchors", str(args.simdcl_anchors)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        if args.mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"memory child {case}/{method} failed:\n{done.stderr[-3000:]}")
        out[f"mem_{method}"] = json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="tiny", help=f"comma-separated, of {list(CASES)}")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mem-iters", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-time", action="store_true")
    parser.add_argument("--mmap-threshold", type=int, default=65536,
                        help="MALLOC_MMAP_THRESHOLD_ of the memory children (0: glibc's default)")
    parser.add_argument("--simdcl-anchors", type=int, default=None,
                        help="BalancedTransfer(simdcl_anchors=m): SimDCL over m sampled anchors")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time STBaT's refresh, SimDCL and RIAM step alone")
    parser.add_argument("--memory-child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, args)
        return
    print(f"one training iteration, batch {args.batch}, t=6, {torch.get_num_threads()} thread(s), "
          f"median of {args.iters} interleaved rounds after {args.warmup} warm-up")
    print("| case | plain ms (wall / cpu) | STBaT ms (wall / cpu) | time ratio (wall / cpu) "
          "| plain peak MB | STBaT peak MB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    parts: list[str] = []
    for case in [c for c in args.cases.split(",") if c]:
        r = {} if args.no_time else time_case(case, args)
        if not args.no_memory:
            r.update(memory_case(case, args))
        mem = (f"{r['mem_plain']:.0f} | {r['mem_stbat']:.0f} | {r['mem_stbat'] / r['mem_plain']:.3f}"
               if "mem_plain" in r else "- | - | -")
        times = "- | - | -" if args.no_time else (
            f"{r['wall_plain'] * 1e3:.0f} / {r['cpu_plain'] * 1e3:.0f} "
            f"| {r['wall_stbat'] * 1e3:.0f} / {r['cpu_stbat'] * 1e3:.0f} "
            f"| {r['wall_stbat'] / r['wall_plain']:.3f} / {r['cpu_stbat'] / r['cpu_plain']:.3f}")
        print(f"| {DESCRIPTION[case]} | {times} | {mem} |", flush=True)
        if args.breakdown and not args.no_time:
            parts.append(f"| {DESCRIPTION[case]} | {r['cpu_stbat'] * 1e3 - r['cpu_plain'] * 1e3:.0f} | "
                         + " | ".join(f"{r['part_' + k] * 1e3:.1f}" for k in ("refresh", "simdcl", "riam"))
                         + " |")
    if args.breakdown:
        print("\nSTBaT's parts alone, CPU ms (median of --iters)")
        print("| case | STBaT - plain | refresh_imbalance | SimDCL fwd+bwd | RIAM loss+bwd |")
        print("|---|---|---|---|---|")
        print("\n".join(parts))


if __name__ == "__main__":
    main()
