"""Time and peak memory of SimDCL (Eq. 13), the KDE (Eq. 6) and the similarity (Eq. 7) up to 50k regions.

Run: ``.venv/bin/python benchmarks/bench_simdcl.py [--sizes 1000 4000 10000 20000 50000]
[--ops ...] [--repeat 3] [--threads 1] [--variance]``

Each (operation, n) runs in its own child process. ``peak`` is the child's peak resident set
during the runs (``VmHWM`` of ``/proc/self/status``, reset through ``/proc/self/clear_refs``
once the inputs are built, so building a dense input does not count; ``ru_maxrss`` from
``os.wait4`` where the reset is not allowed), ``extra`` that peak minus the resident set
after the inputs were built (torch itself and the inputs): what the computation adds.
Times are the median of ``--repeat`` runs after one warm-up (one run, no warm-up, when a
run takes over 20 s). Operations:

* ``ref``: today's one-block SimDCL under autograd (``functional._simdcl_dense``), O(n^2);
* ``exact``: chunked exact SimDCL from a dense ``delta`` (``simdcl_loss(..., chunk=auto)``);
* ``exact_phi``: chunked exact SimDCL with delta rows recomputed from phi (the wrapper's path
  at large n: no ``[n, n]`` tensor at all, ``simdcl_loss_from_embeddings``);
* ``sampled``: ``exact_phi`` over ``--anchors`` sampled anchor rows (unbiased estimate);
* ``infonce``: the baseline of the ratio, InfoNCE over every other region (cosine logits,
  log-softmax per row) by the same blocks, value and closed-form gradient in one pass: the
  cheapest loss that touches the same n^2 logits, forward + backward; the ratio is what the
  similarity-aware ranking (the sort and the tie groups) costs on top;
* ``kde``: ``kde_log_density`` without gradient (as in ``refresh_imbalance``); ``kde_grad``
  with forward + backward;
* ``similarity``: every row block of ``pattern_similarity(phi, rows=...)``, reduced per block.

``--variance`` measures the relative standard deviation of the sampled estimator (loss and
gradient) against the exact loss on clustered synthetic embeddings, next to the value
predicted by sampling theory, ``sqrt((1 - m/n) / m) * CV(row losses)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

from stbat_plugin import functional as SF

DIM, EMBED, TAU = 256, 32, 1.0
OPS = ("ref", "exact", "exact_phi", "sampled", "infonce", "kde", "kde_grad", "similarity")


# --------------------------------------------------------------------------- operations
class _InfoNCE(torch.autograd.Function):
    """Baseline: -log softmax over j != i, mean over the n(n-1) pairs (i, k != i), by blocks of
    rows with value and closed-form gradient in one pass, as ``functional._SimDCLRows`` does."""

    @staticmethod
    def forward(ctx, unit, tau, chunk):  # type: ignore[override]
        n = unit.shape[0]
        total, grad = 0.0, torch.zeros_like(unit)
        for start in range(0, n, chunk):
            rows = torch.arange(start, min(start + chunk, n))
            own = (torch.arange(rows.numel()), rows)
            logits = unit[rows] @ unit.t() / tau
            logits[own] = float("-inf")
            lse = torch.logsumexp(logits, dim=1, keepdim=True)
            total += float(((n - 1) * lse.squeeze(1) - logits.nan_to_num(neginf=0.0).sum(1)).sum())
            g = torch.exp(logits - lse).mul_(n - 1).sub_(1.0)
            g[own] = 0.0
            grad.index_add_(0, rows, g @ unit)
            grad.addmm_(g.t(), unit[rows])
        ctx.save_for_backward(grad / (tau * n * (n - 1)))
        return unit.new_tensor(total / (n * (n - 1)))

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None


def infonce_chunked(d: torch.Tensor, tau: float, chunk: int) -> torch.Tensor:
    return _InfoNCE.apply(torch.nn.functional.normalize(d, dim=1), tau, chunk)


def _inputs(op: str, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {"phi": torch.randn(n, EMBED, generator=gen)}
    if op not in ("kde", "kde_grad", "similarity"):
        out["d"] = torch.randn(n, DIM, generator=gen)
    if op in ("ref", "exact"):
        out["delta"] = SF.pattern_similarity(out["phi"], rows=slice(0, n))
    return out


def _run(op: str, n: int, inp: dict[str, torch.Tensor], anchors: int) -> None:
    chunk = SF.chunk_rows(n) or n
    if op in ("kde", "similarity"):
        with torch.no_grad():
            if op == "kde":
                SF.kde_log_density(inp["phi"], 0.85)
            else:
                for s in range(0, n, chunk):
                    SF.pattern_similarity(inp["phi"], rows=slice(s, s + chunk)).amax(dim=1)
        return
    if op == "kde_grad":
        phi = inp["phi"].clone().requires_grad_(True)
        SF.kde_log_density(phi, 0.85).sum().backward()
        return
    d = inp["d"].clone().requires_grad_(True)
    if op == "ref":
        loss = SF._simdcl_dense(d, inp["delta"], TAU, n)
    elif op == "exact":
        loss = SF.simdcl_loss(d, inp["delta"], TAU, chunk=chunk)
    elif op == "exact_phi":
        loss = SF.simdcl_loss_from_embeddings(d, inp["phi"], TAU, chunk=chunk)
    elif op == "sampled":
        loss = SF.simdcl_loss_from_embeddings(d, inp["phi"], TAU, chunk=chunk, anchors=anchors)
    elif op == "infonce":
        loss = infonce_chunked(d, TAU, chunk)
    else:
        raise ValueError(op)
    loss.backward()


def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(op: str, n: int, repeat: int, anchors: int) -> None:
    inp = _inputs(op, n)
    base = _rss_mb()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current resident set
        reset = True
    except OSError:
        reset = False
    times = []
    for i in range(repeat + 1):
        start = time.perf_counter()
        _run(op, n, inp, anchors)
        times.append(time.perf_counter() - start)
        if i == 0 and times[0] > 20:
            break  # too slow to repeat: report the single run
    kept = times if len(times) == 1 else times[1:]
    print(json.dumps({"time": statistics.median(kept), "runs": len(kept), "base_mb": base,
                      "hwm_mb": _rss_mb("VmHWM") if reset else None}))


def measure(op: str, n: int, args: argparse.Namespace) -> dict[str, float] | str:
    cmd = [sys.executable, __file__, "--child", op, str(n), "--repeat", str(args.repeat),
           "--anchors", str(args.anchors), "--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    if status != 0:
        return f"failed ({err.strip().splitlines()[-1] if err.strip() else status})"
    row = json.loads(out.strip().splitlines()[-1])
    row["peak_mb"] = row["hwm_mb"] or usage.ru_maxrss / 1024  # KiB on Linux
    return row


def skip_reason(op: str, n: int, args: argparse.Namespace) -> str | None:
    if op == "ref" and n > args.ref_max:
        return f"n > {args.ref_max}: O(n^2) tensors (~{60 * n * n / 1e9:.0f} GB)"
    if op == "exact" and n * n * 4 > args.delta_max_gb * 1e9:
        return f"the dense delta alone is {n * n * 4 / 1e9:.0f} GB"
    if op in ("exact", "exact_phi", "infonce") and n > args.exact_max:
        return f"n > --exact-max {args.exact_max}"
    return None


# --------------------------------------------------------------------------- variance
def variance(args: argparse.Namespace) -> None:
    n, reps = args.variance_n, args.variance_repeat
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(20, EMBED, generator=gen) * 3
    phi = centres[torch.randint(0, 20, (n,), generator=gen)] + torch.randn(n, EMBED, generator=gen)
    d = torch.tanh(phi @ torch.randn(EMBED, DIM, generator=gen) / 4
                   + 0.5 * torch.randn(n, DIM, generator=gen)).double().requires_grad_(True)
    phi = phi.double()
    exact = SF.simdcl_loss_from_embeddings(d, phi, TAU)
    (g_exact,) = torch.autograd.grad(exact, d)
    exact_value = float(exact.detach())
    # per-anchor row losses, for the sampling-theory prediction
    with torch.no_grad():  # no graph per row: 2,000 graphs would hold 2,000 [n, d] gradients
        rows = torch.stack([SF.simdcl_loss_from_embeddings(d, phi, TAU, anchors=torch.tensor([i]))
                            for i in range(n)])
    cv = float(rows.std() / rows.mean())
    print(f"\nSampled SimDCL vs exact, n={n}, clustered embeddings, float64, {reps} draws per m; "
          f"exact loss {exact_value:.4f}, CV of the {n} row losses {cv:.4f}")
    print(f"{'m':>6} {'mean/exact':>11} {'rel std':>9} {'theory':>9} {'grad rel err':>13} {'time ratio':>11}")
    t0 = time.perf_counter()
    SF.simdcl_loss_from_embeddings(d, phi, TAU).backward()
    t_exact = time.perf_counter() - t0
    for m in args.variance_m:
        gm = torch.Generator().manual_seed(m)
        values, errs, times = [], [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            est = SF.simdcl_loss_from_embeddings(d, phi, TAU, anchors=m, generator=gm)
            (g,) = torch.autograd.grad(est, d)
            times.append(time.perf_counter() - t0)
            values.append(float(est.detach()))
            errs.append(float((g - g_exact).norm() / g_exact.norm()))
        rel_std = statistics.stdev(values) / exact_value
        theory = math.sqrt((1 - m / n) / m) * cv
        print(f"{m:>6} {statistics.mean(values) / exact_value:>11.5f} {rel_std:>9.5f} {theory:>9.5f} "
              f"{statistics.mean(errs):>13.4f} {statistics.median(times) / t_exact:>11.3f}")


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 4000, 10000, 20000, 50000])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--anchors", type=int, default=1024, help="m of the sampled estimator")
    parser.add_argument("--ref-max", type=int, default=10000, help="largest n for the O(n^2) reference")
    parser.add_argument("--exact-max", type=int, default=50000, help="largest n for exact SimDCL")
    parser.add_argument("--delta-max-gb", type=float, default=2.0,
                        help="largest dense delta given to 'exact'")
    parser.add_argument("--variance", action="store_true", help="also measure the sampled estimator")
    parser.add_argument("--variance-n", type=int, default=2000)
    parser.add_argument("--variance-m", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--variance-repeat", type=int, default=30)
    parser.add_argument("--child", nargs=2, metavar=("OP", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child[0], int(args.child[1]), args.repeat, args.anchors)
        return
    print(f"d={DIM}, D={EMBED}, float32, {args.threads} thread(s), tau={TAU}, h=0.85; "
          f"chunk = functional.chunk_rows(n) (one block up to {SF.AUTO_DENSE_MAX}); "
          f"sampled: m={args.anchors}; peak = child's peak RSS, extra = peak - RSS after inputs")
    print(f"{'op':>10} {'n':>6} {'chunk':>6} {'time s':>9} {'x infonce':>10} {'peak MB':>9} "
          f"{'extra MB':>9}")
    for n in args.sizes:
        base_time = None
        for op in sorted(args.ops, key=lambda o: o != "infonce"):  # the baseline first
            chunk = SF.chunk_rows(n) or n
            reason = skip_reason(op, n, args)
            if reason:
                print(f"{op:>10} {n:>6} {chunk:>6}   skipped: {reason}", flush=True)
                continue
            row = measure(op, n, args)
            if isinstance(row, str):
                print(f"{op:>10} {n:>6} {chunk:>6}   {row}", flush=True)
                continue
            if op == "infonce":
                base_time = row["time"]
            ratio = "" if base_time is None or op in ("kde", "kde_grad", "similarity") else \
                f"{row['time'] / base_time:.2f}"
            runs = "" if row["runs"] > 1 else " (1 run)"
            print(f"{op:>10} {n:>6} {chunk:>6} {row['time']:>9.3f} {ratio:>10} "
                  f"{row['peak_mb']:>9.0f} {row['peak_mb'] - row['base_mb']:>9.0f}{runs}", flush=True)
    if args.variance:
        variance(args)


if __name__ == "__main__":
    main()
