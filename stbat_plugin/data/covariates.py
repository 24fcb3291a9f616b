"""The local clock of a city's timestamps: minute of day, day of week, and the calendar
covariates (time of day and day of week as sin/cos pairs) built from them."""

from __future__ import annotations

import numpy as np

__all__ = ["MINUTES_PER_DAY", "clock", "time_features"]

MINUTES_PER_DAY = 24 * 60


def clock(timestamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minute of the day (0-1439) and day of the week (0 = Monday) of each timestamp.

    Shapes:
        timestamps: ``[T]`` datetime64 -> two ``[T]`` int64 arrays.
    """
    stamps = np.asarray(timestamps).astype("datetime64[m]")
    days = stamps.astype("datetime64[D]")
    minute = (stamps - days).astype(np.int64)
    weekday = (days.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday
    return minute, weekday


def time_features(timestamps: np.ndarray) -> np.ndarray:
    r"""Time of day and day of week of each step, each as a point on the unit circle.

    With :math:`u` the fraction of the day elapsed at the interval start and :math:`v` the
    fraction of the week (Monday 00:00 = 0): :math:`(\sin 2\pi u, \cos 2\pi u, \sin 2\pi v,
    \cos 2\pi v)`. Works for any interval; the clock is the file's local clock.

    Shapes:
        timestamps: ``[T]`` datetime64 -> ``[T, 4]`` float32.
    """
    minutes, weekday = clock(timestamps)
    day = 2 * np.pi * minutes / MINUTES_PER_DAY
    week = 2 * np.pi * (weekday * MINUTES_PER_DAY + minutes) / (7 * MINUTES_PER_DAY)
    return np.stack([np.sin(day), np.cos(day), np.sin(week), np.cos(week)], axis=-1).astype(
        np.float32)
