"""The equations of STBaT (Sec. 4 of the paper) against naive twins written from the paper.

Every naive twin below is a plain loop over the indices of the paper's formula; the
fast implementation in ``stbat_plugin.functional`` is held to it in float64, values
and gradients.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stbat_plugin import functional as SF

F64 = torch.float64
SETTINGS = settings(deadline=None, max_examples=25)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradient of ``out`` (reduced to a scalar with fixed random weights) wrt ``inputs``."""
    if out.dim() > 0:
        gen = torch.Generator().manual_seed(123)
        out = (out * torch.rand(out.shape, generator=gen, dtype=out.dtype)).sum()
    return list(torch.autograd.grad(out, inputs))


def _assert_same(fast_fn, naive_fn, inputs: list[torch.Tensor], atol: float = 1e-10) -> None:
    """Values and gradients of ``fast_fn(*inputs)`` and ``naive_fn(*inputs)`` agree."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    fast, naive = fast_fn(*inputs), naive_fn(*inputs)
    assert fast.dtype == F64
    assert fast.shape == naive.shape
    assert torch.allclose(fast, naive, rtol=1e-9, atol=atol), (fast, naive)
    for g_fast, g_naive in zip(_grads(fast, inputs), _grads(naive, inputs), strict=True):
        assert torch.allclose(g_fast, g_naive, rtol=1e-8, atol=atol), (g_fast, g_naive)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _as_tensor(a) -> torch.Tensor:
    return torch.from_numpy(a.copy())


# =========================================================================== naive twins
def naive_region_feature_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 10: mu = 1/B sum_i z_i, sigma = sqrt(sum_i (z_i - mu)^2 / (B - 1)), per region."""
    b, n, d = z.shape
    mu = [[None] * d for _ in range(n)]
    sigma = [[None] * d for _ in range(n)]
    for r in range(n):
        for j in range(d):
            m = sum(z[i, r, j] for i in range(b)) / b
            var = sum((z[i, r, j] - m) ** 2 for i in range(b)) / (b - 1)
            mu[r][j], sigma[r][j] = m, torch.sqrt(var)
    return (torch.stack([torch.stack(row) for row in mu]),
            torch.stack([torch.stack(row) for row in sigma]))


def naive_feature_kld(mu_hat, sigma_hat, mu, sigma) -> torch.Tensor:
    """Eq. 5: L_KLD = sum_j log(sigma / sigma_hat)
    + (sigma_hat^2 + (mu_hat - mu)^2) / (2 sigma^2) - 1/2."""
    n, d = mu.shape
    out = []
    for r in range(n):
        total = 0.0
        for j in range(d):
            total = total + (
                torch.log(sigma[r, j] / sigma_hat[r, j])
                + (sigma_hat[r, j] ** 2 + (mu_hat[r, j] - mu[r, j]) ** 2) / (2 * sigma[r, j] ** 2)
                - 0.5
            )
        out.append(total)
    return torch.stack(out)


def naive_kde_log_density(phi: torch.Tensor, h: float) -> torch.Tensor:
    """Eq. 6 with the D-dim standard normal kernel: rho_r = 1/(|R| h^D) sum_i K((phi_r-phi_i)/h)."""
    n, dim = phi.shape
    out = []
    for r in range(n):
        total = 0.0
        for i in range(n):
            u = (phi[r] - phi[i]) / h
            squared_norm = sum(u[k] ** 2 for k in range(dim))
            kernel = (2 * math.pi) ** (-dim / 2) * torch.exp(-0.5 * squared_norm)
            total = total + kernel
        out.append(torch.log(total / (n * h**dim)))
    return torch.stack(out)


def naive_density_weights(log_density: torch.Tensor) -> torch.Tensor:
    """Eq. 14: w_r = |R| (1/rho_r) / sum_r' (1/rho_r')."""
    n = log_density.shape[0]
    rho = [torch.exp(log_density[r]) for r in range(n)]
    total_inverse = sum(1 / rho[r] for r in range(n))
    return torch.stack([n * (1 / rho[r]) / total_inverse for r in range(n)])


def naive_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dot = sum(a[k] * b[k] for k in range(a.shape[0]))
    norm_a = torch.sqrt(sum(a[k] ** 2 for k in range(a.shape[0])))
    norm_b = torch.sqrt(sum(b[k] ** 2 for k in range(b.shape[0])))
    return dot / (norm_a * norm_b)


def naive_pattern_similarity(phi: torch.Tensor) -> torch.Tensor:
    """Eq. 7: delta(phi_i, phi_j) = cos(phi_i, phi_j)."""
    n = phi.shape[0]
    return torch.stack([torch.stack([naive_cosine(phi[i], phi[j]) for j in range(n)])
                        for i in range(n)])


