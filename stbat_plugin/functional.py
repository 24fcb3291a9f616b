"""The equations of STBaT (Hao et al., IJCAI 2025) as pure functions of tensors.

Everything here is stateless, keeps the input dtype (float32 or float64) and is
differentiable where a gradient makes sense, like ``torch.nn.functional``.
``docs/equations.md`` maps each paper equation to the function below and states
the reading chosen where the paper is ambiguous.

Shapes (one glossary for the whole library): ``b`` batch, ``s`` horizon,
``n`` regions, ``c`` channels, ``d`` feature size, ``D`` embedding size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "region_feature_stats",
    "feature_kld",
    "kde_log_density",
    "density_weights",
    "pattern_similarity",
    "simdcl_loss",
    "weighted_prediction_loss",
]


def region_feature_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    """Per-region mean and unbiased standard deviation over the batch (Eq. 10).

    Shapes:
        z: ``[b, n, d]`` -> ``(mu, sigma)``, each ``[n, d]``.
    """
    if z.dim() != 3:
        raise ValueError(f"Expected 'z' of shape [b, n, d] (got {list(z.shape)})")
    if z.shape[0] < 2:
        raise ValueError(
            "region_feature_stats needs a batch of at least 2 samples: Eq. 10 divides by "
            f"(b - 1) (got b={z.shape[0]}); use a larger batch size or drop the last batch"
        )
    mu = z.mean(dim=0)
    var = (z - mu).pow(2).sum(dim=0) / (z.shape[0] - 1)
    # sqrt'(0) is infinite: a region whose features do not vary over the batch (no flow and
    # no neighbours, say) would send NaN into the backbone. Same values, gradient 0 there.
    positive = var > 0
    sigma = torch.where(positive, torch.where(positive, var, torch.ones_like(var)).sqrt(),
                        torch.zeros_like(var))
    return mu, sigma


def feature_kld(mu_hat: Tensor, sigma_hat: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    r"""Eq. 5's :math:`\mathcal{L}_{KLD}` per region: KL(N(mu_hat, sigma_hat) || N(mu, sigma)).

    .. math::
        \sum_j \log\frac{\sigma_j}{\hat\sigma_j}
        + \frac{\hat\sigma_j^2 + (\hat\mu_j - \mu_j)^2}{2\sigma_j^2} - \frac12

    Shapes:
        all inputs ``[n, d]`` -> ``[n]`` (summed over ``d``).
    """
    if not (mu_hat.shape == sigma_hat.shape == mu.shape == sigma.shape):
        raise ValueError(
            "feature_kld expects four tensors of one shape [n, d] (got "
            f"{list(mu_hat.shape)}, {list(sigma_hat.shape)}, {list(mu.shape)}, {list(sigma.shape)})"
        )
    var = sigma.pow(2)
    terms = (
        torch.log(sigma) - torch.log(sigma_hat)
        + (sigma_hat.pow(2) + (mu_hat - mu).pow(2)) / (2 * var)
        - 0.5
    )
    return terms.sum(dim=-1)


def kde_log_density(phi: Tensor, bandwidth: float) -> Tensor:
    r"""Log of the Gaussian kernel density of each embedding among all of them (Eq. 6).

    .. math::
        \log\rho_r = \log\frac{1}{|R|\,h^D}\sum_i (2\pi)^{-D/2}
        \exp\Big(-\frac{\lVert\phi_r-\phi_i\rVert^2}{2h^2}\Big)

    The kernel is the D-dimensional standard normal, so :math:`\rho` is a proper
    density (the paper writes :math:`1/(h|R|)`; the constant cancels in
    :func:`density_weights`). Computed with ``logsumexp``: the self term keeps
    every value finite, however far an embedding lies from the others.

    Shapes:
        phi: ``[n, D]`` -> ``[n]``.
    """
    if phi.dim() != 2:
        raise ValueError(f"Expected 'phi' of shape [n, D] (got {list(phi.shape)})")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0 (got {bandwidth})")
    n, dim = phi.shape
    sq = _sq_dist(phi)
    log_norm = math.log(n) + dim * math.log(bandwidth) + 0.5 * dim * math.log(2 * math.pi)
    return torch.logsumexp(-sq / (2 * bandwidth**2), dim=1) - log_norm


def _sq_dist(phi: Tensor) -> Tensor:
    """Pairwise squared distances in O(n^2) memory, exactly 0 on the diagonal."""
    norms = phi.pow(2).sum(-1)
    sq = (norms.unsqueeze(1) + norms.unsqueeze(0) - 2 * phi @ phi.transpose(0, 1)).clamp_min(0)
    eye = torch.eye(phi.shape[0], dtype=torch.bool, device=phi.device)
    return sq.masked_fill(eye, 0.0)


def density_weights(log_density: Tensor) -> Tensor:
    r"""Inverse-density region weights of mean exactly 1 (Eq. 14).

    .. math:: w_r = |R|\,\frac{1/\rho_r}{\sum_{r'} 1/\rho_{r'}} = |R|\,\mathrm{softmax}(-\log\rho)_r

    Computed from the log-density, never by exponentiating it, so densities that
    differ by many orders of magnitude give finite weights.

    Shapes:
        log_density: ``[n]`` -> ``[n]``.
    """
    if log_density.dim() != 1:
        raise ValueError(f"Expected 'log_density' of shape [n] (got {list(log_density.shape)})")
    return log_density.shape[0] * torch.softmax(-log_density, dim=0)


def pattern_similarity(phi: Tensor) -> Tensor:
    """Cosine similarity between every pair of region embeddings (Eq. 7).

    Shapes:
        phi: ``[n, D]`` -> ``[n, n]``, symmetric with unit diagonal.
    """
    if phi.dim() != 2:
        raise ValueError(f"Expected 'phi' of shape [n, D] (got {list(phi.shape)})")
    unit = F.normalize(phi, dim=-1, eps=1e-12)
    return unit @ unit.transpose(0, 1)


def simdcl_loss(d: Tensor, delta: Tensor, tau: float = 1.0) -> Tensor:
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
    time and O(n^2) memory; no ``[n, n, n]`` tensor is built. ``delta`` is a
    constant (no gradient flows into it).

    Shapes:
        d: ``[n, d]`` distribution representations; delta: ``[n, n]`` -> scalar.
    """
    n = _check_simdcl_inputs(d, delta, tau)
    logits = _off_diagonal(pattern_similarity(d) / tau, n)  # [n, n-1]
    sim = _off_diagonal(delta.detach().to(d.dtype), n)  # [n, n-1]
    sim_sorted, order = sim.sort(dim=1)
    logits_sorted = logits.gather(1, order)
    cum = _log_cumsum_exp_bounded(logits_sorted, 1.0 / tau)
    # last position of each tie group: the denominator includes every tie of k
    group_end = torch.searchsorted(sim_sorted.contiguous(), sim_sorted.contiguous(), right=True) - 1
    log_denominator = cum.gather(1, group_end)
    return (log_denominator - logits_sorted).sum() / (n * (n - 1))


