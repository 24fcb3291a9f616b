"""SimDCL, KDE and similarity by blocks of anchor rows (issue 9): exact, sampled, wired in.

The chunked computations are held, in float64, values and gradients, to the naive twins of
``test_functional`` and to ``reference_simdcl_loss`` below, a verbatim copy of the
one-block implementation that ``functional.simdcl_loss`` had before chunking.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from test_functional import (
    _assert_same,
    naive_kde_log_density,
    naive_pattern_similarity,
    naive_simdcl_loss,
)

from stbat_plugin import BalancedTransfer
from stbat_plugin import functional as SF
from stbat_plugin.pipeline.config import TransferConfig

F64 = torch.float64


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _ties(n: int, seed: int, levels: int = 3) -> torch.Tensor:
    return torch.randint(0, levels, (n, n), generator=torch.Generator().manual_seed(seed)).to(F64)


# =========================================================================== reference
def reference_simdcl_loss(d: torch.Tensor, delta: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``functional.simdcl_loss`` before chunking (one [n, n] block under autograd), verbatim."""
    n = d.shape[0]
    unit = F.normalize(d, dim=-1, eps=1e-12)
    logits = _off_diagonal(unit @ unit.transpose(0, 1) / tau, n)
    sim = _off_diagonal(delta.detach().to(d.dtype), n)
    sim_sorted, order = sim.sort(dim=1)
    logits_sorted = logits.gather(1, order)
    cum = torch.logcumsumexp(logits_sorted, dim=1)
    group_end = torch.searchsorted(sim_sorted.contiguous(), sim_sorted.contiguous(), right=True) - 1
    log_denominator = cum.gather(1, group_end)
    return (log_denominator - logits_sorted).sum() / (n * (n - 1))


def _off_diagonal(m: torch.Tensor, n: int) -> torch.Tensor:
    return m.flatten()[1:].view(n - 1, n + 1)[:, :-1].reshape(n, n - 1)


def naive_sampled_simdcl_loss(d: torch.Tensor, delta: torch.Tensor, tau: float,
                              anchors: list[int]) -> torch.Tensor:
    """Eq. 13 over the anchors i in S only: 1/(|S|(|R|-1)) sum_{i in S} sum_{k != i} L^(i,k)."""
    n = d.shape[0]
    s = naive_pattern_similarity(d) / tau
    total = 0.0
    for i in anchors:
        for k in range(n):
            if k == i:
                continue
            den = sum(torch.exp(s[i, j]) for j in range(n) if j != i and delta[i, j] <= delta[i, k])
            total = total - (s[i, k] - torch.log(den))
    return total / (len(anchors) * (n - 1))


# =========================================================================== chunk sizes
def test_chunk_rows_is_dense_up_to_the_threshold_then_bounded():
    assert SF.chunk_rows(10) is None and SF.chunk_rows(SF.AUTO_DENSE_MAX) is None
    for n in (SF.AUTO_DENSE_MAX + 1, 20_000, 50_000, 10**7):
        rows = SF.chunk_rows(n)
        assert rows is not None and rows >= 1
        assert rows * n <= max(SF.CHUNK_ELEMENTS, n)
    assert SF.chunk_rows(10, 3) == 3 and SF.chunk_rows(10, 50) == 50


@pytest.mark.parametrize("chunk", [0, -2, 2.5, True, "8"])
def test_chunk_rows_refuses_bad_sizes(chunk):
    with pytest.raises(ValueError, match="chunk must be a whole number >= 1"):
        SF.chunk_rows(10, chunk)