def naive_simdcl_loss(d: torch.Tensor, delta: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 13 term by term.

    L^(i,k) = -log exp(sim(d_i,d_k)/tau)
                   / sum_j 1[j != i, delta_ik >= delta_ij] exp(sim(d_i,d_j)/tau)
    L = 1/(|R|(|R|-1)) sum_i sum_{k != i} L^(i,k)
    """
    n = d.shape[0]
    total = 0.0
    for i in range(n):
        for k in range(n):
            if k == i:
                continue
            numerator = torch.exp(naive_cosine(d[i], d[k]) / tau)
            denominator = 0.0
            for j in range(n):
                if j != i and delta[i, k] >= delta[i, j]:
                    denominator = denominator + torch.exp(naive_cosine(d[i], d[j]) / tau)
            total = total - torch.log(numerator / denominator)
    return total / (n * (n - 1))


def _naive_elementwise(p, t, loss):
    e = p - t
    if loss == "mse":
        return e**2
    if loss == "mae":
        return torch.abs(e)
    return 0.5 * e**2 if torch.abs(e) < 1 else torch.abs(e) - 0.5  # huber, delta = 1


def naive_weighted_prediction_loss(pred, target, weights=None, mask=None, loss="mse"):
    """Eq. 15: sum over valid (b, s, r, c) of w_r * l(pred, target), over the number of valid."""
    b, s, n, c = pred.shape
    total, count = 0.0, 0
    for ib in range(b):
        for js in range(s):
            for r in range(n):
                for kc in range(c):
                    if mask is not None and not bool(mask[ib, js, r, kc]):
                        continue
                    w = 1.0 if weights is None else weights[r]
                    total = total + w * _naive_elementwise(pred[ib, js, r, kc],
                                                           target[ib, js, r, kc], loss)
                    count += 1
    return total / count


# =========================================================================== Eq. 10
def test_region_feature_stats_matches_naive():
    _assert_same(lambda z: torch.cat(SF.region_feature_stats(z)),
                 lambda z: torch.cat(naive_region_feature_stats(z)),
                 [_randn(5, 4, 3)])


def test_region_feature_stats_is_unbiased():
    z = _randn(7, 3, 2, seed=1)
    mu, sigma = SF.region_feature_stats(z)
    assert torch.allclose(mu, z.mean(0))
    assert torch.allclose(sigma, z.std(0, unbiased=True))
    assert not torch.allclose(sigma, z.std(0, unbiased=False))


def test_region_feature_stats_batch_of_two_is_smallest():
    mu, sigma = SF.region_feature_stats(torch.tensor([[[0.0]], [[2.0]]], dtype=F64))
    assert mu.item() == 1.0 and sigma.item() == pytest.approx(math.sqrt(2.0))


def test_region_feature_stats_constant_region_has_finite_gradient():
    """A region whose features never vary (no flow, no neighbours) has sigma = 0 exactly;
    sqrt'(0) is infinite, so a naive implementation sends NaN into the backbone."""
    z = _randn(4, 3, 2, seed=30)
    z[:, 1] = 0.25
    z.requires_grad_(True)
    mu, sigma = SF.region_feature_stats(z)
    assert (sigma[1] == 0).all() and (sigma[[0, 2]] > 0).all()
    (mu.sum() + sigma.sum()).backward()
    assert torch.isfinite(z.grad).all()
    assert torch.allclose(z.grad[:, 1], torch.full((4, 2), 0.25, dtype=F64))  # only d mu / dz


@pytest.mark.parametrize("shape", [(1, 4, 3), (0, 4, 3)])
def test_region_feature_stats_needs_two_samples(shape):
    with pytest.raises(ValueError, match="at least 2"):
        SF.region_feature_stats(torch.zeros(shape))


def test_region_feature_stats_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\[b, n, d\]"):
        SF.region_feature_stats(torch.zeros(4, 3))


# =========================================================================== Eq. 5 (KLD)
def _kld_inputs(seed: int = 2, n: int = 4, d: int = 3):
    return [_randn(n, d, seed=seed), _randn(n, d, seed=seed + 1).exp(),
            _randn(n, d, seed=seed + 2), _randn(n, d, seed=seed + 3).exp()]


def test_feature_kld_matches_naive():
    _assert_same(SF.feature_kld, naive_feature_kld, _kld_inputs())


def test_feature_kld_is_kl_of_normals_in_the_right_direction():
    mu_hat, sigma_hat, mu, sigma = _kld_inputs(seed=7)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu_hat, sigma_hat), torch.distributions.Normal(mu, sigma)
    ).sum(-1)
    reverse = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, sigma), torch.distributions.Normal(mu_hat, sigma_hat)
    ).sum(-1)
    got = SF.feature_kld(mu_hat, sigma_hat, mu, sigma)
    assert got.shape == (4,)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got, reverse)


def test_feature_kld_rejects_mismatched_shapes():
    a = torch.ones(3, 2)
    with pytest.raises(ValueError, match="one shape"):
        SF.feature_kld(a, a, a, torch.ones(3, 3))


