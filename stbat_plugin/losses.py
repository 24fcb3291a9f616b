"""The loss breakdown of ``BalancedTransfer`` and the guard against non-finite losses.

- :class:`Losses`: the named terms of one iteration, open to new terms;
- :class:`StepOneLoss`: what step 1 of Sec. 4.3 computes, for step 2;
- :func:`finite_losses` and :class:`NonFiniteLossError`: no step is taken on a NaN or inf
  loss, and the error names the term and its likely cause.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

__all__ = ["Losses", "StepOneLoss", "NonFiniteLossError", "finite_losses"]

log = logging.getLogger(__name__)


class Losses:
    """Named loss breakdown of one iteration (floats), read as attributes or :meth:`as_dict`.

    Every breakdown has ``total`` (step 1's objective, ``pred + simdcl_weight * simdcl``),
    ``pred``, ``simdcl``, ``emb`` (RIAM's L_emb of step 2, ``poi_ce + beta * kld``,
    optimised separately), ``poi_ce`` and ``kld`` (0.0 where a term is switched off), and
    ``skipped`` (1.0 when the step was skipped for a non-finite loss). A term the wrapper
    adds is one more keyword: ``Losses(total=..., pred=..., new_term=...)`` and
    ``losses.new_term``. Immutable.
    """

    #: the terms every breakdown has (0.0 where switched off), in this order
    TERMS: ClassVar[tuple[str, ...]] = ("total", "pred", "simdcl", "emb", "poi_ce", "kld")
    __slots__ = ("_terms",)
    _terms: dict[str, float]

    def __init__(self, total: float, pred: float, **terms: float) -> None:
        values = {name: 0.0 for name in self.TERMS}
        values.update(total=float(total), pred=float(pred), skipped=0.0)
        values.update({name: float(value) for name, value in terms.items()})
        object.__setattr__(self, "_terms", values)

    def __getattr__(self, name: str) -> float:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._terms[name]
        except KeyError:
            raise AttributeError(f"Losses has no term {name!r}; it has {list(self._terms)}") \
                from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Losses is immutable (tried to set {name!r})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Losses) and self._terms == other._terms

    def __hash__(self) -> int:
        return hash(tuple(self._terms.items()))

    def __repr__(self) -> str:
        return f"Losses({', '.join(f'{k}={v!r}' for k, v in self._terms.items())})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_losses, (dict(self._terms),))

    def as_dict(self) -> dict[str, float]:
        """The terms by name (``skipped`` only when the step was skipped)."""
        out = dict(self._terms)
        if not out["skipped"]:
            del out["skipped"]
        return out


def _losses(terms: dict[str, float]) -> Losses:
    return Losses(**terms)


class StepOneLoss(NamedTuple):
    """What :meth:`~stbat_plugin.wrapper.BalancedTransfer.stblm_loss` returns."""

    #: step 1's objective (Sec. 4.3), the weighted sum of ``parts``
    loss: Tensor
    #: its named terms (``pred``, ``simdcl``, ...)
    parts: dict[str, Tensor]
    #: the detached feature statistics ``(mu, sigma)`` ``[m, d]`` (Eq. 10) for step 2, or
    #: ``(None, None)`` without a city or without a consumer (SimDCL or FDP)
    stats: tuple[Tensor | None, Tensor | None]


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; nothing was stepped on."""


_TERMS = {"total": "total loss", "pred": "prediction loss", "simdcl": "SimDCL loss",
          "emb": "RIAM loss L_emb", "poi_ce": "RIAM POI cross-entropy (CE)",
          "kld": "RIAM feature-distribution KLD"}


def finite_losses(parts: dict[str, Tensor], where: str, on_nonfinite: str = "raise", *,
                  inputs: dict[str, Tensor] | None = None, mask: Tensor | None = None) -> bool:
    """True when every loss term is finite. Otherwise False (``on_nonfinite="skip"``), or
    :class:`NonFiniteLossError` naming the terms and the likely cause: non-finite values in
    the batch's ``inputs`` (where they count: ``y`` under ``mask``) point at the data, finite
    inputs at a diverging model."""
    bad = [k for k, v in parts.items() if not math.isfinite(float(v.detach()))]
    if not bad:
        return True
    if on_nonfinite == "skip":
        log.warning("%s: non-finite %s; step skipped", where, ", ".join(bad))
        return False
    names = [_TERMS.get(k, k) for k in bad if k != "total"] or [_TERMS["total"]]
    cause = "the model diverged: lower --lr (or --finetune-lr), or use on_nonfinite='skip'"
    for name, t in (inputs or {}).items():
        values = t if (name != "y" or mask is None) else t[mask.expand_as(t).bool()]
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            cause = (f"the batch's {name} holds NaN or inf values, so the data is the cause: "
                     "check the city file (unobserved cells must be 0 with observed=False)")
            break
        if values.is_floating_point() and values.numel() and float(values.abs().max()) > 1e15:
            cause = (f"the batch's {name} holds values of {float(values.abs().max()):.3g}: "
                     "check the city file and its scaling")
            break
    raise NonFiniteLossError(f"{where}: {', '.join(names)} became "
                             f"{[float(parts[k].detach()) for k in bad]}; nothing was updated. "
                             f"Cause: {cause}")