# =========================================================================== SimDCL, exact
@pytest.mark.parametrize("tau", [0.003, 0.05, 0.7])  # 0.003: the generic logcumsumexp path
@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_chunked_simdcl_matches_naive_and_reference_with_ties(chunk, tau):
    n = 8
    d, delta = _randn(n, 4, seed=1), _ties(n, seed=2)
    if tau > 0.01:  # the naive twin's own autograd loses digits at exp(+-1/tau) = exp(+-333)
        _assert_same(lambda d_: SF.simdcl_loss(d_, delta, tau, chunk=chunk),
                     lambda d_: naive_simdcl_loss(d_, delta, tau), [d])
    _assert_same(lambda d_: SF.simdcl_loss(d_, delta, tau, chunk=chunk),
                 lambda d_: reference_simdcl_loss(d_, delta, tau), [d], atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_chunked_simdcl_matches_reference_continuous_delta(seed):
    n = 37
    d = _randn(n, 6, seed=10 + seed)
    delta = naive_pattern_similarity(_randn(n, 3, seed=20 + seed))
    for chunk in (1, 5, 36, 37, 100):
        _assert_same(lambda d_, c=chunk: SF.simdcl_loss(d_, delta, 0.5, chunk=c),
                     lambda d_: reference_simdcl_loss(d_, delta, 0.5), [d], atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_chunked_simdcl_signed_zeros_and_negatives_tie_as_floats(dtype):
    """The blocks sort integer keys of delta: -0.0 and 0.0 must tie, negatives order below."""
    n = 9
    pool = torch.tensor([-0.0, 0.0, -1.5, -1e-30, 2.0], dtype=F64)
    delta = pool[torch.randint(0, 5, (n, n), generator=torch.Generator().manual_seed(31))]
    d = _randn(n, 3, seed=32)
    _assert_same(lambda d_: SF.simdcl_loss(d_, delta.to(dtype).double(), 0.5, chunk=4),
                 lambda d_: naive_simdcl_loss(d_, delta, 0.5), [d])
    got = SF.simdcl_loss(d.to(dtype), delta.to(dtype), 0.5, chunk=4)
    assert torch.allclose(got.double(), reference_simdcl_loss(d, delta, 0.5), rtol=1e-5)


def test_chunked_simdcl_float32_both_paths_agree_with_float64():
    d = _randn(60, 8, seed=3)
    delta = _ties(60, seed=4, levels=5)
    for tau in (1.0, 0.01):  # fast exp/cumsum path and generic logcumsumexp path
        ref = reference_simdcl_loss(d, delta, tau)
        got = SF.simdcl_loss(d.float(), delta.float(), tau, chunk=7)
        assert got.dtype == torch.float32
        assert torch.allclose(got.double(), ref, rtol=1e-5)


def test_chunked_simdcl_is_the_default_above_the_threshold(monkeypatch):
    n = SF.AUTO_DENSE_MAX + 1
    blocks: list[int] = []
    block = SF._simdcl_block
    monkeypatch.setattr(SF, "_simdcl_block",
                        lambda unit, idx, *a: blocks.append(idx.numel()) or block(unit, idx, *a))
    d = _randn(n, 3, seed=5, dtype=torch.float32)
    delta = _ties(n, seed=6).float()
    SF.simdcl_loss(d, delta, 1.0)
    assert max(blocks) == SF.chunk_rows(n) and sum(blocks) == n
    blocks.clear()
    SF.simdcl_loss(d[:50], delta[:50, :50], 1.0)  # small: one autograd block, as before
    assert blocks == []


def test_chunked_simdcl_saves_no_n_by_n_tensor_for_backward():
    """Backward memory: the chunked loss keeps only [n, D] tensors; the one-block one keeps [n, n-1]."""
    n, dim = 300, 4

    def largest_saved(fn) -> int:
        sizes: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t,
                                                      lambda t: t):
            fn(_randn(n, dim, seed=7).requires_grad_(True))
        return max(sizes)

    delta = _ties(n, seed=8)
    assert largest_saved(lambda d: SF.simdcl_loss(d, delta, chunk=16)) <= n * dim
    assert largest_saved(lambda d: SF.simdcl_loss(d, delta)) >= n * (n - 1)
    phi = _randn(n, 3, seed=9)
    assert largest_saved(lambda d: SF.simdcl_loss_from_embeddings(d, phi, chunk=16)) <= n * dim
    assert largest_saved(lambda p: SF.kde_log_density(p, 0.85, chunk=16)) <= n * dim
    assert largest_saved(lambda p: SF.kde_log_density(p, 0.85)) >= n * n


def test_chunked_simdcl_without_grad_and_delta_gets_none():
    d, delta = _randn(9, 3, seed=11), _ties(9, seed=12).requires_grad_(True)
    with torch.no_grad():
        assert torch.allclose(SF.simdcl_loss(d, delta, chunk=2), reference_simdcl_loss(d, delta))
    d.requires_grad_(True)
    g_d, g_delta = torch.autograd.grad(SF.simdcl_loss(d, delta, chunk=2), [d, delta], allow_unused=True)
    assert g_delta is None and g_d.abs().sum() > 0


def test_simdcl_from_embeddings_equals_simdcl_of_the_similarity():
    n = 30
    d, phi = _randn(n, 5, seed=13), _randn(n, 4, seed=14)
    phi[3] = phi[7]  # a tie in every row: regions 3 and 7 are equally similar to all others
    delta = naive_pattern_similarity(phi)
    for chunk in (None, 4):
        _assert_same(lambda d_, c=chunk: SF.simdcl_loss_from_embeddings(d_, phi, 0.5, chunk=c),
                     lambda d_: reference_simdcl_loss(d_, delta, 0.5), [d], atol=1e-12)
    phi.requires_grad_(True)
    d.requires_grad_(True)
    g = torch.autograd.grad(SF.simdcl_loss_from_embeddings(d, phi, chunk=4), [d, phi], allow_unused=True)
    assert g[1] is None


def test_simdcl_from_embeddings_errors():
    with pytest.raises(ValueError, match="one row per region"):
        SF.simdcl_loss_from_embeddings(torch.randn(5, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="'phi' must be finite"):
        SF.simdcl_loss_from_embeddings(torch.randn(5, 3), torch.full((5, 2), math.inf))


# =========================================================================== SimDCL, sampled
def test_simdcl_over_given_anchors_matches_naive():
    n = 7
    d, delta = _randn(n, 4, seed=15), _ties(n, seed=16)
    for anchors in ([0], [2, 5], [6, 1, 3]):
        idx = torch.tensor(anchors)
        _assert_same(lambda d_, i=idx: SF.simdcl_loss(d_, delta, 0.7, anchors=i, chunk=2),
                     lambda d_, a=anchors: naive_sampled_simdcl_loss(d_, delta, 0.7, a), [d])


@pytest.mark.parametrize("m", [1, 2, 4])
def test_sampled_simdcl_is_unbiased_over_every_draw(m):
    """Uniform draws without replacement: the mean over all C(n, m) subsets is the exact loss,
    value and gradient."""
    n = 6
    d, delta = _randn(n, 3, seed=17), _ties(n, seed=18)

    def mean_over_subsets(d_: torch.Tensor) -> torch.Tensor:
        subsets = itertools.combinations(range(n), m)
        return torch.stack([SF.simdcl_loss(d_, delta, 0.5, anchors=torch.tensor(s))
                            for s in subsets]).mean()

    _assert_same(mean_over_subsets, lambda d_: SF.simdcl_loss(d_, delta, 0.5), [d], atol=1e-12)


def test_sampled_simdcl_draws_with_the_generator():
    n = 50
    d, delta = _randn(n, 4, seed=19), _ties(n, seed=20, levels=10)
    draws = [SF.simdcl_loss(d, delta, anchors=8, generator=torch.Generator().manual_seed(s))
             for s in (1, 1, 2)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    expected = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:8]
    assert torch.allclose(draws[0], SF.simdcl_loss(d, delta, anchors=expected), rtol=1e-12)
    exact = SF.simdcl_loss(d, delta)
    assert torch.equal(SF.simdcl_loss(d, delta, anchors=n), exact)  # m >= n is exact
    assert torch.equal(SF.simdcl_loss(d, delta, anchors=10 * n), exact)


@pytest.mark.parametrize(("anchors", "match"), [
    (0, "anchors must be a whole number >= 1"),
    (2.0, "anchors must be a whole number >= 1"),
    (True, "anchors must be a whole number >= 1"),
    (torch.tensor([1, 1]), "no index twice"),
    (torch.tensor([], dtype=torch.long), "at least one index"),
    (torch.tensor([0, 9]), r"rows must lie in \[0, 6\)"),
    (torch.tensor([[0, 1]]), "1-D integer tensor"),
])
def test_sampled_simdcl_refuses_bad_anchors(anchors, match):
    with pytest.raises(ValueError, match=match):
        SF.simdcl_loss(torch.randn(6, 3), torch.rand(6, 6), anchors=anchors)


# =========================================================================== KDE, similarity
@pytest.mark.parametrize("chunk", [1, 3, 7, 50])
def test_chunked_kde_matches_naive(chunk):
    phi = _randn(7, 3, seed=21)
    phi[4] = phi[1]
    _assert_same(lambda p: SF.kde_log_density(p, 0.6, chunk=chunk),
                 lambda p: naive_kde_log_density(p, 0.6), [phi])
    with torch.no_grad():
        assert torch.allclose(SF.kde_log_density(phi, 0.6, chunk=chunk),
                              SF.kde_log_density(phi, 0.6), rtol=1e-13)


def test_similarity_rows_match_naive_rows():
    phi = _randn(9, 4, seed=22)
    full = naive_pattern_similarity(phi)
    for rows in (slice(2, 5), torch.tensor([8, 0, 3]), slice(0, 9)):
        _assert_same(lambda p, r=rows: SF.pattern_similarity(p, rows=r),
                     lambda p, r=rows: naive_pattern_similarity(p)[r], [phi])
    assert torch.allclose(SF.pattern_similarity(phi, rows=slice(0, 9)), full, rtol=1e-12)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        SF.pattern_similarity(phi, rows=torch.tensor([0.0, 1.0]))


# =========================================================================== the wrapper
class _Tiny(torch.nn.Module):
    """[b, t, n, 1] -> features [b, n, d] -> prediction [b, 1, n, 1]."""

    def __init__(self, window: int = 4, d: int = 8):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(window, d), torch.nn.Tanh())
        self.out = torch.nn.Linear(d, 1)

    def forward(self, x):
        return self.out(self.encoder(x[..., 0].transpose(1, 2))).unsqueeze(1)


def _model(poi, **kwargs) -> BalancedTransfer:
    torch.manual_seed(0)
    return BalancedTransfer(_Tiny(), tap="encoder", feature_dim=8, region_features=poi,
                            predictor_hidden=16, projector_dim=16, **kwargs)


def _batch(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(6, 4, n, 1, generator=gen), torch.rand(6, 1, n, 1, generator=gen)


def test_wrapper_chunked_city_holds_embeddings_not_delta_and_gives_the_same_losses():
    n = 40
    poi = torch.rand(n, 5, generator=torch.Generator().manual_seed(23))
    dense, chunked = _model(poi), _model(poi, simdcl_chunk=7)
    assert "cities.default.delta" in dict(dense.named_buffers())
    # what the model holds (the derived buffers are recomputed, not saved in state_dict)
    state = {**dict(chunked.named_parameters()), **dict(chunked.named_buffers())}
    assert "cities.default.delta" not in state and state["cities.default.phi"].shape == (n, 32)
    assert max(t.numel() for t in state.values()) < n * n
    x, y = _batch(n)
    opts_dense, opts_chunked = dense.configure_optimizers(), chunked.configure_optimizers()
    for _ in range(3):
        a = dense.train_iteration(x, y, opts_dense)
        b = chunked.train_iteration(x, y, opts_chunked)
        for key, value in a.as_dict().items():
            assert getattr(b, key) == pytest.approx(value, rel=1e-4, abs=1e-7), key
    chunked_state = chunked.cities["default"]
    with torch.no_grad():
        phi = chunked.riam(chunked_state.descriptors)
    assert torch.allclose(chunked_state.phi, phi)
    assert torch.allclose(chunked_state.log_density, SF.kde_log_density(phi, chunked.bandwidth),
                          rtol=1e-5)


def test_wrapper_chunks_large_cities_automatically(monkeypatch):
    n = SF.AUTO_DENSE_MAX + 1
    model = _model(torch.rand(n, 5, generator=torch.Generator().manual_seed(24)))
    state = model.cities["default"]
    assert state.chunk == SF.chunk_rows(n) and not hasattr(state, "delta")
    seen = []
    monkeypatch.setattr(SF, "simdcl_loss_from_embeddings",
                        lambda d, phi, tau, **kw: seen.append(kw) or d.sum() * 0)
    model.train_iteration(*_batch(n), model.configure_optimizers())
    assert seen == [{"chunk": SF.chunk_rows(n), "anchors": None}]


def test_wrapper_samples_anchors_when_asked(monkeypatch):
    n = 30
    poi = torch.rand(n, 5, generator=torch.Generator().manual_seed(25))
    x, y = _batch(n)
    exact = _model(poi)
    exact.refresh_imbalance()
    every = _model(poi, simdcl_anchors=n)  # m >= n: exact
    every.refresh_imbalance()
    state = exact.cities["default"]
    _, parts, _ = exact.stblm_loss(x, y, state=state)
    _, parts_every, _ = every.stblm_loss(x, y, state=every.cities["default"])
    assert torch.equal(parts["simdcl"], parts_every["simdcl"])
    sampled = _model(poi, simdcl_anchors=4)
    sampled.refresh_imbalance()
    calls = []
    simdcl = SF.simdcl_loss
    monkeypatch.setattr(SF, "simdcl_loss", lambda *a, **kw: calls.append(kw) or simdcl(*a, **kw))
    _, parts_sampled, _ = sampled.stblm_loss(x, y, state=sampled.cities["default"])
    assert calls == [{"anchors": 4}]
    assert torch.isfinite(parts_sampled["simdcl"])
    assert not torch.equal(parts_sampled["simdcl"], parts["simdcl"])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"simdcl_chunk": 0}, "chunk must be a whole number >= 1"),
    ({"simdcl_anchors": 0}, "simdcl_anchors must be a whole number >= 1"),
    ({"simdcl_anchors": 2.5}, "simdcl_anchors must be a whole number >= 1"),
])
def test_wrapper_refuses_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _model(torch.rand(5, 3), **kwargs)