@SETTINGS
@given(
    mu_hat=arrays("float64", (3, 4), elements=st.floats(-5, 5)),
    mu=arrays("float64", (3, 4), elements=st.floats(-5, 5)),
    sigma_hat=arrays("float64", (3, 4), elements=st.floats(0.05, 5)),
    sigma=arrays("float64", (3, 4), elements=st.floats(0.05, 5)),
)
def test_feature_kld_nonnegative_and_zero_at_equality(mu_hat, mu, sigma_hat, sigma):
    mu_hat, mu, sigma_hat, sigma = map(_as_tensor, (mu_hat, mu, sigma_hat, sigma))
    kld = SF.feature_kld(mu_hat, sigma_hat, mu, sigma)
    assert (kld >= -1e-9).all()
    assert torch.allclose(SF.feature_kld(mu, sigma, mu, sigma), torch.zeros(3, dtype=F64),
                          atol=1e-12)


# =========================================================================== Eq. 6 (KDE)
@pytest.mark.parametrize("bandwidth", [0.3, 0.85, 2.0])
def test_kde_log_density_matches_naive(bandwidth):
    _assert_same(lambda p: SF.kde_log_density(p, bandwidth),
                 lambda p: naive_kde_log_density(p, bandwidth), [_randn(6, 3, seed=3)])


def test_kde_log_density_is_a_proper_density_in_one_dimension():
    """The normalisation of Eq. 6 (1/(|R| h) and the normal kernel) integrates to 1.

    A query point g is appended to the 3 centres: rho(g) among the 4 points, minus g's own
    kernel term K(0)/h, rescaled to the 3 centres, is the 1-D KDE of the centres at g.
    """
    centres = torch.tensor([[-1.0], [0.3], [2.0]], dtype=F64)
    h = 0.5
    grid = torch.linspace(-6, 8, 1401, dtype=F64)
    dens = torch.stack([
        (SF.kde_log_density(torch.cat([centres, g.view(1, 1)]), h)[-1].exp() * 4
         - 1 / (h * math.sqrt(2 * math.pi))) / 3
        for g in grid
    ])
    integral = torch.trapezoid(dens, grid)
    assert integral.item() == pytest.approx(1.0, abs=1e-6)


def test_kde_log_density_finite_for_far_outlier():
    phi = _randn(5, 4, seed=4)
    phi[2] += 1e3
    fast = SF.kde_log_density(phi, 0.85)
    naive = naive_kde_log_density(phi, 0.85)
    assert torch.isfinite(fast).all()
    assert torch.allclose(fast, naive, rtol=1e-9)
    # the outlier only sees its own kernel term
    only_self = -(math.log(5) + 4 * math.log(0.85) + 2 * math.log(2 * math.pi))
    assert fast[2].item() == pytest.approx(only_self, rel=1e-12)
    assert (fast[[0, 1, 3, 4]] > fast[2]).all()
    phi.requires_grad_(True)
    SF.kde_log_density(phi, 0.85).sum().backward()
    assert torch.isfinite(phi.grad).all()


def test_kde_log_density_all_far_apart_is_finite_in_float32():
    phi = torch.eye(4) * 1e4
    out = SF.kde_log_density(phi, 0.1)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("bandwidth", [0.0, -1.0])
def test_kde_log_density_rejects_bad_bandwidth(bandwidth):
    with pytest.raises(ValueError, match="bandwidth"):
        SF.kde_log_density(torch.zeros(3, 2), bandwidth)


def test_kde_log_density_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\[n, D\]"):
        SF.kde_log_density(torch.zeros(3), 1.0)


@SETTINGS
@given(phi=arrays("float64", (5, 3), elements=st.floats(-3, 3)),
       shift=arrays("float64", (3,), elements=st.floats(-20, 20)))
def test_kde_log_density_translation_invariant(phi, shift):
    phi, shift = _as_tensor(phi), _as_tensor(shift)
    assert torch.allclose(SF.kde_log_density(phi, 0.85), SF.kde_log_density(phi + shift, 0.85),
                          atol=1e-7)


# =========================================================================== Eq. 14
def test_density_weights_match_naive():
    _assert_same(SF.density_weights, naive_density_weights, [_randn(7, seed=5) * 3])


def test_density_weights_from_kde_match_naive_pipeline():
    phi = _randn(6, 3, seed=6)
    _assert_same(lambda p: SF.density_weights(SF.kde_log_density(p, 0.85)),
                 lambda p: naive_density_weights(naive_kde_log_density(p, 0.85)), [phi])


def test_density_weights_no_overflow_for_huge_differences():
    log_density = torch.tensor([0.0, 1e4, -1e4, 5e3], dtype=F64)
    w = SF.density_weights(log_density)
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert w.sum().item() == pytest.approx(4.0)
    assert w.argmax().item() == 2  # lowest density, largest weight
    w32 = SF.density_weights(log_density.float())
    assert w32.dtype == torch.float32 and torch.isfinite(w32).all()


