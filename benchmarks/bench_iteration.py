"""Wall time of one STBaT iteration vs one plain iteration of the same network.

Run: ``.venv/bin/python benchmarks/bench_iteration.py [--iters 20] [--batch 32]``

Both on the same real batch of the tiny NYC taxi data (69 zones, 2 channels), with the
graph ST-net backbone at the paper's sizes (64 channels, 128 LSTM units, predictor and
projector 256). STBaT: ``BalancedTransfer.train_iteration`` (step 1: weighted loss +
SimDCL, step 2: RIAM, refresh of rho and delta). Plain: ``transferable()`` (backbone +
predictor) with MSE and one Adam step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stbat_plugin import BalancedTransfer, create_backbone

DATA = Path(__file__).parents[1] / "data" / "tiny" / "nyc_taxi.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with np.load(DATA) as d:
        flow = torch.from_numpy(d["flow"]).float()
        poi = torch.from_numpy(d["poi"]).float()
        adjacency = torch.from_numpy(d["adjacency"])
    flow = flow / flow.max()
    edge_index = torch.nonzero(adjacency > 0).t().contiguous()
    x = torch.stack([flow[i:i + 6] for i in range(args.batch)])
    y = torch.stack([flow[i + 6:i + 7] for i in range(args.batch)])

    model = BalancedTransfer(create_backbone("graph_stnet", in_channels=2), region_features=poi,
                             out_channels=2)
    opts = model.configure_optimizers(lr=1e-3)
    plain = copy.deepcopy(model.transferable())
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)

    def stbat_step() -> None:
        model.train_iteration(x, y, opts, edge_index=edge_index)

    def plain_step() -> None:
        loss = F.mse_loss(plain(x, edge_index=edge_index), y)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    times: dict[str, list[float]] = {"stbat": [], "plain": []}
    for it in range(args.warmup + args.iters):
        for name, step in (("stbat", stbat_step), ("plain", plain_step)):  # interleaved
            start = time.perf_counter()
            step()
            if it >= args.warmup:
                times[name].append(time.perf_counter() - start)
    stbat, base = statistics.median(times["stbat"]), statistics.median(times["plain"])
    print(f"one training iteration, graph_stnet (64/128), nyc_taxi tiny, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, median of {args.iters} after {args.warmup} warm-up")
    print(f"  plain (backbone + predictor, MSE, Adam): {base * 1e3:8.1f} ms")
    print(f"  STBaT train_iteration:                   {stbat * 1e3:8.1f} ms")
    print(f"  ratio STBaT / plain:                     {stbat / base:8.2f}")


if __name__ == "__main__":
    main()
