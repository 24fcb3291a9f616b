"""Per-region affine output calibration, shrunk toward the identity (target city only).

A network shared by every region cannot fit each region's level and gain; the target city
is the one place where per-region parameters are allowed, since they are never transferred.
After fine-tuning, each region and channel gets ``y ≈ a * pred + b`` (in the units the
network predicts in, e.g. scaled units), fitted on the target's training windows by least
squares with a pull toward ``a = 1, b = 0`` (no change) of weight ``shrinkage``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fit_affine_calibration", "apply_affine_calibration"]


def fit_affine_calibration(pred: Tensor, target: Tensor, mask: Tensor | None = None,
                           shrinkage: float = 24.0) -> tuple[Tensor, Tensor]:
    r"""Slope and intercept of each region and channel, in closed form.

    .. math::
        (a, b) = \arg\min_{a, b} \sum_w m_w (y_w - a \hat y_w - b)^2
                 + \lambda \left((a - 1)^2 + b^2\right)

    over every window and horizon step ``w`` of a region and channel (``m_w`` = 1 where the
    cell counts). Setting the gradient to zero gives the 2x2 system

    .. math::
        \begin{pmatrix} S_{\hat y \hat y} + \lambda & S_{\hat y} \\ S_{\hat y} & N + \lambda
        \end{pmatrix} \begin{pmatrix} a \\ b \end{pmatrix} =
        \begin{pmatrix} S_{\hat y y} + \lambda \\ S_y \end{pmatrix},

    solved by Cramer's rule (its determinant is at least :math:`\lambda^2 > 0`). A region with
    no counted cell keeps ``a = 1, b = 0``. ``shrinkage`` is in units of windows: it weighs
    the pull toward the identity like ``shrinkage`` windows of evidence for the intercept
    (and like ``shrinkage`` windows with ``pred = 1`` for the slope). Computed in float64.

    Args:
        pred: predictions; target: the observed values; mask: cells that count (default:
            all). Masked cells may hold anything, NaN included.
        shrinkage: :math:`\lambda > 0` (default: ``24.0``).

    Shapes:
        pred, target, mask: ``[..., n, c]`` (e.g. ``[W, s, n, c]``) -> a, b: ``[n, c]``.
    """
    if pred.shape != target.shape or pred.dim() < 2:
        raise ValueError(f"Expected 'pred' and 'target' of one shape [..., n, c] (got "
                         f"{list(pred.shape)} and {list(target.shape)})")
    if mask is not None and mask.shape != pred.shape:
        raise ValueError(f"Expected 'mask' of shape {list(pred.shape)} (got {list(mask.shape)})")
    lam = float(shrinkage)
    if not lam > 0 or lam == float("inf"):
        raise ValueError(f"Expected 'shrinkage' a finite number > 0 (got {shrinkage!r}); "
                         "set --calibrate-shrinkage")
    m = torch.ones_like(pred, dtype=torch.bool) if mask is None else mask.bool()
    p = torch.where(m, pred.double(), 0.0).flatten(0, -3)  # [w, n, c]
    y = torch.where(m, target.double(), 0.0).flatten(0, -3)
    count = m.flatten(0, -3).double().sum(0)
    s_p, s_y, s_pp, s_py = p.sum(0), y.sum(0), (p * p).sum(0), (p * y).sum(0)
    det = (s_pp + lam) * (count + lam) - s_p * s_p
    a = ((s_py + lam) * (count + lam) - s_p * s_y) / det
    b = ((s_pp + lam) * s_y - s_p * (s_py + lam)) / det
    return a, b


def apply_affine_calibration(pred: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``a * pred + b`` per region and channel, in ``pred``'s dtype.

    Shapes:
        pred: ``[..., n, c]``; a, b: ``[n, c]`` -> ``[..., n, c]``.
    """
    if a.shape != pred.shape[-2:] or b.shape != pred.shape[-2:]:
        raise ValueError(f"Expected 'a' and 'b' of shape [n, c] = {list(pred.shape[-2:])} (got "
                         f"{list(a.shape)} and {list(b.shape)})")
    return (pred.double() * a.to(pred.device) + b.to(pred.device)).to(pred.dtype)