def test_density_weights_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\[n\]"):
        SF.density_weights(torch.zeros(2, 2))


@SETTINGS
@given(ld=arrays("float64", st.integers(2, 12), elements=st.floats(-30, 30)),
       shift=st.floats(-100, 100), data=st.data())
def test_density_weights_properties(ld, shift, data):
    ld = _as_tensor(ld)
    n = ld.shape[0]
    w = SF.density_weights(ld)
    assert torch.isfinite(w).all() and (w > 0).all()
    assert w.mean().item() == pytest.approx(1.0, rel=1e-12)
    # invariant to a constant added to every log-density (the KDE's normaliser)
    assert torch.allclose(SF.density_weights(ld + shift), w, rtol=1e-9)
    # permutation equivariant
    perm = torch.tensor(data.draw(st.permutations(range(n))))
    assert torch.allclose(SF.density_weights(ld[perm]), w[perm], rtol=1e-12)
    # higher density -> lower weight
    order = torch.argsort(ld)
    assert (w[order][1:] <= w[order][:-1]).all()
    gap = ld.unsqueeze(0) - ld.unsqueeze(1)  # gap[i, j] = ld[j] - ld[i]
    strictly = gap > 1e-6
    assert (w.unsqueeze(1) > w.unsqueeze(0))[strictly].all()


@SETTINGS
@given(ld=arrays("float64", st.integers(2, 8), elements=st.floats(-1e4, 1e4)))
def test_density_weights_finite_across_huge_ranges(ld):
    w = SF.density_weights(_as_tensor(ld))
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert w.sum().item() == pytest.approx(len(ld), rel=1e-9)


# =========================================================================== Eq. 7
def test_pattern_similarity_matches_naive():
    _assert_same(SF.pattern_similarity, naive_pattern_similarity, [_randn(5, 4, seed=8)])


def test_pattern_similarity_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\[n, D\]"):
        SF.pattern_similarity(torch.zeros(3))


@SETTINGS
@given(phi=arrays("float64", (6, 3), elements=st.floats(-10, 10)))
def test_pattern_similarity_symmetric_unit_diagonal(phi):
    phi = _as_tensor(phi)
    nonzero = phi.norm(dim=1) > 1e-3
    delta = SF.pattern_similarity(phi)
    assert torch.allclose(delta, delta.t(), atol=1e-12)
    assert torch.allclose(delta.diagonal()[nonzero], torch.ones(int(nonzero.sum()), dtype=F64))
    assert (delta.abs() <= 1 + 1e-12).all()
    # scale invariant per row
    scaled = phi * torch.linspace(0.5, 3, 6, dtype=F64).unsqueeze(1)
    assert torch.allclose(SF.pattern_similarity(scaled)[nonzero][:, nonzero],
                          delta[nonzero][:, nonzero], atol=1e-9)


# =========================================================================== Eq. 13
@pytest.mark.parametrize("tau", [0.05, 0.5, 1.0])
def test_simdcl_matches_naive_continuous_delta(tau):
    d = _randn(6, 4, seed=9)
    delta = SF.pattern_similarity(_randn(6, 3, seed=10))
    _assert_same(lambda d_: SF.simdcl_loss(d_, delta, tau),
                 lambda d_: naive_simdcl_loss(d_, delta, tau), [d])


@pytest.mark.parametrize("tau", [0.01, 1.0])
def test_simdcl_float32_both_paths_agree_with_float64(tau):
    """float32 takes the bounded exp/cumsum path at tau=1 and logcumsumexp at tau=0.01."""
    d = _randn(30, 8, seed=21)
    delta = torch.randint(0, 4, (30, 30), generator=torch.Generator().manual_seed(3)).to(F64)
    ref = SF.simdcl_loss(d, delta, tau)
    got = SF.simdcl_loss(d.float(), delta.float(), tau)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_simdcl_matches_naive_with_many_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 7
    delta = torch.randint(0, 3, (n, n), generator=gen).to(F64)  # ties everywhere, not symmetric
    d = _randn(n, 5, seed=100 + seed)
    _assert_same(lambda d_: SF.simdcl_loss(d_, delta, 0.7),
                 lambda d_: naive_simdcl_loss(d_, delta, 0.7), [d])


def test_simdcl_all_ties_is_infonce_over_every_other_region():
    """One tie group per row: each denominator holds every j != i."""
    n, tau = 5, 0.5
    d = _randn(n, 3, seed=11)
    s = naive_pattern_similarity(d) / tau
    expected = 0.0
    for i in range(n):
        others = torch.stack([s[i, j] for j in range(n) if j != i])
        for k in range(n):
            if k != i:
                expected += torch.logsumexp(others, 0) - s[i, k]
    expected /= n * (n - 1)
    got = SF.simdcl_loss(d, torch.ones(n, n, dtype=F64), tau)
    assert torch.allclose(got, expected, rtol=1e-10)


