"""Chronological train/validation/test splits on the time axis, and the valid-region mask.

Source cities are split train:val = 2:1 (no test). A target city keeps its last ``test_days``
for testing, the ``val_days`` before them for validation and the ``train_days`` immediately
before validation as its scarce training data (``train_days=0``: zero-shot, empty train slice).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from stbat_plugin.data.city import City
from stbat_plugin.data.covariates import MINUTES_PER_DAY

logger = logging.getLogger(__name__)


class SplitError(ValueError):
    """A split cannot be made; ``suggestion`` holds keyword arguments that fit, if any."""

    def __init__(self, message: str, suggestion: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.suggestion = suggestion


@dataclass(frozen=True)
class Split:
    """Index ranges on the time axis (``test`` is None for source cities)."""

    train: slice
    val: slice
    test: slice | None = None


def steps_per_day(interval_minutes: int) -> int:
    """Number of steps per day for an interval that divides a day (24 for hourly data)."""
    if interval_minutes <= 0 or MINUTES_PER_DAY % interval_minutes:
        raise SplitError(
            f"interval of {interval_minutes} min does not divide a day ({MINUTES_PER_DAY} min); "
            "day-based splits need an interval such as 5, 15, 30 or 60 minutes."
        )
    return MINUTES_PER_DAY // interval_minutes


def source_split(num_steps: int, train_ratio: float = 2, val_ratio: float = 1) -> Split:
    """Chronological ``train : val = train_ratio : val_ratio`` split, no test part."""
    if train_ratio <= 0 or val_ratio <= 0:
        raise SplitError(f"ratios must be > 0, got train_ratio={train_ratio}, "
                         f"val_ratio={val_ratio}.")
    if num_steps < 2:
        raise SplitError(f"a source split needs >= 2 time steps, got {num_steps}.")
    n_train = int(num_steps * train_ratio / (train_ratio + val_ratio))
    n_train = min(max(n_train, 1), num_steps - 1)
    return Split(train=slice(0, n_train), val=slice(n_train, num_steps), test=None)


def target_split(
    num_steps: int,
    steps_per_day: int,
    train_days: int,
    val_days: int = 60,
    test_days: int = 60,
    name: str | None = None,
) -> Split:
    """Test = last ``test_days``, val = the ``val_days`` before, train = ``train_days`` before.

    Raises:
        SplitError: bad arguments, or the series is too short; then ``err.suggestion`` holds
            ``{"train_days", "val_days", "test_days"}`` that fit (None if nothing fits).
    """
    if steps_per_day < 1 or train_days < 0 or val_days < 1 or test_days < 1:
        raise SplitError(
            f"need steps_per_day >= 1, train_days >= 0, val_days >= 1, test_days >= 1; got "
            f"{steps_per_day}, {train_days}, {val_days}, {test_days}."
        )
    needed = (train_days + val_days + test_days) * steps_per_day
    if needed > num_steps:
        raise _too_short(num_steps, steps_per_day, train_days, val_days, test_days, name)
    test_start = num_steps - test_days * steps_per_day
    val_start = test_start - val_days * steps_per_day
    train_start = val_start - train_days * steps_per_day
    return Split(
        train=slice(train_start, val_start),
        val=slice(val_start, test_start),
        test=slice(test_start, num_steps),
    )


def _too_short(
    num_steps: int, spd: int, train_days: int, val_days: int, test_days: int, name: str | None
) -> SplitError:
    """Build the error for a series shorter than the requested split, with a fitting proposal."""
    days = num_steps // spd
    head = (
        f"{name or 'series'} has {num_steps / spd:.1f} days ({num_steps} steps at {spd} "
        f"steps/day) but train_days={train_days} + val_days={val_days} + "
        f"test_days={test_days} = {train_days + val_days + test_days} days are needed"
    )
    if days < 2:
        return SplitError(f"{head}; a target split needs at least 2 whole days (1 val, 1 test).")
    remaining = days - train_days
    if remaining >= 2:
        val = max(1, remaining * val_days // (val_days + test_days))
        val = min(val, remaining - 1)
        suggestion = {"train_days": train_days, "val_days": val, "test_days": remaining - val}
        hint = f"with train_days={train_days} try --val-days {val} --test-days {remaining - val}"
    else:
        suggestion = {"train_days": days - 2, "val_days": 1, "test_days": 1}
        hint = f"try --train-days {days - 2} --val-days 1 --test-days 1"
    return SplitError(f"{head}; {hint}.", suggestion)


def valid_region_mask(city: City, train: slice) -> np.ndarray:
    """Regions that carry flow in the training slice.

    A region is invalid (False) when its total flow over all channels and the observed cells
    of ``train`` is zero (e.g. a zone without bike stations). With an empty training slice
    (zero-shot) every region is valid: looking at validation/test flow would leak targets.

    Shapes:
        returns [N] bool.
    """
    start, stop, _ = train.indices(city.num_steps)
    if stop <= start:
        return np.ones(city.num_regions, dtype=bool)
    flow = city.flow[start:stop].sum(axis=2, dtype=np.float64)
    total = np.where(city.observed[start:stop], flow, 0.0).sum(axis=0)
    mask = total > 0
    if not mask.all():
        logger.info("%s: %d region(s) without training flow are masked out",
                    city.name, int((~mask).sum()))
    return mask
