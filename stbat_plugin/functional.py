"""The equations of STBaT (Hao et al., IJCAI 2025) as pure functions of tensors.

Everything here is stateless, keeps the input dtype (float32 or float64; float16 and
bfloat16 are computed in float32 where noted) and is differentiable where a gradient
makes sense, like ``torch.nn.functional``. ``docs/equations.md`` maps each paper
equation to the function below and states the reading chosen where the paper is
ambiguous.

Numeric contract: a function given finite floating-point tensors and valid settings
never returns NaN. The KDE, the weights, the similarity and SimDCL are always finite;
the feature statistics, the KLD and the prediction loss are finite unless the value
itself lies beyond the dtype's range (then ``+inf``). Bad input (a non-finite
embedding, a bandwidth or temperature that is not a finite positive number, a
non-positive sigma, a negative weight, a wrong shape) raises ``ValueError`` (a NaN or inf
input: its subclass :class:`NonFiniteInputError`); a tensor that is not floating point
raises ``TypeError``.

The ``[n, n]`` computations (KDE, similarity, SimDCL) run over blocks of anchor rows
when ``n`` is large (see :func:`chunk_rows`), so their memory is O(chunk x n), backward
included; the value is the same as the one-block computation up to rounding.

Shapes (one glossary for the whole library): ``b`` batch, ``s`` horizon,
``n`` regions, ``c`` channels, ``d`` feature size, ``D`` embedding size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "NonFiniteInputError",
    "region_feature_stats",
    "feature_kld",
    "kde_log_density",
    "density_weights",
    "pattern_similarity",
    "simdcl_loss",
    "simdcl_loss_from_embeddings",
    "chunk_rows",
    "weighted_prediction_loss",
    "LOSSES",
    "AUTO_DENSE_MAX",
    "CHUNK_ELEMENTS",
]

#: elementwise losses of :func:`weighted_prediction_loss`
LOSSES = ("mse", "mae", "huber")
AUTO_DENSE_MAX = 2048
"""Up to this many regions, ``chunk=None`` computes the ``[n, n]`` quantities in one block."""
CHUNK_ELEMENTS = 1 << 22
"""Entries of one ``[chunk, n]`` block when chunking automatically (~4.2 M)."""

_HALF = (torch.float16, torch.bfloat16)
_DELTA_WHY = ": it orders regions by pattern similarity"


# ============================================================================ helpers
def chunk_rows(n: int, chunk: int | None = None) -> int | None:
    """Anchor rows per block of an ``[n, n]`` computation; ``None`` means one dense block.

    ``chunk=None`` is automatic: one block up to :data:`AUTO_DENSE_MAX` regions (so
    nothing changes for small cities), else ``max(1, CHUNK_ELEMENTS // n)`` rows. An
    explicit ``chunk >= 1`` always chunks, with that many rows per block.
    """
    if chunk is None:
        return None if n <= AUTO_DENSE_MAX else max(1, CHUNK_ELEMENTS // max(n, 1))
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a whole number >= 1 of anchor rows per block, or None for "
                         f"automatic (got {chunk!r})")
    return chunk


def _check_float(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"'{name}' must be a torch.Tensor (got {type(x).__name__})")
    if not x.is_floating_point():
        raise TypeError(f"'{name}' must be a floating-point tensor (got {x.dtype}); "
                        f"convert it with .float()")
    return x


class NonFiniteInputError(ValueError):
    """A loss or statistic got a NaN or inf input (a diverged model, or bad data)."""


def _check_finite(name: str, x: Tensor, why: str = "") -> None:
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteInputError(f"'{name}' must be finite: it holds NaN or inf{why}")


def _positive_finite(name: str, value: object) -> float:
    """A setting that must be a finite number > 0 (bandwidth, tau)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)) or (
            isinstance(value, Tensor) and value.numel() != 1):
        raise TypeError(f"{name} must be a number (got {type(value).__name__})")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0 (got {v!r})")
    return v


def _check_embeddings(name: str, x: object) -> Tensor:
    x = _check_float(name, x)
    if x.dim() != 2:
        raise ValueError(f"Expected '{name}' of shape [n, D] (got {list(x.shape)})")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"'{name}' needs at least one row and one column (got {list(x.shape)})")
    _check_finite(name, x, "; check the embeddings (RIAM or the projector) for a diverged run")
    return x