def test_simdcl_least_similar_positive_has_zero_loss():
    """With a strict order, k of lowest delta_ik has only itself in its denominator."""
    n = 4
    d = _randn(n, 3, seed=12)
    delta = torch.tensor([[9, 0, 1, 2], [2, 9, 0, 1], [1, 2, 9, 0], [0, 1, 2, 9]], dtype=F64)
    s = SF.pattern_similarity(d)
    expected = 0.0
    for i in range(n):
        ks = [k for k in range(n) if k != i]
        ks.sort(key=lambda k: delta[i, k].item())
        for pos, k in enumerate(ks):
            expected += torch.logsumexp(s[i, ks[:pos + 1]], 0) - s[i, k]  # pos=0 term is 0
    expected /= n * (n - 1)
    assert torch.allclose(SF.simdcl_loss(d, delta, 1.0), expected, rtol=1e-10)


def test_simdcl_delta_gets_no_gradient():
    d = _randn(5, 3, seed=13).requires_grad_(True)
    delta = SF.pattern_similarity(_randn(5, 2, seed=14)).requires_grad_(True)
    loss = SF.simdcl_loss(d, delta, 1.0)
    g_d, g_delta = torch.autograd.grad(loss, [d, delta], allow_unused=True)
    assert g_delta is None
    assert g_d is not None and g_d.abs().sum() > 0


def test_simdcl_keeps_float32():
    out = SF.simdcl_loss(torch.randn(5, 3), torch.rand(5, 5), 1.0)
    assert out.dtype == torch.float32 and torch.isfinite(out)


@pytest.mark.parametrize(
    ("d", "delta", "tau", "match"),
    [
        (torch.zeros(4), torch.zeros(4, 4), 1.0, r"'d' of shape \[n, d\]"),
        (torch.randn(4, 3), torch.zeros(4, 3), 1.0, r"'delta' of shape \[4, 4\]"),
        (torch.randn(4, 3), torch.zeros(5, 5), 1.0, r"'delta' of shape \[4, 4\]"),
        (torch.randn(1, 3), torch.zeros(1, 1), 1.0, "at least 2 regions"),
        (torch.randn(4, 3), torch.zeros(4, 4), 0.0, "tau"),
        (torch.randn(4, 3), torch.full((4, 4), float("nan")), 1.0, "finite"),
    ],
)
def test_simdcl_errors(d, delta, tau, match):
    with pytest.raises(ValueError, match=match):
        SF.simdcl_loss(d, delta, tau)


@SETTINGS
@given(d=arrays("float64", (6, 3), elements=st.floats(-3, 3).filter(lambda v: abs(v) > 1e-2)),
       delta=arrays("int64", (6, 6), elements=st.integers(0, 2)),
       data=st.data())
def test_simdcl_invariant_to_consistent_region_permutation(d, delta, data):
    d, delta = _as_tensor(d), _as_tensor(delta).to(F64)
    perm = torch.tensor(data.draw(st.permutations(range(6))))
    loss = SF.simdcl_loss(d, delta, 0.5)
    permuted = SF.simdcl_loss(d[perm], delta[perm][:, perm], 0.5)
    assert torch.isfinite(loss)
    assert torch.allclose(loss, permuted, rtol=1e-10)


