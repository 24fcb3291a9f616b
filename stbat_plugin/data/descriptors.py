"""Region descriptors for STBaT's region-level invariance module (RIAM).

The paper describes each region by its POI category distribution. Cities without POI use the
documented fallback :func:`temporal_profile_descriptors`: the region's mean flow profile over
hour-of-day (24 bins) and day-of-week (7 bins), computed from the training window only. The
RIAM module is shared across cities, so all cities of one run must use the same kind and K.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stbat_plugin.data.city import City
from stbat_plugin.data.validation import CityDataError

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

    @property
    def num_features(self) -> int:
        return int(self.values.shape[1])


def _normalise_rows(x: np.ndarray, what: str) -> np.ndarray:
    """Divide each row by its sum; rows summing to 0 become uniform (logged).

    Shapes:
        x: [N, K] -> [N, K] float64 rows summing to 1.
    """
    total = x.sum(axis=1, keepdims=True)
    empty = total[:, 0] <= 0
    if empty.any():
        logger.info("%s: %d region(s) with an all-zero row get a uniform row",
                    what, int(empty.sum()))
    out = np.where(empty[:, None], 1.0 / x.shape[1], x / np.where(total > 0, total, 1.0))
    return out.astype(np.float64)


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
    values = _normalise_rows(city.poi.astype(np.float64), f"{city.name} POI")
    return RegionDescriptors(values.astype(np.float32), "poi", city.poi_categories)


def time_bins(timestamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hour of day (0-23) and day of week (0 = Monday) of each timestamp.

    Shapes:
        timestamps: [T] datetime64 -> two [T] int64 arrays.
    """
    days = timestamps.astype("datetime64[D]")
    hour = (timestamps.astype("datetime64[h]") - days).astype(np.int64)
    dow = (days.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday
    return hour, dow


def _binned_mean(values: np.ndarray, counts: np.ndarray, bins: np.ndarray, k: int) -> np.ndarray:
    """Mean over steps of ``values`` per bin (empty bins are 0).

    Shapes:
        values, counts: [T, N]; bins: [T] in [0, k) -> [N, k].
    """
    sums = np.zeros((k, values.shape[1]))
    cnt = np.zeros((k, values.shape[1]))
    np.add.at(sums, bins, values)
    np.add.at(cnt, bins, counts)
    return (sums / np.maximum(cnt, 1)).T


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
    total = np.where(obs, city.flow[window].sum(axis=2, dtype=np.float64), 0.0)
    hour, dow = time_bins(city.timestamps[window])
    parts = [
        _normalise_rows(_binned_mean(total, obs, hour, 24), f"{city.name} hour profile"),
        _normalise_rows(_binned_mean(total, obs, dow, 7), f"{city.name} weekday profile"),
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
) -> tuple[list[RegionDescriptors], str]:
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
        return [poi_descriptors(c) for c in cities], kind
    return [_profile(c, s) for c, s in zip(cities, train_stops, strict=True)], kind


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