def _log_cumsum_exp_bounded(x: Tensor, bound: float) -> Tensor:
    """``logcumsumexp`` along dim 1 for values known to lie in ``[-bound, bound]``.

    Cosine logits over tau are bounded, so ``exp(x - bound)`` cannot overflow and,
    while ``2 * bound`` stays below the dtype's safe exponent range, cannot
    underflow to 0 either: one exp, one cumsum and one log replace the much slower
    generic ``logcumsumexp`` (same value and gradient). Otherwise the generic one is used.
    """
    safe = 50.0 if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else 600.0
    if x.dtype in (torch.float16, torch.bfloat16) or 2.0 * bound > safe:
        return torch.logcumsumexp(x, dim=1)
    return torch.log(torch.cumsum(torch.exp(x - bound), dim=1)) + bound


def _check_simdcl_inputs(d: Tensor, delta: Tensor, tau: float) -> int:
    if d.dim() != 2:
        raise ValueError(f"Expected 'd' of shape [n, d] (got {list(d.shape)})")
    n = d.shape[0]
    if delta.shape != (n, n):
        raise ValueError(f"Expected 'delta' of shape [{n}, {n}] (got {list(delta.shape)})")
    if n < 2:
        raise ValueError(f"SimDCL needs at least 2 regions (got n={n})")
    if not tau > 0:
        raise ValueError(f"tau must be > 0 (got {tau})")
    if not torch.isfinite(delta).all():
        raise ValueError("'delta' must be finite: it orders regions by pattern similarity")
    return n


def _off_diagonal(m: Tensor, n: int) -> Tensor:
    """``[n, n] -> [n, n-1]``: drop the diagonal, keep row order."""
    return m.flatten()[1:].view(n - 1, n + 1)[:, :-1].reshape(n, n - 1)


def weighted_prediction_loss(
    pred: Tensor,
    target: Tensor,
    weights: Tensor | None = None,
    mask: Tensor | None = None,
    loss: str = "mse",
) -> Tensor:
    r"""Density-weighted prediction loss (Eq. 15), averaged over valid entries.

    .. math::
        \tilde{\mathcal{L}} = \frac{1}{\sum m}\sum_{b,s,r,c} m_{bsrc}\, w_r\,
        \ell(\hat x_{bsrc}, x_{bsrc})

    With ``weights=None`` (or all ones) this is the plain masked loss. The paper's
    sum over regions and steps is taken as a mean over valid entries so the
    loss scale does not depend on batch size or on how many cells are masked.

    Args:
        pred, target: ``[b, s, n, c]`` (any layout with regions on axis ``-2``).
        weights: ``[n]`` per-region weights (default: ``None``, all ones).
        mask: boolean or 0/1 tensor broadcastable to ``pred`` (default: ``None``).
        loss: ``"mse"``, ``"mae"`` or ``"huber"`` (default: ``"mse"``).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {list(pred.shape)} vs {list(target.shape)}")
    err = _elementwise_loss(pred, target, loss)
    if weights is not None:
        if weights.dim() != 1 or weights.shape[0] != pred.shape[-2]:
            raise ValueError(
                f"Expected 'weights' of shape [{pred.shape[-2]}] (one per region, axis -2 of pred) "
                f"(got {list(weights.shape)})"
            )
        err = err * weights.to(err.dtype).unsqueeze(-1)
    if mask is None:
        return err.mean()
    m = mask.to(err.dtype).expand_as(err)
    count = m.sum()
    if count == 0:
        raise ValueError("mask excludes every entry: nothing to compute the loss on")
    return (err * m).sum() / count


def _elementwise_loss(pred: Tensor, target: Tensor, loss: str) -> Tensor:
    if loss == "mse":
        return (pred - target).pow(2)
    if loss == "mae":
        return (pred - target).abs()
    if loss == "huber":
        return F.huber_loss(pred, target, reduction="none")
    raise ValueError(f"Unknown loss {loss!r}; choose 'mse', 'mae' or 'huber'")