def test_simdcl_is_not_cubic_in_memory():
    """n = 2000 would need 2000^3 * 4 B = 32 GB for an [n, n, n] tensor."""
    n = 2000
    gen = torch.Generator().manual_seed(15)
    d = torch.randn(n, 64, generator=gen, requires_grad=True)
    delta = torch.randint(0, 50, (n, n), generator=gen).float()
    start = time.perf_counter()
    loss = SF.simdcl_loss(d, delta, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(d.grad).all()
    assert time.perf_counter() - start < 30  # generous: a few seconds on 2 cores


# =========================================================================== Eq. 15
@pytest.mark.parametrize("loss", ["mse", "mae", "huber"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_weighted_prediction_loss_matches_naive(loss, with_mask):
    gen = torch.Generator().manual_seed(16)
    pred, target = _randn(2, 2, 4, 2, seed=17), _randn(2, 2, 4, 2, seed=18) * 2
    weights = torch.rand(4, generator=gen, dtype=F64) * 2
    mask = torch.rand(2, 2, 4, 2, generator=gen) > 0.3 if with_mask else None
    _assert_same(lambda p, t, w: SF.weighted_prediction_loss(p, t, w, mask, loss=loss),
                 lambda p, t, w: naive_weighted_prediction_loss(p, t, w, mask, loss=loss),
                 [pred, target, weights])


def test_weighted_prediction_loss_unit_weights_is_plain_loss():
    pred, target = _randn(3, 1, 5, 2, seed=19), _randn(3, 1, 5, 2, seed=20)
    plain = SF.weighted_prediction_loss(pred, target)
    assert torch.allclose(plain, torch.nn.functional.mse_loss(pred, target))
    ones = SF.weighted_prediction_loss(pred, target, torch.ones(5, dtype=F64))
    assert torch.allclose(plain, ones)
    assert torch.allclose(SF.weighted_prediction_loss(pred, target, loss="mae"),
                          torch.nn.functional.l1_loss(pred, target))


def test_weighted_prediction_loss_broadcast_mask():
    pred, target = _randn(2, 1, 3, 2, seed=21), _randn(2, 1, 3, 2, seed=22)
    region_mask = torch.tensor([True, False, True]).view(1, 1, 3, 1)
    got = SF.weighted_prediction_loss(pred, target, mask=region_mask)
    assert torch.allclose(got, (pred - target)[:, :, [0, 2]].pow(2).mean())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target": torch.zeros(2, 1, 3, 2)}, "shapes differ"),
        ({"weights": torch.ones(4)}, r"'weights' of shape \[3\]"),
        ({"weights": torch.ones(3, 1)}, r"'weights' of shape \[3\]"),
        ({"mask": torch.zeros(2, 1, 3, 1, dtype=torch.bool)}, "excludes every entry"),
        ({"loss": "l3"}, "Unknown loss"),
    ],
)
def test_weighted_prediction_loss_errors(kwargs, match):
    args = {"pred": torch.zeros(2, 1, 3, 1), "target": torch.zeros(2, 1, 3, 1), **kwargs}
    with pytest.raises(ValueError, match=match):
        SF.weighted_prediction_loss(**args)


@SETTINGS
@given(pred=arrays("float64", (2, 1, 4, 2), elements=st.floats(-5, 5)),
       target=arrays("float64", (2, 1, 4, 2), elements=st.floats(-5, 5)),
       junk=arrays("float64", (2, 1, 4, 2), elements=st.floats(-1e3, 1e3)),
       mask=arrays("bool", (2, 1, 4, 2)),
       weights=arrays("float64", (4,), elements=st.floats(0, 3)))
def test_weighted_prediction_loss_ignores_masked_positions(pred, target, junk, mask, weights):
    if not mask.any():
        mask[0, 0, 0, 0] = True
    pred, target, junk, mask, weights = map(_as_tensor, (pred, target, junk, mask, weights))
    base = SF.weighted_prediction_loss(pred, target, weights, mask)
    changed_pred = torch.where(mask, pred, junk)
    changed_target = torch.where(mask, target, -junk)
    assert torch.allclose(SF.weighted_prediction_loss(changed_pred, changed_target, weights, mask),
                          base, rtol=1e-12, atol=1e-12)
    assert base >= 0


# =========================================================================== numeric edges
# Issue 10, item 8: the functional layer keeps its docstrings at the edges of floating point.
@pytest.mark.parametrize("scale", [1e19, 1e30, 1e38])
def test_kde_log_density_huge_embeddings_float32_is_scale_equivariant(scale):
    """rho(s phi; s h) = rho(phi; h) / s^D: embeddings of 1e19 and beyond stay exact in float32."""
    base = torch.randn(6, 4, generator=torch.Generator().manual_seed(40))
    got = SF.kde_log_density(base * scale, 0.85 * scale)
    expected = SF.kde_log_density(base.double(), 0.85) - 4 * math.log(scale)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_kde_log_density_tiny_bandwidth_counts_exact_duplicates(dtype):
    """h = 1e-30: only a point's exact duplicates (and itself) carry kernel mass."""
    phi = torch.randn(6, 4, generator=torch.Generator().manual_seed(41), dtype=dtype)
    phi[2] = phi[0]
    phi[5] = phi[0]
    h = 1e-30
    out = SF.kde_log_density(phi, h)
    log_norm = math.log(6) + 4 * math.log(h) + 2 * math.log(2 * math.pi)
    copies = torch.tensor([3, 1, 3, 1, 1, 3], dtype=F64)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert torch.allclose(out.double(), copies.log() - log_norm, rtol=1e-6)
    phi.requires_grad_(True)
    SF.kde_log_density(phi, h).sum().backward()
    assert torch.isfinite(phi.grad).all()


@pytest.mark.parametrize("bandwidth", [math.inf, -math.inf, math.nan, 0.0, -1e-300])
def test_kde_log_density_refuses_bandwidth_that_is_not_finite_positive(bandwidth):
    with pytest.raises(ValueError, match="bandwidth must be a finite number > 0"):
        SF.kde_log_density(torch.zeros(3, 2), bandwidth)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_kde_and_similarity_refuse_non_finite_embeddings(bad):
    phi = torch.randn(4, 3)
    phi[1, 2] = bad
    for fn in (lambda p: SF.kde_log_density(p, 0.85), SF.pattern_similarity):
        with pytest.raises(ValueError, match="'phi' must be finite"):
            fn(phi)


def test_kde_log_density_refuses_non_float_and_non_number():
    with pytest.raises(TypeError, match="floating-point"):
        SF.kde_log_density(torch.zeros(3, 2, dtype=torch.int64), 1.0)
    with pytest.raises(TypeError, match="bandwidth must be a number"):
        SF.kde_log_density(torch.zeros(3, 2), "0.85")  # type: ignore[arg-type]


def test_pattern_similarity_zero_vector_is_one_with_itself_zero_with_others():
    phi = torch.tensor([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [-3.0, 1.0]], dtype=F64)
    delta = SF.pattern_similarity(phi)
    assert torch.equal(delta.diagonal(), torch.ones(4, dtype=F64))
    assert delta[0, 2] == 0 and delta[2, 0] == 0  # two zero vectors: 0 off the diagonal
    assert (delta[0, [1, 3]] == 0).all() and (delta[[1, 3], 0] == 0).all()
    assert torch.allclose(delta[1, 3], naive_cosine(phi[1], phi[3]))
    assert torch.equal(SF.pattern_similarity(phi, rows=torch.tensor([2, 0])), delta[[2, 0]])


@pytest.mark.parametrize("scale", [1e-30, 1e-42, 1e20, 3e38])
def test_pattern_similarity_float32_rows_of_any_magnitude_keep_their_direction(scale):
    """F.normalize alone gives 0 for rows of 1e-30 (the square underflows) and for 1e20 (overflows)."""
    base = torch.randn(5, 3, generator=torch.Generator().manual_seed(42)).clamp(-1, 1)
    got = SF.pattern_similarity(base * scale)
    assert torch.allclose(got, SF.pattern_similarity(base), atol=5e-3 if scale < 1e-40 else 1e-6)


@pytest.mark.parametrize("name", ["sigma", "sigma_hat"])
@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_feature_kld_refuses_sigma_that_is_not_finite_positive(name, bad):
    mu_hat, sigma_hat, mu, sigma = _kld_inputs()
    args = {"mu_hat": mu_hat, "sigma_hat": sigma_hat, "mu": mu, "sigma": sigma}
    args[name] = args[name].clone()
    args[name][1, 2] = bad
    error = SF.NonFiniteInputError if math.isnan(bad) or math.isinf(bad) else ValueError
    with pytest.raises(error, match=f"'{name}' must be (finite|> 0)"):
        SF.feature_kld(**args)


@pytest.mark.parametrize("name", ["mu", "mu_hat"])
def test_feature_kld_refuses_non_finite_means(name):
    args = dict(zip(("mu_hat", "sigma_hat", "mu", "sigma"), _kld_inputs(), strict=True))
    args[name] = torch.full_like(args[name], math.nan)
    with pytest.raises(ValueError, match=f"'{name}' must be finite"):
        SF.feature_kld(**args)


def test_feature_kld_large_sigmas_float32_match_float64():
    """sigma_hat^2 / sigma^2 with both 1e20 is inf / inf = NaN in float32; ratios are not."""
    mu_hat, sigma_hat, mu, sigma = _kld_inputs(seed=43)
    inputs = [mu_hat * 1e20, sigma_hat * 1e20, mu * 1e20, sigma * 1e20]
    got = SF.feature_kld(*[t.float() for t in inputs])
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), SF.feature_kld(*inputs), rtol=1e-4)