def _pow2(exponent: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``2**exponent`` as two exact factors, each representable in ``dtype``."""
    half = torch.div(exponent, 2, rounding_mode="floor")
    two = torch.tensor(2.0, dtype=dtype, device=exponent.device)
    return two.pow(half.to(dtype)), two.pow((exponent - half).to(dtype))


def _rescale_exponent(magnitude: Tensor, dtype: torch.dtype) -> Tensor:
    """The power of two to divide by so that ``magnitude`` lands in a safe band, else 0.

    The band is ``[2**lo, 2**hi]`` with ``hi``, ``lo`` a quarter of the dtype's exponent range
    (``2**-31 .. 2**32`` in float32): there, sums of squares neither overflow nor underflow,
    and the value is left as it is (bit-identical results). Beyond it, only the excess is
    divided out, so that the gradient, which is multiplied by ``2**e`` on the way back, stays
    in range too.
    """
    info = torch.finfo(dtype)
    hi, lo = int(math.log2(info.max)) // 4, -(int(-math.log2(info.tiny)) // 4)
    e = torch.frexp(magnitude)[1].to(torch.int64)
    return e - e.clamp(lo, hi)


def _scaled(x: Tensor, exponent: Tensor) -> Tensor:
    """``x / 2**exponent``: exact for normal numbers, and never overflows."""
    a, b = _pow2(-exponent, x.dtype)
    return x * a * b


def _unit_rows(x: Tensor) -> Tensor:
    """Rows scaled to unit length without overflow or underflow; zero rows stay zero.

    Each row is first divided by the power of two that brings its largest entry into
    ``[0.5, 1)`` (exact in floating point: the result is bit-identical for ordinary rows), so
    rows of 1e30 or 1e-30 get the same direction as rows of 1, and the backward pass divides
    by a norm of at least 0.5 (no intermediate overflow).
    """
    y = _scaled(x, torch.frexp(x.detach().abs().amax(dim=-1, keepdim=True))[1].to(torch.int64))
    norm = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
    return y / torch.where(norm > 0, norm, torch.ones_like(norm))  # a zero row stays 0


def _work(x: Tensor) -> Tensor:
    """Half precision is computed in float32."""
    return x.float() if x.dtype in _HALF else x


def _row_index(n: int, rows: Tensor | slice | None, device: torch.device) -> Tensor:
    if rows is None:
        return torch.arange(n, device=device)
    if isinstance(rows, slice):
        return torch.arange(n, device=device)[rows]
    idx = torch.as_tensor(rows, device=device)
    if idx.dim() != 1 or idx.dtype in (torch.bool,) or idx.is_floating_point():
        raise ValueError(f"rows must be a slice or a 1-D integer tensor of region indices "
                         f"(got {idx.dtype}, shape {list(idx.shape)})")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"rows must lie in [0, {n}) (got {int(idx.min())}..{int(idx.max())})")
    return idx.long()


# ============================================================================ Eq. 10
def region_feature_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    """Per-region mean and unbiased standard deviation over the batch (Eq. 10).

    Features of extreme magnitude (beyond ``2**32`` or below ``2**-31`` in float32) are
    divided by a power of two per ``(region, feature)`` first (exact), so features of 1e30
    do not overflow the squares; in between, the plain formulas run unchanged.

    Shapes:
        z: ``[b, n, d]`` -> ``(mu, sigma)``, each ``[n, d]``.
    """
    z = _check_float("z", z)
    if z.dim() != 3:
        raise ValueError(f"Expected 'z' of shape [b, n, d] (got {list(z.shape)})")
    if z.shape[0] < 2:
        raise ValueError(
            "region_feature_stats needs a batch of at least 2 samples: Eq. 10 divides by "
            f"(b - 1) (got b={z.shape[0]}); use a larger batch size or drop the last batch"
        )
    exponent = _rescale_exponent(z.detach().abs().amax(dim=0), z.dtype)  # [n, d]
    u = _scaled(z, exponent)
    mu = u.mean(dim=0)
    var = (u - mu).pow(2).sum(dim=0) / (z.shape[0] - 1)
    # sqrt'(0) is infinite: a region whose features do not vary over the batch (no flow and
    # no neighbours, say) would send NaN into the backbone. Same values, gradient 0 there.
    positive = var > 0
    sigma = torch.where(positive, torch.where(positive, var, torch.ones_like(var)).sqrt(),
                        torch.zeros_like(var))
    return _scaled(mu, -exponent), _scaled(sigma, -exponent)


# ============================================================================ Eq. 5
def feature_kld(mu_hat: Tensor, sigma_hat: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    r"""Eq. 5's :math:`\mathcal{L}_{KLD}` per region: KL(N(mu_hat, sigma_hat) || N(mu, sigma)).

    .. math::
        \sum_j \log\frac{\sigma_j}{\hat\sigma_j}
        + \frac{\hat\sigma_j^2 + (\hat\mu_j - \mu_j)^2}{2\sigma_j^2} - \frac12

    Computed as ratios to :math:`\sigma` (no square of a large sigma overflows). All
    inputs must be finite and both sigmas > 0 (``ValueError`` otherwise); the result is
    never NaN and is ``+inf`` only where the divergence exceeds the dtype's range.

    Shapes:
        all inputs ``[n, d]`` -> ``[n]`` (summed over ``d``).
    """
    for name, t in (("mu_hat", mu_hat), ("sigma_hat", sigma_hat), ("mu", mu), ("sigma", sigma)):
        _check_float(name, t)
    if not (mu_hat.shape == sigma_hat.shape == mu.shape == sigma.shape):
        raise ValueError(
            "feature_kld expects four tensors of one shape [n, d] (got "
            f"{list(mu_hat.shape)}, {list(sigma_hat.shape)}, {list(mu.shape)}, {list(sigma.shape)})"
        )
    for name, t in (("mu_hat", mu_hat), ("sigma_hat", sigma_hat), ("mu", mu), ("sigma", sigma)):
        _check_finite(name, t)
    for name, t in (("sigma_hat", sigma_hat), ("sigma", sigma)):
        if not bool((t > 0).all()):
            raise ValueError(f"'{name}' must be > 0 everywhere (a normal's standard deviation); "
                             f"floor it, e.g. with .clamp_min(min_sigma)")
    ratio = sigma_hat / sigma
    gap = (mu_hat - mu) / sigma
    terms = torch.log(sigma) - torch.log(sigma_hat) + 0.5 * (ratio.pow(2) + gap.pow(2)) - 0.5
    return terms.sum(dim=-1)


# ============================================================================ Eq. 6
def kde_log_density(phi: Tensor, bandwidth: float, *, chunk: int | None = None) -> Tensor:
    r"""Log of the Gaussian kernel density of each embedding among all of them (Eq. 6).

    .. math::
        \log\rho_r = \log\frac{1}{|R|\,h^D}\sum_i (2\pi)^{-D/2}
        \exp\Big(-\frac{\lVert\phi_r-\phi_i\rVert^2}{2h^2}\Big)

    The kernel is the D-dimensional standard normal, so :math:`\rho` is a proper
    density (the paper writes :math:`1/(h|R|)`; the constant cancels in
    :func:`density_weights`). Computed with ``logsumexp`` on distances of ``phi``
    (divided by a power of two if its entries are extreme, the scale folded into the
    exponent's factor): the self term keeps every value finite however far an embedding
    lies from the others, and neither embeddings of 1e30 nor a bandwidth of 1e-30
    overflow. Always finite; ``phi`` must be finite and ``bandwidth`` a finite number > 0.

    Args:
        chunk: anchor rows per block (default: automatic, see :func:`chunk_rows`);
            memory O(chunk x n), backward included (each block is recomputed).

    Shapes:
        phi: ``[n, D]`` -> ``[n]``.
    """
    phi = _check_embeddings("phi", phi)
    h = _positive_finite("bandwidth", bandwidth)
    n, dim = phi.shape
    block = chunk_rows(n, chunk)
    work = _work(phi)
    exponent = _rescale_exponent(work.detach().abs().amax(), work.dtype)
    u = _scaled(work, exponent)  # entries of at most 2**32 (float32), squares cannot overflow
    # exp(-|phi_r - phi_i|^2 / (2 h^2)) = exp(-|u_r - u_i|^2 * factor), factor = 4^e / (2 h^2)
    log_factor = 2 * int(exponent) * math.log(2.0) - math.log(2.0) - 2 * math.log(h)
    factor = math.exp(log_factor) if log_factor < math.log(torch.finfo(work.dtype).max) else math.inf
    if block is None or block >= n:
        lse = _kde_block(u, 0, n, factor)
    else:
        lse = _RowBlocks.apply(lambda t, a, b: _kde_block(t, a, b, factor), block, u)
    log_norm = math.log(n) + dim * math.log(h) + 0.5 * dim * math.log(2 * math.pi)
    out = (lse - log_norm).to(phi.dtype)
    if phi.dtype in _HALF and not bool(torch.isfinite(out).all()):
        raise ValueError(f"The log-density (about {-log_norm:.3g}) lies beyond {phi.dtype}'s range at "
                         f"bandwidth {h!r} and D={dim}: pass phi in float32")
    return out


def _kde_block(u: Tensor, start: int, stop: int, factor: float) -> Tensor:
    """``logsumexp_i -|u_r - u_i|^2 * factor`` for the anchor rows ``start:stop``.

    Without a graph to record, the ``[chunk, n]`` block is overwritten in place (one block
    buffer instead of a dozen temporaries).
    """
    inplace = not (torch.is_grad_enabled() and u.requires_grad)
    c = stop - start
    norms = u.pow(2).sum(-1)
    gram = u[start:stop] @ u.transpose(0, 1)
    if inplace:
        sq = gram.mul_(-2).add_(norms[start:stop].unsqueeze(1)).add_(norms.unsqueeze(0)).clamp_min_(0)
    else:
        sq = (norms[start:stop].unsqueeze(1) + norms.unsqueeze(0) - 2 * gram).clamp_min(0)
    # |a|^2 + |b|^2 - 2ab is exact only up to ~D eps (|a|^2 + |b|^2): pairs within that bound
    # (duplicates, the diagonal) are recomputed from the differences, so that a duplicate is
    # at distance exactly 0 however small the bandwidth.
    tol = (u.shape[1] + 4) * torch.finfo(u.dtype).eps * (norms[start:stop] + norms.max()).detach()
    r, i = (sq.detach() <= tol.unsqueeze(1)).nonzero(as_tuple=True)
    near = (u[start + r] - u[i]).pow(2).sum(-1)
    own = (torch.arange(c, device=u.device), torch.arange(start, stop, device=u.device))
    zeros = torch.zeros(c, dtype=u.dtype, device=u.device)
    if inplace:
        sq.index_put_((r, i), near).index_put_(own, zeros)  # exactly 0 on the diagonal
    else:
        sq = sq.index_put((r, i), near).index_put(own, zeros)
    if math.isinf(factor):  # bandwidth far below the spread: only exact duplicates count
        exponent = torch.where(sq > 0, torch.full_like(sq, -math.inf), sq * 0.0)  # gradient 0
    else:
        exponent = sq.mul_(-factor) if inplace else sq * (-factor)
    return torch.logsumexp(exponent, dim=1)


class _RowBlocks(torch.autograd.Function):
    """``cat([fn(x, start, stop) for each block of rows])`` recomputed block by block in backward.

    A checkpoint without the cost of importing ``torch.utils.checkpoint`` (which loads the
    compiler): forward keeps no block's intermediates, backward rebuilds one block at a time,
    so memory is O(chunk x n) both ways and the gradient is the one-block autograd gradient.
    """

    @staticmethod
    def forward(ctx, fn: Callable[[Tensor, int, int], Tensor], block: int,  # type: ignore[override]
                x: Tensor) -> Tensor:
        n = x.shape[0]
        ctx.fn, ctx.block = fn, block
        ctx.save_for_backward(x)
        return torch.cat([fn(x, s, min(s + block, n)) for s in range(0, n, block)])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        n, grad = x.shape[0], torch.zeros_like(x)
        for s in range(0, n, ctx.block):
            e = min(s + ctx.block, n)
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(ctx.fn(xg, s, e), xg, grad_out[s:e], allow_unused=True)
            if g is not None:
                grad += g
        return None, None, grad


# ============================================================================ Eq. 14
def density_weights(log_density: Tensor) -> Tensor:
    r"""Inverse-density region weights of mean exactly 1 (Eq. 14).

    .. math:: w_r = |R|\,\frac{1/\rho_r}{\sum_{r'} 1/\rho_{r'}} = |R|\,\mathrm{softmax}(-\log\rho)_r

    Computed from the log-density, never by exponentiating it, so densities that
    differ by many orders of magnitude give finite weights. ``log_density`` must be finite.

    Shapes:
        log_density: ``[n]`` -> ``[n]``.
    """
    log_density = _check_float("log_density", log_density)
    if log_density.dim() != 1:
        raise ValueError(f"Expected 'log_density' of shape [n] (got {list(log_density.shape)})")
    _check_finite("log_density", log_density)
    return log_density.shape[0] * torch.softmax(-log_density, dim=0)


# ============================================================================ Eq. 7
def pattern_similarity(phi: Tensor, rows: Tensor | slice | None = None) -> Tensor:
    """Cosine similarity between region embeddings (Eq. 7).

    The similarity of a region with itself is 1, also for an all-zero embedding; a
    zero embedding has similarity 0 with every other region. Rows of extreme magnitude
    are divided by a power of two before they are normalised, so embeddings of any
    finite magnitude get their true direction. ``phi`` must be finite.

    Args:
        rows: anchor rows to compute (a slice or indices; default: all), for memory
            O(len(rows) x n) at large ``n``.

    Shapes:
        phi: ``[n, D]`` -> ``[n, n]`` (symmetric with unit diagonal), or
        ``[len(rows), n]`` with ``rows``.
    """
    phi = _check_embeddings("phi", phi)
    unit = _unit_rows(_work(phi))
    n = phi.shape[0]
    if rows is None:
        return (unit @ unit.transpose(0, 1)).fill_diagonal_(1.0).to(phi.dtype)
    idx = _row_index(n, rows, phi.device)
    out = unit[idx] @ unit.transpose(0, 1)
    out[torch.arange(idx.numel(), device=phi.device), idx] = 1.0  # mm keeps no output: in place
    return out.to(phi.dtype)


# ============================================================================ Eq. 13
def simdcl_loss(d: Tensor, delta: Tensor, tau: float = 1.0, *, chunk: int | None = None,
                anchors: int | Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    r"""Similarity-aware Distribution Contrastive loss (SimDCL, Eq. 13).

    For anchor :math:`i` and positive :math:`k \ne i`,

    .. math::
        \mathcal{L}^{(i,k)} = -\log\frac{\exp(s_{ik}/\tau)}
        {\sum_{j \ne i,\ \delta_{ij} \le \delta_{ik}} \exp(s_{ij}/\tau)},
        \qquad s = \cos(d_i, d_j),

    averaged over the :math:`n(n-1)` ordered pairs. The denominator holds every
    region at most as similar to :math:`i` as :math:`k` (ties included, :math:`k`
    itself included). Each row of ``delta`` is sorted once and the denominators
    are a cumulative log-sum-exp read at the end of each tie group: O(n^2 log n)
    time; no ``[n, n, n]`` tensor is built. ``delta`` is a constant (no gradient
    flows into it). Always finite for finite ``d`` and ``delta``.

    Args:
        tau: temperature, a finite number > 0 with ``1/tau`` well inside the dtype's range.
        chunk: anchor rows per block (default: automatic, see :func:`chunk_rows`). Chunked,
            the value and gradient of each block are computed together (the gradient of
            Eq. 13 in closed form), so memory is O(chunk x n) besides ``delta``, backward
            included; no second pass. At most :data:`AUTO_DENSE_MAX` regions and without
            ``anchors``, one autograd block (the reference computation) is used.
        anchors: ``m`` anchors drawn uniformly without replacement per call (an unbiased
            estimate of the loss and its gradient over ``m`` of the ``n`` rows; ``m >= n``
            is exact), or a 1-D tensor of distinct anchor indices to use.
        generator: random generator for the anchor draw (default: torch's global one).

    Shapes:
        d: ``[n, d]`` distribution representations; delta: ``[n, n]`` -> scalar.
    """
    n = _check_simdcl_inputs(d, delta, tau)
    delta = delta.detach()
    return _simdcl(d, lambda idx: delta[idx], tau, n, chunk, anchors, generator,
                   dense=lambda: _simdcl_dense(d, delta, tau, n))


def simdcl_loss_from_embeddings(d: Tensor, phi: Tensor, tau: float = 1.0, *,
                                chunk: int | None = None, anchors: int | Tensor | None = None,
                                generator: torch.Generator | None = None) -> Tensor:
    r"""SimDCL (Eq. 13) with :math:`\delta = \cos(\phi_i, \phi_j)` (Eq. 7) computed per block.

    The same loss as ``simdcl_loss(d, pattern_similarity(phi), tau, ...)``, but the
    ``[n, n]`` similarity is never held: each block of anchor rows computes its rows of
    :math:`\delta` from ``phi`` (:func:`pattern_similarity` with ``rows=``), so memory is
    O(chunk x n) in all. ``phi`` is a constant (no gradient flows into it).

    Shapes:
        d: ``[n, d]``; phi: ``[n, D]`` -> scalar.
    """
    _check_float("d", d)
    phi = _check_embeddings("phi", phi)
    if d.dim() == 2 and phi.shape[0] != d.shape[0]:
        raise ValueError(f"'phi' needs one row per region of 'd' (got {phi.shape[0]} rows for "
                         f"n={d.shape[0]})")
    n = _check_simdcl_inputs(d, None, tau)
    phi = phi.detach()
    unit_phi = _unit_rows(_work(phi))  # once: each block reads its rows of cos(phi)

    def delta_rows(idx: Tensor) -> Tensor:  # pattern_similarity(phi, rows=idx) off the diagonal
        return (unit_phi[idx] @ unit_phi.transpose(0, 1)).to(phi.dtype)

    return _simdcl(d, delta_rows, tau, n, chunk, anchors, generator,
                   dense=lambda: _simdcl_dense(d, pattern_similarity(phi), tau, n))


def _simdcl(d: Tensor, delta_rows: Callable[[Tensor], Tensor], tau: float, n: int,
            chunk: int | None, anchors: int | Tensor | None, generator: torch.Generator | None,
            dense: Callable[[], Tensor]) -> Tensor:
    block = chunk_rows(n, chunk)
    idx = _anchor_index(n, anchors, generator, d.device)
    if idx is None and block is None:
        return dense()
    if idx is None:
        idx = torch.arange(n, device=d.device)
    block = min(block or idx.numel(), idx.numel())
    unit = _unit_rows(_work(d))
    need_grad = torch.is_grad_enabled() and unit.requires_grad
    loss = _SimDCLRows.apply(unit, idx, delta_rows, float(tau), block, need_grad)
    return loss.to(d.dtype)


def _anchor_index(n: int, anchors: int | Tensor | None, generator: torch.Generator | None,
                  device: torch.device) -> Tensor | None:
    if anchors is None:
        return None
    if isinstance(anchors, Tensor):
        idx = _row_index(n, anchors, device)
        if idx.numel() == 0 or torch.unique(idx).numel() != idx.numel():
            raise ValueError("anchors must hold at least one index and no index twice")
        return idx
    if isinstance(anchors, bool) or not isinstance(anchors, int) or anchors < 1:
        raise ValueError(f"anchors must be a whole number >= 1 of sampled anchor rows, a 1-D "
                         f"index tensor, or None for every row (got {anchors!r})")
    if anchors >= n:
        return None
    return torch.randperm(n, generator=generator).narrow(0, 0, anchors).sort().values.to(device)


def _simdcl_dense(d: Tensor, delta: Tensor, tau: float, n: int) -> Tensor:
    """The reference computation: one ``[n, n]`` block under autograd (used up to 2048 regions)."""
    _check_finite("delta", delta, _DELTA_WHY)
    unit = _unit_rows(_work(d))
    logits = _off_diagonal(unit @ unit.transpose(0, 1) / tau, n)  # [n, n-1]
    sim = _off_diagonal(delta.to(unit.dtype), n)  # [n, n-1]
    sim_sorted, order = sim.sort(dim=1)
    logits_sorted = logits.gather(1, order)
    cum = _log_cumsum_exp_bounded(logits_sorted, 1.0 / tau)
    # last position of each tie group: the denominator includes every tie of k
    group_end = torch.searchsorted(sim_sorted.contiguous(), sim_sorted.contiguous(), right=True) - 1
    log_denominator = cum.gather(1, group_end)
    return ((log_denominator - logits_sorted).sum() / (n * (n - 1))).to(d.dtype)


class _SimDCLRows(torch.autograd.Function):
    """SimDCL over blocks of anchor rows, value and closed-form gradient in one pass.

    For one anchor row sorted by delta (positions ``q``, tie groups ``[start(q), end(q)]``),
    ``loss = sum_p cum[end(p)] - l[p]`` with ``cum`` the cumulative log-sum-exp of the
    logits ``l``, so ``dloss/dl[q] = exp(l[q]) * sum_{p >= start(q)} exp(-cum[end(p)]) - 1``:
    a reverse cumulative sum. Only the ``[n, D]`` gradient is kept between blocks.
    """

    @staticmethod
    def forward(ctx, unit: Tensor, anchors: Tensor,  # type: ignore[override]
                delta_rows: Callable[[Tensor], Tensor], tau: float, block: int,
                need_grad: bool) -> Tensor:
        n, m = unit.shape[0], anchors.numel()
        total = torch.zeros((), dtype=torch.float64, device=unit.device)
        grad = torch.zeros_like(unit) if need_grad else None
        for start in range(0, m, block):
            idx = anchors[start:start + block]
            loss_sum, g = _simdcl_block(unit, idx, delta_rows(idx), tau, need_grad)
            total += loss_sum
            if grad is not None and g is not None:
                grad.index_add_(0, idx, g @ unit)
                grad.addmm_(g.transpose(0, 1), unit[idx])
        scale = 1.0 / (m * (n - 1))
        if grad is not None:
            grad.mul_(scale / tau)
            ctx.save_for_backward(grad)
        return (total * scale).to(unit.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None, None, None, None


def _simdcl_block(unit: Tensor, idx: Tensor, delta_rows: Tensor, tau: float,
                  need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Sum of the row losses of the anchors ``idx`` and ``dloss/dlogits`` ``[c, n]``."""
    c, n = idx.numel(), unit.shape[0]
    if delta_rows.shape != (c, n):
        raise ValueError(f"delta rows of shape [{c}, {n}] expected (got {list(delta_rows.shape)})")
    _check_finite("delta", delta_rows, _DELTA_WHY)
    own = (torch.arange(c, device=unit.device), idx)
    logits = unit[idx] @ unit.transpose(0, 1) / tau
    logits[own] = -math.inf  # the anchor itself: sorted last, weight 0
    sim = delta_rows.to(unit.dtype, copy=True)
    sim[own] = math.inf
    sim_sorted, order = _order_keys(sim).sort(dim=1)  # integer keys sort ~25% faster
    del sim
    lg = logits.gather(1, order)
    del logits
    bound = 1.0 / tau
    cum = _log_cumsum_exp_bounded(lg, bound)
    start, end = _tie_groups(sim_sorted)
    del sim_sorted
    cum_end = cum if end is None else cum.gather(1, end)
    del cum, end
    loss_sum = (cum_end[:, :-1] - lg[:, :-1]).sum(dtype=torch.float64)
    if not need_grad:
        return loss_sum, None
    if _bounded_fast_path(lg.dtype, bound):
        w = torch.exp(bound - cum_end)
        w[:, -1] = 0.0
        tail = w.flip(1).cumsum(1).flip(1)  # sum over p >= q
        g_sorted = torch.exp(lg - bound) * (tail if start is None else tail.gather(1, start))
    else:
        a = -cum_end
        a[:, -1] = -math.inf
        log_tail = torch.logcumsumexp(a.flip(1), dim=1).flip(1)
        g_sorted = torch.exp(lg + (log_tail if start is None else log_tail.gather(1, start)))
    g_sorted[:, :-1] -= 1.0
    g_sorted[:, -1] = 0.0
    g = torch.empty_like(g_sorted).scatter_(1, order, g_sorted)
    return loss_sum, g


def _order_keys(x: Tensor) -> Tensor:
    """Integers in the order of the floats ``x`` (no NaN), equal exactly where they are equal.

    The IEEE bits of a float, read as a signed integer, are in order for positive floats;
    for negative ones all bits but the sign are flipped. ``-0.0`` becomes ``+0.0`` first.
    Overwrites ``x``.
    """
    bits = x.add_(0.0).view(torch.int32 if x.element_size() == 4 else torch.int64)
    mask = (1 << (8 * x.element_size() - 1)) - 1
    return bits.bitwise_xor_((bits >> (8 * x.element_size() - 1)) & mask)


def _tie_groups(s: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """First and last position of each entry's tie group in rows sorted ascending.

    ``(None, None)`` when the rows hold no tie (every group is one entry).
    """
    c, n = s.shape
    new = torch.ones(c, n, dtype=torch.bool, device=s.device)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    if bool(new.all()):
        return None, None
    pos = torch.arange(n, device=s.device).expand(c, n)
    start = torch.where(new, pos, 0).cummax(dim=1).values
    last = torch.ones_like(new)
    last[:, :-1] = new[:, 1:]
    end = torch.where(last, pos, n).flip(1).cummin(dim=1).values.flip(1)
    return start, end


def _bounded_fast_path(dtype: torch.dtype, bound: float) -> bool:
    safe = 50.0 if dtype in (torch.float16, torch.bfloat16, torch.float32) else 600.0
    return dtype not in _HALF and 2.0 * bound <= safe


def _log_cumsum_exp_bounded(x: Tensor, bound: float) -> Tensor:
    """``logcumsumexp`` along dim 1 for values known to lie in ``[-bound, bound]`` (or ``-inf``).

    Cosine logits over tau are bounded, so ``exp(x - bound)`` cannot overflow and,
    while ``2 * bound`` stays below the dtype's safe exponent range, cannot
    underflow to 0 either: one exp, one cumsum and one log replace the much slower
    generic ``logcumsumexp`` (same value and gradient). Otherwise the generic one is used.
    """
    if not _bounded_fast_path(x.dtype, bound):
        return torch.logcumsumexp(x, dim=1)
    return torch.log(torch.cumsum(torch.exp(x - bound), dim=1)) + bound


def _check_simdcl_inputs(d: Tensor, delta: Tensor | None, tau: float) -> int:
    _check_float("d", d)
    if d.dim() != 2:
        raise ValueError(f"Expected 'd' of shape [n, d] (got {list(d.shape)})")
    n = d.shape[0]
    if delta is not None:
        if not isinstance(delta, Tensor) or delta.is_complex():
            raise TypeError(f"'delta' must be a real torch.Tensor (got {type(delta).__name__})")
        if delta.shape != (n, n):
            raise ValueError(f"Expected 'delta' of shape [{n}, {n}] (got {list(delta.shape)})")
    if n < 2:
        raise ValueError(f"SimDCL needs at least 2 regions (got n={n})")
    if d.shape[1] < 1:
        raise ValueError(f"'d' needs at least one feature (got {list(d.shape)})")
    t = _positive_finite("tau", tau)
    limit = torch.finfo(d.dtype).max / 4
    if 1.0 / t > limit:
        raise ValueError(f"tau={t!r} is too small for {d.dtype}: the logits cos/tau would "
                         f"overflow; use tau >= {1.0 / limit:.3g}")
    _check_finite("d", d, "; check the projector and the backbone features for a diverged run")
    return n  # delta's values are checked where they are read: whole, or block by block


def _off_diagonal(m: Tensor, n: int) -> Tensor:
    """``[n, n] -> [n, n-1]``: drop the diagonal, keep row order."""
    return m.flatten()[1:].view(n - 1, n + 1)[:, :-1].reshape(n, n - 1)


# ============================================================================ Eq. 15
def weighted_prediction_loss(
    pred: Tensor,
    target: Tensor,
    weights: Tensor | None = None,
    mask: Tensor | None = None,
    loss: str = "mse",
    huber_delta: float = 1.0,
) -> Tensor:
    r"""Density-weighted prediction loss (Eq. 15), averaged over valid entries.

    .. math::
        \tilde{\mathcal{L}} = \frac{1}{\sum m}\sum_{b,s,r,c} m_{bsrc}\, w_r\,
        \ell(\hat x_{bsrc}, x_{bsrc})

    With ``weights=None`` (or all ones) this is the plain masked loss. The paper's
    sum over regions and steps is taken as a mean over valid entries so the
    loss scale does not depend on batch size or on how many cells are masked.
    Masked-out entries take no part at all: a NaN there reaches neither the loss nor
    the gradient. A NaN in a valid entry of ``pred`` or ``target`` propagates (the
    caller's guard names it); finite inputs never give NaN.

    Args:
        pred, target: ``[b, s, n, c]`` (any layout with regions on axis ``-2``).
        weights: ``[n]`` per-region weights, finite and >= 0 (default: ``None``, all ones).
        mask: boolean or 0/1 tensor broadcastable to ``pred`` (default: ``None``).
        loss: ``"mse"``, ``"mae"`` or ``"huber"`` (default: ``"mse"``).
        huber_delta: where ``"huber"`` turns from quadratic to linear, in the units of
            ``pred``: :math:`\ell(e) = e^2 / 2` for :math:`|e| < \delta`, else
            :math:`\delta (|e| - \delta / 2)` (default: ``1.0``; on data scaled to
            ``[0, 1]`` almost every error is below 1, so a smaller delta, e.g. ``0.1``, is
            what makes the loss robust).
    """
    _check_float("pred", pred)
    _check_float("target", target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {list(pred.shape)} vs {list(target.shape)}")
    if loss not in LOSSES:
        raise ValueError(f"Unknown loss {loss!r}; choose 'mse', 'mae' or 'huber'")
    delta = _positive_finite("huber_delta", huber_delta)
    if pred.numel() == 0:
        raise ValueError(f"pred must hold at least one entry (got shape {list(pred.shape)})")
    keep = None
    if mask is not None:
        keep = _check_mask(mask, pred)
        zero = torch.zeros((), dtype=pred.dtype, device=pred.device)
        pred, target = torch.where(keep, pred, zero), torch.where(keep, target, zero)
    w = None
    if weights is not None:
        _check_float("weights", weights)
        if weights.dim() != 1 or weights.shape[0] != pred.shape[-2]:
            raise ValueError(
                f"Expected 'weights' of shape [{pred.shape[-2]}] (one per region, axis -2 of pred) "
                f"(got {list(weights.shape)})"
            )
        _check_finite("weights", weights)
        if not bool((weights >= 0).all()):
            raise ValueError("'weights' must be >= 0: a negative weight would reward error "
                             "(use density_weights, or clamp the weights)")
        w = weights.to(pred.dtype).unsqueeze(-1)
        with torch.no_grad():  # weight 0 on an error beyond the dtype's range: 0, not 0 * inf = NaN
            drop = (w == 0) & ~torch.isfinite(_elementwise_loss(pred, target, loss, delta))
        zero = torch.zeros((), dtype=pred.dtype, device=pred.device)
        pred, target = torch.where(drop, zero, pred), torch.where(drop, zero, target)
    err = _elementwise_loss(pred, target, loss, delta)
    if w is not None:
        err = err * w
    if keep is None:
        return err.mean()
    count = keep.sum()
    if count == 0:
        raise ValueError("mask excludes every entry: nothing to compute the loss on")
    return err.sum() / count.to(err.dtype)


def _check_mask(mask: object, pred: Tensor) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"'mask' must be a torch.Tensor (got {type(mask).__name__})")
    if mask.dtype != torch.bool:
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("'mask' must be boolean or hold only 0 and 1")
        mask = mask != 0
    try:
        return mask.to(pred.device).expand_as(pred)
    except RuntimeError as err:
        raise ValueError(f"'mask' of shape {list(mask.shape)} does not broadcast to pred "
                         f"{list(pred.shape)}") from err


def _elementwise_loss(pred: Tensor, target: Tensor, loss: str, delta: float = 1.0) -> Tensor:
    if loss == "mse":
        return (pred - target).pow(2)
    if loss == "mae":
        return (pred - target).abs()
    if loss == "huber":
        return F.huber_loss(pred, target, reduction="none", delta=delta)
    raise ValueError(f"Unknown loss {loss!r}; choose 'mse', 'mae' or 'huber'")
