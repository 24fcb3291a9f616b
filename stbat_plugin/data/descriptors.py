"""Region descriptors for STBaT's Regional Imbalance Acquisition Module (RIAM, Sec. 4.1).

The paper describes each region by its POI category distribution. Cities without POI use the
documented fallback :func:`temporal_profile_descriptors`: the region's mean flow profile over
hour-of-day (24 bins) and day-of-week (7 bins), computed from the training window only. The
RIAM module is shared across cities, so all cities of one run must use the same kind and K.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from stbat_plugin.data.city import City
from stbat_plugin.data.covariates import clock
from stbat_plugin.data.validation import CityDataError
from stbat_plugin.riam import normalize_descriptors

logger = logging.getLogger(__name__)

KINDS = ("auto", "poi", "temporal_profile")
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
PROFILE_NAMES = tuple(f"hour{h:02d}" for h in range(24)) + tuple(f"dow_{d}" for d in DAY_NAMES)


@dataclass(frozen=True, eq=False)
class RegionDescriptors:
    """One probability distribution per region.

    Shapes:
        values: [N, K] float32, every row >= 0 and summing to 1; names: K feature names.
    """

    values: np.ndarray
    kind: str
    names: tuple[str, ...]


class DescriptorSet(NamedTuple):
    """What :func:`region_descriptors` returns: one descriptor set per city, and its kind."""

    descriptors: list[RegionDescriptors]  # in the order of the cities given
    kind: str  # "poi" or "temporal_profile", the same for every city


def _distributions(x: np.ndarray, what: str) -> np.ndarray:
    """:func:`~stbat_plugin.riam.normalize_descriptors` in float64, logging all-zero rows.

    Shapes:
        x: [N, K] non-negative -> [N, K] float64 rows summing to 1 (all-zero rows uniform).
    """
    empty = int((x.sum(axis=1) <= 0).sum())
    if empty:
        logger.info("%s: %d region(s) with an all-zero row get a uniform row", what, empty)
    return normalize_descriptors(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()


def poi_descriptors(city: City) -> RegionDescriptors:
    """Normalised POI category distribution per region (all-zero rows become uniform).

    Shapes:
        city.poi: [N, K] counts -> values [N, K].
    """
    if city.poi is None or city.poi_categories is None:
        raise CityDataError(
            f"city {city.name!r} has no 'poi' array; use kind='temporal_profile' (or 'auto') "
            f"or add 'poi' (N, K) and 'poi_categories' (K,) to its file."
        )
    values = _distributions(city.poi.astype(np.float64), f"{city.name} POI")
    return RegionDescriptors(values.astype(np.float32), "poi", city.poi_categories)


def masked_bin_means(values: np.ndarray, observed: np.ndarray, bins: np.ndarray,
                     size: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the observed values of every region per time bin, and the observation counts.

    A bin is any label of the time steps (hour of day, day of week, a calendar slot); a bin
    without an observed step has mean 0 and count 0.

    Shapes:
        values: ``[T, N, ...]``; observed: ``[T, N]`` bool; bins: ``[T]`` int in
        ``[0, size)`` -> means ``[size, N, ...]`` float64, counts ``[size, N]`` float64.
    """
    obs = np.asarray(observed, dtype=bool)
    bins = np.asarray(bins)
    if obs.shape != values.shape[:2] or bins.shape != values.shape[:1]:
        raise ValueError(f"Expected values [T, N, ...], observed [T, N] and bins [T] (got "
                         f"{values.shape}, {obs.shape} and {bins.shape}); pass the same steps")
    if bins.size and (bins.min() < 0 or bins.max() >= size):
        raise ValueError(f"Expected bins in [0, {size}) (got {bins.min()} .. {bins.max()}); "
                         "raise size or relabel the bins")
    trailing = (1,) * (values.ndim - 2)
    sums = np.zeros((size,) + values.shape[1:])
    counts = np.zeros((size, values.shape[1]))
    np.add.at(sums, bins, np.where(obs.reshape(obs.shape + trailing), values, 0.0))
    np.add.at(counts, bins, obs.astype(np.float64))
    return sums / np.maximum(counts, 1).reshape(counts.shape + trailing), counts


