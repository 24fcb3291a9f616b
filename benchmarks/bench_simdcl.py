"""Time SimDCL (Eq. 13) forward + backward against a plain InfoNCE of the same size.

Run: ``.venv/bin/python benchmarks/bench_simdcl.py [--sizes 1000 4000 10000] [--repeat 3]``

SimDCL sorts each row of delta and reads a cumulative log-sum-exp: O(n^2 log n) time,
O(n^2) memory. The baseline, measured in the same run, is the cheapest loss of the
same size: cosine logits [n, n] and a softmax cross-entropy over every other region
(InfoNCE with every k != i as a positive). The ratio says what the similarity-aware
denominators cost on top of that.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from stbat_plugin.functional import pattern_similarity, simdcl_loss


def infonce_all_pairs(d: torch.Tensor, tau: float) -> torch.Tensor:
    """Baseline: -log softmax over j != i, averaged over the n(n-1) pairs (i, k != i)."""
    n = d.shape[0]
    logits = pattern_similarity(d) / tau
    eye = torch.eye(n, dtype=torch.bool)
    log_prob = torch.log_softmax(logits.masked_fill(eye, float("-inf")), dim=1)
    return -log_prob.masked_fill(eye, 0.0).sum() / (n * (n - 1))


def naive_simdcl(d: torch.Tensor, delta: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 13 as three loops (for context at small n only)."""
    n = d.shape[0]
    s = F.normalize(d, dim=1) @ F.normalize(d, dim=1).t()
    total = d.new_zeros(())
    for i in range(n):
        for k in range(n):
            if k == i:
                continue
            den = sum(torch.exp(s[i, j] / tau) for j in range(n)
                      if j != i and delta[i, j] <= delta[i, k])
            total = total - torch.log(torch.exp(s[i, k] / tau) / den)
    return total / (n * (n - 1))


def time_fwd_bwd(fn, d: torch.Tensor, delta: torch.Tensor, tau: float, repeat: int) -> float:
    times = []
    for _ in range(repeat + 1):  # first run is warm-up
        x = d.detach().clone().requires_grad_(True)
        start = time.perf_counter()
        loss = fn(x, delta, tau) if fn is not infonce_all_pairs else fn(x, tau)
        loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 10000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    tau = 1.0
    n = 40
    d = torch.randn(n, args.dim, generator=gen)
    delta = torch.randint(0, 5, (n, n), generator=gen).float()  # many ties
    t_naive = time_fwd_bwd(naive_simdcl, d, delta, tau, 1)
    t_fast = time_fwd_bwd(simdcl_loss, d, delta, tau, args.repeat)
    same = math.isclose(float(naive_simdcl(d, delta, tau)), float(simdcl_loss(d, delta, tau)),
                        rel_tol=1e-4)
    print(f"naive loops at n={n}: {t_naive:.3f} s vs {t_fast * 1e3:.2f} ms "
          f"(x{t_naive / t_fast:.0f}); same value: {same}")

    print(f"SimDCL forward+backward, d={args.dim}, float32, {torch.get_num_threads()} threads, "
          f"median of {args.repeat}")
    print(f"{'n':>7} {'simdcl s':>10} {'infonce s':>10} {'ratio':>7} {'n^3 tensor':>11}")
    for n in args.sizes:
        d = torch.randn(n, args.dim, generator=gen)
        delta = pattern_similarity(torch.randn(n, 32, generator=gen))
        t_simdcl = time_fwd_bwd(simdcl_loss, d, delta, tau, args.repeat)
        t_base = time_fwd_bwd(infonce_all_pairs, d, delta, tau, args.repeat)
        cubic_gb = n**3 * 4 / 1e9
        print(f"{n:>7} {t_simdcl:>10.3f} {t_base:>10.3f} {t_simdcl / t_base:>7.2f} "
              f"{cubic_gb:>9.0f}GB")


if __name__ == "__main__":
    main()
