"""``STBaTOptions``: the settings of STBaT, declared once.

The fields are :class:`~stbat_plugin.wrapper.BalancedTransfer`'s setting keyword arguments
(``BalancedTransfer(net, tau=0.5)`` is ``BalancedTransfer(net, options=STBaTOptions(tau=0.5))``).
Each field carries its help text in its metadata: the wrapper's docstring and signature, the
pipeline's ``TransferConfig.stbat`` and the ``stbat`` command's flags are generated from it.
Adding a setting is adding a field here (with its check in ``__post_init__``) and reading it
in the wrapper.
"""

from __future__ import annotations

import math
import numbers
import textwrap
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from stbat_plugin import functional as SF

__all__ = ["STBaTOptions", "option", "options_doc"]


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
           flag: str | None = None) -> Any:
    """A settings field with its help text, from which flags and docs are generated.

    Args:
        default: the value (a callable is a ``default_factory``).
        help: one line saying what the setting does (no default: it is added where shown).
        choices: the allowed values, checked by the dataclass and listed by the CLI
            (default: ``None``, any value of the field's type).
        flag: the CLI flag without ``--`` when it is not the field name; a boolean gets
            ``--FLAG`` / ``--no-FLAG`` (default: ``None``, the field name with dashes).
    """
    meta = {"help": help, "choices": choices, "flag": flag}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class STBaTOptions:
    r"""The settings of STBaT (RIAM, Sec. 4.1, and STBLM, Sec. 4.2), checked on construction.

    Defaults follow the paper where it gives a value (D=32, h=0.85, beta=0.01, tau=1, widths
    256). Every field is also a keyword argument of ``BalancedTransfer``.

    Raises:
        ValueError: a value out of range or of the wrong kind, naming the field, the
            expected values and the value got.
    """

    embed_dim: int = option(32, "RIAM embedding size D (Eq. 1)")
    bandwidth: float = option(0.85, "KDE bandwidth h of the region density (Eq. 6)")
    tau: float = option(1.0, "SimDCL temperature tau (Eq. 13)")
    beta: float = option(0.01, "weight of the KLD in L_emb (Eq. 5)")
    simdcl_weight: float = option(1.0, "weight of SimDCL next to the prediction loss (the paper "
                                  "gives none)")
    use_poi: bool = option(True, "POI classifier of RIAM (off: the ablation w/o POI)", flag="poi")
    use_fdp: bool = option(True, "feature-distribution predictor of RIAM (off: w/o FDP)",
                           flag="fdp")
    use_simdcl: bool = option(True, "SimDCL (off: w/o SimDCL; no projector is built)",
                              flag="simdcl")
    use_weighted_loss: bool = option(True, "density-weighted prediction loss (off: w/o WLoss)",
                                     flag="wloss")
    loss: str = option("mse", "elementwise prediction loss of STBaT's step 1", choices=SF.LOSSES)
    huber_delta: float = option(1.0, "with loss 'huber': the error, in scaled units, where the "
                                "loss turns from quadratic to linear")
    projector_dim: int = option(256, "width of SimDCL's projector, hidden and output (Eq. 12)")
    min_sigma: float = option(1e-2, "floor of both sigmas in the KLD, in feature units")
    simdcl_chunk: int | None = option(None, "anchor rows per block of SimDCL, the KDE and the "
                                      "similarity, memory O(chunk x n) (None: one block up to "
                                      "2048 regions, then automatic; docs/performance.md)")
    simdcl_anchors: int | None = option(None, "SimDCL over this many anchor rows drawn per step, "
                                        "an unbiased estimate (None: every region, exact)")

    def __post_init__(self) -> None:
        for name, allow_none in (("embed_dim", False), ("projector_dim", False),
                                 ("simdcl_chunk", True), ("simdcl_anchors", True)):
            object.__setattr__(self, name, _whole(name, getattr(self, name), allow_none))
        for name, strict in (("bandwidth", True), ("tau", True), ("min_sigma", True),
                             ("huber_delta", True), ("beta", False), ("simdcl_weight", False)):
            object.__setattr__(self, name, _number(name, getattr(self, name), strict))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"{f.name} must be True or False (got {value!r})")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ValueError(f"{f.name} must be one of {list(choices)} (got {value!r})")


def _whole(name: str, value: Any, allow_none: bool) -> int | None:
    """``value`` as an int >= 1 (or ``None`` where allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        unit = " of anchor rows per block" if name == "simdcl_chunk" else ""
        none = ", or None for automatic" if name == "simdcl_chunk" else \
            ", or None for every region" if allow_none else ""
        raise ValueError(f"{name} must be a whole number >= 1{unit}{none} (got {value!r})")
    return int(value)


def _number(name: str, value: Any, strict: bool) -> float:
    """``value`` as a float that is finite and > 0 (``strict``) or >= 0."""
    bound = "> 0" if strict else ">= 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number {bound} (got {value!r})")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (strict and number == 0):
        raise ValueError(f"{name} must be a finite number {bound} (got {value!r})")
    return number


def options_doc(indent: str = "        ", width: int = 92) -> str:
    """``Args:``-style entries of every :class:`STBaTOptions` field: name, help, choices, default."""
    entries = []
    for f in fields(STBaTOptions):
        default = f.default if f.default is not MISSING else None
        choices = f.metadata.get("choices")
        among = f", one of {', '.join(map(repr, choices))}" if choices else ""
        text = f"{f.name}: {f.metadata['help']}{among} (default: ``{default!r}``)."
        entries.append(textwrap.fill(text, width, initial_indent=indent,
                                     subsequent_indent=indent + "    "))
    return "\n".join(entries)