def temporal_profile_descriptors(
    city: City, train_stop: int, train_start: int = 0
) -> RegionDescriptors:
    """Hour-of-day (24) + day-of-week (7) mean-flow profile per region, K = 31.

    Uses only ``flow[train_start:train_stop]`` and only observed cells, channels summed. Each
    part is normalised to sum 1, the two are concatenated and renormalised (each sums to 1/2).
    Regions without flow in the window (and every region when the window is empty, e.g.
    zero-shot) get uniform rows: uniform within each part (1/48 per hour bin, 1/14 per
    weekday bin), so every row keeps mass 1/2 per part. Weekday bins never seen in the
    window (e.g. 3 training days) are 0. Bins use the timestamp's clock hour, so any interval works.
    For a few-shot target city pass ``train_start`` so only its scarce training data is used.

    Shapes:
        city.flow: [T, N, C] -> values [N, 31].
    """
    if not 0 <= train_start <= train_stop <= city.num_steps:
        raise CityDataError(
            f"city {city.name!r}: need 0 <= train_start <= train_stop <= T = {city.num_steps}, "
            f"got train_start={train_start}, train_stop={train_stop}."
        )
    window = slice(train_start, train_stop)
    if train_stop == train_start:
        logger.warning("%s: empty training window, temporal profiles are uniform", city.name)
    obs = city.observed[window]
    total = city.flow[window].sum(axis=2, dtype=np.float64)
    minute, dow = clock(city.timestamps[window])
    parts = [
        _distributions(masked_bin_means(total, obs, bins, k)[0].T, f"{city.name} {what} profile")
        for bins, k, what in ((minute // 60, 24, "hour"), (dow, 7, "weekday"))
    ]
    values = np.concatenate(parts, axis=1) / 2.0
    return RegionDescriptors(values.astype(np.float32), "temporal_profile", PROFILE_NAMES)


def _profile(city: City, spec: int | slice) -> RegionDescriptors:
    if isinstance(spec, slice):
        start, stop, _ = spec.indices(city.num_steps)
        return temporal_profile_descriptors(city, stop, start)
    return temporal_profile_descriptors(city, int(spec))


def region_descriptors(
    cities: Sequence[City], train_stops: Sequence[int | slice], kind: str = "auto"
) -> DescriptorSet:
    """Descriptors of every city, all of one kind; returns them and the kind used.

    ``kind="auto"`` uses POI when every city has POI with the same categories, else temporal
    profiles for all. ``train_stops[i]`` is city i's training stop index (profile window
    ``[0, stop)``) or its training slice (window ``[slice.start, slice.stop)``).
    """
    if kind not in KINDS:
        raise CityDataError(f"unknown descriptor kind {kind!r}; choose one of {list(KINDS)}.")
    if len(train_stops) != len(cities):
        raise CityDataError(f"need one training stop per city: {len(cities)} cities, "
                            f"{len(train_stops)} train_stops.")
    if kind == "auto":
        kind = "poi" if _same_poi(cities) else "temporal_profile"
    if kind == "poi":
        _check_poi(cities)
        return DescriptorSet([poi_descriptors(c) for c in cities], kind)
    return DescriptorSet([_profile(c, s) for c, s in zip(cities, train_stops, strict=True)], kind)


def _same_poi(cities: Sequence[City]) -> bool:
    if not cities or any(c.poi_categories is None for c in cities):
        return False
    return len({c.poi_categories for c in cities}) == 1


def _check_poi(cities: Sequence[City]) -> None:
    for city in cities:
        if city.poi is None:
            raise CityDataError(
                f"kind='poi' but city {city.name!r} has no POI; use kind='auto' or "
                f"'temporal_profile' (all cities must share one descriptor kind)."
            )
    if not _same_poi(cities):
        found = {c.name: len(c.poi_categories or ()) for c in cities}
        raise CityDataError(
            f"kind='poi' needs the same POI categories in every city (the RIAM module is "
            f"shared), got K per city {found} or differently named categories; use "
            f"kind='temporal_profile'."
        )
