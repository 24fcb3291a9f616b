"""Hypothesis fuzzing of ``stbat_plugin.functional`` (issue 10): accepted and finite, or refused.

Each case is a valid call of one function with random shapes, dtypes (float16, bfloat16,
float32, float64) and values (ordinary, scaled by 1e-300 ... up to the dtype's largest
power of ten, zeros, subnormals, huge finite numbers), and, in about half of the cases, one
fault: NaN or inf somewhere, an integer dtype, an empty or wrong shape, a setting that is not
a finite positive number, a bad chunk, bad anchors, bad weights or a bad mask. Each case must

* be **accepted**: no NaN in the output or in the gradient; the KDE, weights, similarity and
  SimDCL also finite (the statistics, KLD and prediction loss may be +inf only where the value
  exceeds the dtype's range, as their docstrings say; a non-finite feature, or prediction or
  target in a valid entry, propagates, as documented, and a masked-out one changes nothing), or
* be **refused** with ``ValueError`` or ``TypeError``, the documented error types.

Any other exception fails the test. Cases are derandomized (the same ones every run). Each
case is counted by function and outcome (``tests/_fuzz_tally.py``): the counts are printed at
the end of the pytest session, and ``python tests/test_functional_fuzz.py`` runs these tests
alone and prints them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _fuzz_tally import lines, record, refused
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stbat_plugin import functional as SF

MAX_EXAMPLES = 60
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None)

FLOATS = st.sampled_from((torch.float16, torch.bfloat16, torch.float32, torch.float32, torch.float64,
                          torch.float64))
SCALES = (1e-300, 1e-40, 1e-30, 1e-8, 1.0, 1.0, 1e4, 1e8, 1e19, 1e30, 1e38, 1e300)
HUGE_OR_TINY = (0.0, -0.0, 1e-30, -1e-30, 1e-45, 5e-324, 1e4, 6e4, 1e19, -1e19, 1e30, 3e38, -3e38,
                1e300)
NON_FINITE = (math.nan, math.inf, -math.inf)
GOOD_SETTING = st.one_of(st.floats(1e-2, 10), st.sampled_from((0.85, 1.0, 1e-4, 1e-30, 1e30)))
BAD_SETTING = st.sampled_from((0.0, -1.0, math.nan, math.inf, -math.inf, 5e-324, "1", None, True))
BAD_CHUNKS = st.sampled_from((0, -1, 1.5, True))


def faults(*kinds: str):
    """No fault in about half of the cases, else one of ``kinds``."""
    return st.sampled_from((None,) * len(kinds) + kinds)


@st.composite
def tensors(draw, shape, dtype: torch.dtype) -> torch.Tensor:
    """Finite values of ``dtype`` of ``shape``: ordinary, scaled, or with huge/tiny entries."""
    biggest = torch.finfo(dtype).max if dtype.is_floating_point else 1e18
    regime = draw(st.sampled_from(("normal", "normal", "scaled", "edges")))
    if regime == "normal":
        elements = st.floats(-10, 10)
    elif regime == "scaled":
        scale = draw(st.sampled_from([s for s in SCALES if 10 * s < biggest]))
        elements = st.floats(-10, 10).map(lambda v: v * scale)
    else:
        elements = st.one_of(st.floats(-10, 10),
                             st.sampled_from([v for v in HUGE_OR_TINY if abs(v) < biggest]))
    values = draw(arrays(np.float64, shape, elements=elements))
    return torch.from_numpy(values).to(dtype)


def _poison(draw, x: torch.Tensor) -> torch.Tensor:
    """``x`` with one entry NaN or +-inf (``x`` unchanged if empty)."""
    if x.numel() == 0:
        return x
    x = x.clone()
    x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from(NON_FINITE))
    return x


def _finite_floats(*xs: torch.Tensor) -> bool:
    return all(x.is_floating_point() and bool(torch.isfinite(x).all()) for x in xs)


def _run(name: str, fn, inputs: list[torch.Tensor], *, finite: bool, nan_ok: bool = False) -> str:
    """Call ``fn(*inputs)``; check the outcome; record and return ``accepted`` or ``refused``.

    ``nan_ok``: the function documents that a non-finite input propagates, and there is one.
    """
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    try:
        out = fn(*leaves)
    except (ValueError, TypeError) as err:
        record(f"functional.{name}", refused(err))
        return "refused"
    record(f"functional.{name}", "accepted")
    if nan_ok:
        return "accepted"
    outs = out if isinstance(out, tuple) else (out,)
    for o in outs:
        assert not bool(torch.isnan(o).any()), f"{name} returned NaN"
        if finite:
            assert bool(torch.isfinite(o).all()), f"{name} returned inf"
    with_grad = [o for o in outs if o.requires_grad and bool(torch.isfinite(o).all())]
    if with_grad:
        total = sum(o.float().sum() for o in with_grad)
        grads = torch.autograd.grad(total, leaves, allow_unused=True)
        for g in grads:
            assert g is None or not bool(torch.isnan(g).any()), f"{name}: NaN gradient"
    return "accepted"


# =========================================================================== Eq. 6, 7, 14
@FUZZ
@given(data=st.data(), n=st.integers(1, 7), dim=st.integers(1, 4), dtype=FLOATS,
       bandwidth=GOOD_SETTING, chunk=st.sampled_from((None, None, 1, 2, 3, 100)),
       fault=faults("non-finite", "integer", "empty", "bandwidth", "chunk"))
def test_fuzz_kde_log_density(data, n, dim, dtype, bandwidth, chunk, fault):
    phi = data.draw(tensors((0 if fault == "empty" else n, dim), dtype))
    phi = _poison(data.draw, phi) if fault == "non-finite" else phi
    phi = phi.long() if fault == "integer" else phi
    bandwidth = data.draw(BAD_SETTING) if fault == "bandwidth" else bandwidth
    chunk = data.draw(BAD_CHUNKS) if fault == "chunk" else chunk
    _run("kde_log_density", lambda p: SF.kde_log_density(p, bandwidth, chunk=chunk), [phi],
         finite=True)


@FUZZ
@given(data=st.data(), n=st.integers(1, 7), dim=st.integers(1, 4), dtype=FLOATS,
       rows=st.sampled_from(("all", "slice", "index")),
       fault=faults("non-finite", "integer", "empty", "rows"))
def test_fuzz_pattern_similarity(data, n, dim, dtype, rows, fault):
    phi = data.draw(tensors((n, 0 if fault == "empty" else dim), dtype))
    phi = _poison(data.draw, phi) if fault == "non-finite" else phi
    phi = phi.long() if fault == "integer" else phi
    pick = {"all": None, "slice": slice(1, n), "index": torch.arange(n).flip(0)}[rows]
    if fault == "rows":
        pick = data.draw(st.sampled_from((torch.tensor([n]), torch.tensor([-1]), torch.zeros(2, 1),
                                          torch.tensor([0.5]))))
    if _run("pattern_similarity", lambda p: SF.pattern_similarity(p, rows=pick), [phi],
            finite=True) == "accepted" and pick is None:
        delta = SF.pattern_similarity(phi)
        assert torch.equal(delta.diagonal(), torch.ones(n, dtype=delta.dtype))
        assert bool((delta.abs() <= 1.01).all())


@FUZZ
@given(data=st.data(), n=st.integers(0, 8), dtype=FLOATS,
       fault=faults("non-finite", "integer", "shape"))
def test_fuzz_density_weights(data, n, dtype, fault):
    log_density = data.draw(tensors((n, 2) if fault == "shape" else (n,), dtype))
    log_density = _poison(data.draw, log_density) if fault == "non-finite" else log_density
    log_density = log_density.long() if fault == "integer" else log_density
    if _run("density_weights", SF.density_weights, [log_density], finite=True) == "accepted" and n:
        assert SF.density_weights(log_density).double().sum().item() == pytest.approx(n, rel=1e-2)


# =========================================================================== Eq. 13
ANCHORS = ("none", "none", "int", "tensor")


def _anchors(draw, kind: str, n: int):
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.integers(1, n + 1))
    if kind == "tensor":
        return torch.arange(n)[: max(n // 2, 1)]
    return draw(st.sampled_from((0, -1, 1.5, True, torch.tensor([0, 0]), torch.tensor([n]))))


@FUZZ
@given(data=st.data(), n=st.integers(2, 8), dim=st.integers(1, 4), dtype=FLOATS, tau=GOOD_SETTING,
       chunk=st.sampled_from((None, None, 1, 2, 3, 100)), anchors=st.sampled_from(ANCHORS),
       fault=faults("non-finite d", "non-finite delta", "integer", "one region", "delta shape",
                    "tau", "chunk", "anchors"))
def test_fuzz_simdcl_loss(data, n, dim, dtype, tau, chunk, anchors, fault):
    n = 1 if fault == "one region" else n
    d = data.draw(tensors((n, dim), dtype))
    delta = data.draw(tensors((n + 1, n) if fault == "delta shape" else (n, n), dtype))
    d = _poison(data.draw, d) if fault == "non-finite d" else d
    delta = _poison(data.draw, delta) if fault == "non-finite delta" else delta
    d = d.long() if fault == "integer" else d
    tau = data.draw(BAD_SETTING) if fault == "tau" else tau
    chunk = data.draw(BAD_CHUNKS) if fault == "chunk" else chunk
    pick = _anchors(data.draw, "bad" if fault == "anchors" else anchors, n)
    gen = torch.Generator().manual_seed(0)
    _run("simdcl_loss",
         lambda d_, delta_: SF.simdcl_loss(d_, delta_, tau, chunk=chunk, anchors=pick, generator=gen),
         [d, delta], finite=True)


@FUZZ
@given(data=st.data(), n=st.integers(2, 8), dim=st.integers(1, 4), embed=st.integers(1, 3),
       dtype=FLOATS, tau=GOOD_SETTING, chunk=st.sampled_from((None, None, 1, 2, 3, 100)),
       anchors=st.sampled_from(ANCHORS),
       fault=faults("non-finite d", "non-finite phi", "phi rows", "tau", "anchors"))
def test_fuzz_simdcl_loss_from_embeddings(data, n, dim, embed, dtype, tau, chunk, anchors, fault):
    d = data.draw(tensors((n, dim), dtype))
    phi = data.draw(tensors((n + 1 if fault == "phi rows" else n, embed), dtype))
    d = _poison(data.draw, d) if fault == "non-finite d" else d
    phi = _poison(data.draw, phi) if fault == "non-finite phi" else phi
    tau = data.draw(BAD_SETTING) if fault == "tau" else tau
    pick = _anchors(data.draw, "bad" if fault == "anchors" else anchors, n)
    _run("simdcl_loss_from_embeddings",
         lambda d_, p: SF.simdcl_loss_from_embeddings(d_, p, tau, chunk=chunk, anchors=pick),
         [d, phi], finite=True)


# =========================================================================== Eq. 5, 10, 15
@FUZZ
@given(data=st.data(), b=st.integers(2, 5), n=st.integers(0, 3), dim=st.integers(0, 3), dtype=FLOATS,
       fault=faults("non-finite", "integer", "batch of one", "rank"))
def test_fuzz_region_feature_stats(data, b, n, dim, dtype, fault):
    b = 1 if fault == "batch of one" else b
    z = data.draw(tensors((b, n * dim) if fault == "rank" else (b, n, dim), dtype))
    z = _poison(data.draw, z) if fault == "non-finite" else z
    z = z.long() if fault == "integer" else z
    outcome = _run("region_feature_stats", SF.region_feature_stats, [z], finite=False,
                   nan_ok=not _finite_floats(z))
    if outcome == "accepted" and _finite_floats(z):
        mu, _ = SF.region_feature_stats(z)
        assert bool(torch.isfinite(mu).all()), "the mean of finite values is finite"


@FUZZ
@given(data=st.data(), n=st.integers(0, 3), dim=st.integers(0, 3), dtype=FLOATS,
       fault=faults("non-finite mean", "sigma", "shape", "integer"))
def test_fuzz_feature_kld(data, n, dim, dtype, fault):
    shapes = [(n, dim)] * 3 + [(n, dim + 1) if fault == "shape" else (n, dim)]
    mu_hat, sigma_hat, mu, sigma = (data.draw(tensors(s, dtype)) for s in shapes)
    sigma_hat, sigma = sigma_hat.abs(), sigma.abs()
    tiny = torch.finfo(dtype).tiny
    sigma_hat, sigma = sigma_hat.clamp_min(tiny), sigma.clamp_min(tiny)  # positive, as documented
    if fault == "non-finite mean":
        mu = _poison(data.draw, mu)
    if fault == "sigma" and sigma.numel():
        sigma = sigma.clone()
        sigma.view(-1)[0] = data.draw(st.sampled_from((0.0, -1.0, *NON_FINITE)))
    inputs = [mu_hat, sigma_hat, mu, sigma]
    inputs = [t.long() for t in inputs] if fault == "integer" else inputs
    _run("feature_kld", SF.feature_kld, inputs, finite=False)


@FUZZ
@given(data=st.data(), shape=st.tuples(st.integers(1, 3), st.integers(1, 2), st.integers(1, 3),
                                       st.integers(1, 2)),
       dtype=FLOATS, loss=st.sampled_from(("mse", "mae", "huber")),
       weights=st.sampled_from((False, True)), mask=st.sampled_from(("none", "bool", "float", "broadcast")),
       fault=faults("non-finite valid", "non-finite masked", "weights", "mask", "shape", "loss",
                    "empty", "integer"))
def test_fuzz_weighted_prediction_loss(data, shape, dtype, loss, weights, mask, fault):
    shape = (0, *shape[1:]) if fault == "empty" else shape
    pred, target = data.draw(tensors(shape, dtype)), data.draw(tensors(shape, dtype))
    w = data.draw(tensors((shape[2],), dtype)).abs() if weights else None
    keep = data.draw(arrays(np.bool_, shape))
    if keep.size:
        keep.flat[0] = True
    m = {"none": None, "bool": torch.from_numpy(keep), "float": torch.from_numpy(keep).double(),
         "broadcast": torch.ones(1, 1, shape[2], 1, dtype=torch.bool)}[mask]
    valid = torch.ones(shape, dtype=torch.bool) if m is None else m.bool().expand(shape)
    if fault == "non-finite valid":
        pred = torch.where(valid, _poison(data.draw, pred), pred)
    if fault == "non-finite masked":
        junk = torch.full(shape, data.draw(st.sampled_from(NON_FINITE)), dtype=dtype)
        pred, target = torch.where(valid, pred, junk), torch.where(valid, target, junk)
    if fault == "weights":
        w = data.draw(st.sampled_from((-torch.ones(shape[2]), torch.full((shape[2],), math.nan),
                                       torch.ones(shape[2] + 1))))
    if fault == "mask":
        m = data.draw(st.sampled_from((torch.full(shape, 0.5), torch.ones(*shape[:2], shape[2] + 1, 1),
                                       torch.zeros(shape, dtype=torch.bool))))
    target = target[..., :0] if fault == "shape" else target
    loss = "l3" if fault == "loss" else loss
    inputs = [pred, target] + ([w] if w is not None else [])
    inputs = [t.long() for t in inputs] if fault == "integer" else inputs

    def call(p, t, *rest):
        return SF.weighted_prediction_loss(p, t, rest[0] if rest else None, m, loss=loss)

    nan_in = fault == "non-finite valid" and not _finite_floats(pred[valid], target[valid])
    outcome = _run("weighted_prediction_loss", call, inputs, finite=False, nan_ok=nan_in)
    if outcome == "accepted" and m is not None and not nan_in:  # masked-out entries take no part
        junk = torch.full_like(pred, math.nan)
        again = call(torch.where(valid, pred, junk), torch.where(valid, target, junk), *inputs[2:])
        assert torch.equal(again, call(*inputs))


def main() -> None:
    tests = [v for k, v in sorted(globals().items()) if k.startswith("test_fuzz_")]
    for test in tests:
        test()
    print(f"max_examples = {MAX_EXAMPLES} per test, {len(tests)} tests, derandomized")
    print("\n".join(lines()))


if __name__ == "__main__":
    main()
