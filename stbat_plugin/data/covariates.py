"""Calendar covariates from the local clock: time of day and day of week as sin/cos pairs."""

from __future__ import annotations

import numpy as np

__all__ = ["TIME_FEATURES", "time_features"]

#: names of the columns :func:`time_features` returns, in order
TIME_FEATURES = ("day_sin", "day_cos", "week_sin", "week_cos")


def time_features(timestamps: np.ndarray) -> np.ndarray:
    r"""Time of day and day of week of each step, each as a point on the unit circle.

    With :math:`u` the fraction of the day elapsed at the interval start and :math:`v` the
    fraction of the week (Monday 00:00 = 0): :math:`(\sin 2\pi u, \cos 2\pi u, \sin 2\pi v,
    \cos 2\pi v)`. Works for any interval; the clock is the file's local clock.

    Shapes:
        timestamps: ``[T]`` datetime64 -> ``[T, 4]`` float32.
    """
    stamps = np.asarray(timestamps).astype("datetime64[m]")
    minutes = (stamps - stamps.astype("datetime64[D]")).astype(np.int64)
    # 1970-01-01 was a Thursday: shift so that Monday is day 0
    weekday = (stamps.astype("datetime64[D]").astype(np.int64) + 3) % 7
    day = 2 * np.pi * minutes / 1440.0
    week = 2 * np.pi * (weekday * 1440 + minutes) / (7 * 1440.0)
    return np.stack([np.sin(day), np.cos(day), np.sin(week), np.cos(week)], axis=-1).astype(
        np.float32)