@pytest.mark.parametrize("bad", [-0.5, math.nan, math.inf])
def test_weighted_prediction_loss_refuses_negative_or_non_finite_weights(bad):
    weights = torch.ones(3)
    weights[1] = bad
    with pytest.raises(ValueError, match="'weights' must be (finite|>= 0)"):
        SF.weighted_prediction_loss(torch.zeros(2, 1, 3, 1), torch.ones(2, 1, 3, 1), weights)


@pytest.mark.parametrize("loss", ["mse", "mae", "huber"])
def test_weighted_prediction_loss_masked_nan_reaches_neither_loss_nor_gradient(loss):
    pred = _randn(2, 1, 3, 2, seed=44).requires_grad_(True)
    target = _randn(2, 1, 3, 2, seed=45)
    mask = torch.ones(2, 1, 3, 2, dtype=torch.bool)
    mask[0, 0, 1] = False
    poisoned = target.clone()
    poisoned[0, 0, 1] = math.nan
    clean = SF.weighted_prediction_loss(pred, target, torch.ones(3, dtype=F64), mask, loss=loss)
    got = SF.weighted_prediction_loss(pred, poisoned, torch.ones(3, dtype=F64), mask, loss=loss)
    assert torch.isfinite(got) and torch.allclose(got, clean, rtol=1e-12)
    (grad,) = torch.autograd.grad(got, pred)
    assert torch.isfinite(grad).all() and (grad[0, 0, 1] == 0).all()
    assert torch.allclose(
        got, naive_weighted_prediction_loss(pred, target, None, mask, loss=loss), rtol=1e-12)