def test_config_fields_and_their_checks():
    config = TransferConfig(simdcl_chunk=256, simdcl_anchors=1024)
    assert TransferConfig.from_dict(config.to_dict()).simdcl_anchors == 1024
    assert TransferConfig().simdcl_chunk is None and TransferConfig().simdcl_anchors is None
    for name in ("simdcl_chunk", "simdcl_anchors"):
        with pytest.raises(ValueError, match=f"{name} must be a whole number >= 1"):
            TransferConfig(**{name: 0})


# =========================================================================== the goal, measured
PEAK_SCRIPT = textwrap.dedent("""
    import resource, torch
    from stbat_plugin import functional as SF
    torch.set_num_threads(1)
    n = 20_000
    g = torch.Generator().manual_seed(0)
    d = torch.randn(n, 256, generator=g, requires_grad=True)
    phi = torch.randn(n, 32, generator=g)
    loss = SF.simdcl_loss_from_embeddings(d, phi, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(d.grad).all()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2)
""")


@pytest.mark.slow
def test_exact_simdcl_at_20000_regions_fits_in_4_gb():
    """Issue 9's goal: exact SimDCL forward + backward at n = 20,000 within 4 GB peak (~1-2 min)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True,
                         env=env, check=True)
    peak_gb = float(out.stdout.strip().splitlines()[-1])
    assert peak_gb < 4.0, peak_gb