@pytest.mark.parametrize(("mask", "match"), [
    (torch.full((2, 1, 3, 1), 0.5), "only 0 and 1"),
    (torch.ones(2, 1, 4, 1, dtype=torch.bool), "does not broadcast"),
])
def test_weighted_prediction_loss_refuses_bad_masks(mask, match):
    with pytest.raises(ValueError, match=match):
        SF.weighted_prediction_loss(torch.zeros(2, 1, 3, 1), torch.ones(2, 1, 3, 1), mask=mask)


def test_density_weights_refuse_non_finite_log_density():
    with pytest.raises(ValueError, match="'log_density' must be finite"):
        SF.density_weights(torch.tensor([0.0, math.inf, 1.0]))


@pytest.mark.parametrize("scale", [1e20, 1e30])
def test_region_feature_stats_huge_features_float32_match_float64(scale):
    z = _randn(5, 3, 2, seed=46) * scale
    mu, sigma = SF.region_feature_stats(z.float())
    mu64, sigma64 = SF.region_feature_stats(z)
    assert torch.isfinite(mu).all() and torch.isfinite(sigma).all()
    assert torch.allclose(mu.double(), mu64, rtol=1e-5, atol=1e-6 * scale)
    assert torch.allclose(sigma.double(), sigma64, rtol=1e-5)


def test_region_feature_stats_is_unchanged_by_its_rescaling_in_the_normal_range():
    """The power-of-two rescaling is exact: bit-identical to the plain formulas."""
    z = torch.randn(8, 5, 4, generator=torch.Generator().manual_seed(47)) * 3
    mu, sigma = SF.region_feature_stats(z)
    assert torch.equal(mu, z.mean(0))
    assert torch.equal(sigma, ((z - z.mean(0)).pow(2).sum(0) / 7).sqrt())


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"tau": math.inf}, "tau must be a finite number > 0"),
    ({"tau": math.nan}, "tau must be a finite number > 0"),
    ({"tau": 1e-40}, "too small for torch.float32"),
])
def test_simdcl_refuses_bad_temperature(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SF.simdcl_loss(torch.randn(4, 3), torch.rand(4, 4), **kwargs)


def test_simdcl_refuses_non_finite_d_and_is_scale_invariant():
    d, delta = torch.randn(6, 3), torch.rand(6, 6)
    bad = d.clone()
    bad[2, 0] = math.nan
    with pytest.raises(ValueError, match="'d' must be finite"):
        SF.simdcl_loss(bad, delta)
    ref = SF.simdcl_loss(d, delta)
    for scale in (1e-30, 1e30):
        assert torch.allclose(SF.simdcl_loss(d * scale, delta), ref, rtol=1e-6)


# Cases the fuzzer (tests/test_functional_fuzz.py) found while exploring, kept as regressions.
def test_weighted_prediction_loss_zero_weight_on_an_overflowing_error_is_zero_not_nan():
    pred = torch.zeros(1, 1, 2, 1, dtype=torch.float16, requires_grad=True)
    target = torch.tensor([60000.0, 1.0], dtype=torch.float16).view(1, 1, 2, 1)
    loss = SF.weighted_prediction_loss(pred, target, torch.tensor([0.0, 1.0], dtype=torch.float16))
    assert loss.item() == 0.5  # (0 * inf + 1 * 1) / 2
    (grad,) = torch.autograd.grad(loss, pred)
    assert torch.isfinite(grad).all() and grad[0, 0, 0, 0] == 0


def test_region_feature_stats_gradient_at_the_top_of_bfloat16_is_not_nan():
    z = torch.tensor([0.0, 3.0e38], dtype=torch.bfloat16).view(2, 1, 1).requires_grad_(True)
    mu, sigma = SF.region_feature_stats(z)
    assert torch.isfinite(mu).all() and torch.isfinite(sigma).all()
    (grad,) = torch.autograd.grad(mu.float().sum() + sigma.float().sum(), z)
    assert not torch.isnan(grad).any()


def test_simdcl_gradient_of_tiny_bfloat16_rows_at_tiny_tau_is_not_nan():
    d = torch.full((2, 1), 5.7778e-34, dtype=torch.bfloat16, requires_grad=True)
    for chunk in (None, 1):
        loss = SF.simdcl_loss(d, torch.zeros(2, 2, dtype=torch.bfloat16), 1e-30, chunk=chunk)
        (grad,) = torch.autograd.grad(loss.float(), d)
        assert torch.isfinite(loss) and not torch.isnan(grad).any()
