"""Checks that turn the raw arrays of a city ``.npz`` file into validated, typed arrays.

Every check raises :class:`CityDataError` (a ``ValueError``) whose message says what the
format expects, what the file holds and how to fix it. The format is described in
``data/DATA.md``; ``flow`` and ``timestamps`` are the only required keys.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from stbat_plugin.data.covariates import MINUTES_PER_DAY

REQUIRED_KEYS = ("flow", "timestamps")
FORMAT_HINT = (
    "a city file needs 'flow' float (T, N, C) raw counts and 'timestamps' str (T,) "
    "ISO 'YYYY-MM-DDTHH:MM' start times on a regular grid (see data/DATA.md)"
)


class CityDataError(ValueError):
    """A city file (or array set) does not follow the documented ``.npz`` format."""


def check_required(arrays: Mapping[str, np.ndarray], where: str) -> None:
    """Raise if a required key is missing, naming every missing key."""
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        raise CityDataError(
            f"{where}: missing required key(s) {missing}; found keys {sorted(arrays)}. "
            f"Add them: {FORMAT_HINT}."
        )


def check_flow(raw: np.ndarray, where: str) -> np.ndarray:
    """Validate ``flow`` and return it as float32.

    Shapes:
        raw: [T, N, C] numeric -> returns [T, N, C] float32.
    """
    if raw.ndim != 3:
        raise CityDataError(
            f"{where}: 'flow' must be 3-D (T, N, C) = (time, regions, channels), got shape "
            f"{raw.shape}; add a channel axis with flow[..., None] for one-channel data."
        )
    if raw.dtype.kind not in "biuf":
        raise CityDataError(f"{where}: 'flow' must be numeric, got dtype {raw.dtype}.")
    if 0 in raw.shape:
        raise CityDataError(
            f"{where}: 'flow' is empty, shape {raw.shape} (T, N, C); a city needs at least one "
            f"time step, region and channel."
        )
    flow = np.ascontiguousarray(raw, dtype=np.float32)
    bad = ~np.isfinite(flow)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise CityDataError(
            f"{where}: 'flow' has {int(bad.sum())} NaN/inf cell(s), first at (t, n, c) = "
            f"{first}; store missing readings as 0 and flag them False in 'observed' (T, N)."
        )
    if (flow < 0).any():
        first = tuple(int(i) for i in np.argwhere(flow < 0)[0])
        raise CityDataError(
            f"{where}: 'flow' has {int((flow < 0).sum())} negative cell(s), first at (t, n, c) "
            f"= {first}; flows are counts >= 0 (use 0 + observed=False for missing readings)."
        )
    return flow


def parse_timestamps(raw: np.ndarray, num_steps: int, where: str) -> np.ndarray:
    """Parse ``timestamps`` to ``datetime64[m]`` and check its length.

    Shapes:
        raw: [T] str or datetime64 -> returns [T] datetime64[m].
    """
    if raw.ndim != 1 or raw.shape[0] != num_steps:
        raise CityDataError(
            f"{where}: 'timestamps' must have shape ({num_steps},) to match flow's T, got "
            f"{raw.shape}; store one start time per flow step."
        )
    try:
        ts = raw.astype("datetime64[m]")
    except (ValueError, TypeError) as exc:
        sample = raw[:1].tolist()
        raise CityDataError(
            f"{where}: 'timestamps' must be ISO 'YYYY-MM-DDTHH:MM' strings, got e.g. {sample} "
            f"({exc})."
        ) from exc
    if np.isnat(ts).any():
        raise CityDataError(f"{where}: 'timestamps' contains NaT/empty values at "
                            f"{np.flatnonzero(np.isnat(ts))[:5].tolist()}.")
    return ts


def check_interval(
    ts: np.ndarray, arrays: Mapping[str, np.ndarray], where: str
) -> int:
    """Check that ``ts`` is strictly regular and return the interval in minutes."""
    stored = _int_scalar(arrays, "interval_minutes", where)
    if ts.shape[0] < 2:
        if stored is None:
            raise CityDataError(
                f"{where}: a single time step cannot define the interval; add "
                f"'interval_minutes' (int) to the file."
            )
        return _positive_interval(stored, where)
    diffs = np.diff(ts).astype(np.int64)
    if not (diffs == diffs[0]).all() or diffs[0] <= 0:
        bad = int(np.flatnonzero(diffs != diffs[0])[0]) + 1 if diffs[0] > 0 else 1
        raise CityDataError(
            f"{where}: 'timestamps' must be strictly increasing with a constant step; first "
            f"irregular step at index {bad}: {ts[bad - 1]} -> {ts[bad]} (step {diffs[0]} min "
            f"before). Resample onto a regular grid and fill gaps with 0 + observed=False."
        )
    spacing = int(diffs[0])
    if stored is not None and stored != spacing:
        raise CityDataError(
            f"{where}: 'interval_minutes' = {stored} but the timestamps are {spacing} min "
            f"apart; fix or drop 'interval_minutes'."
        )
    return _positive_interval(spacing, where)


def _int_scalar(arrays: Mapping[str, np.ndarray], key: str, where: str) -> int | None:
    """A whole-number scalar key (e.g. ``interval_minutes``), or None when absent."""
    if key not in arrays:
        return None
    value = np.asarray(arrays[key])
    if value.size != 1 or value.dtype.kind not in "iuf" or not np.isfinite(value).all() \
            or float(value.reshape(())) != int(value.reshape(())):
        raise CityDataError(f"{where}: '{key}' must be one whole number, got dtype {value.dtype} "
                            f"shape {value.shape}; store e.g. np.array(60).")
    return int(value.reshape(()))


def _positive_interval(value: int, where: str) -> int:
    if value <= 0:
        raise CityDataError(f"{where}: 'interval_minutes' must be > 0, got {value}.")
    if MINUTES_PER_DAY % value:
        raise CityDataError(
            f"{where}: the time step is {value} min, which does not divide a day "
            f"({MINUTES_PER_DAY} min) into whole steps (days, weeks and the daily split need "
            f"that); resample to a divisor of a day, e.g. 5, 10, 15, 30 or 60 min."
        )
    return value


def check_nonnegative(value: np.ndarray | None, key: str, where: str) -> None:
    """Graph weights (adjacency, edge weights) are similarities or distances: >= 0."""
    if value is not None and value.size and (value < 0).any():
        first = tuple(int(i) for i in np.argwhere(value < 0)[0])
        raise CityDataError(
            f"{where}: '{key}' has {int((value < 0).sum())} negative entr(y/ies), first at "
            f"{first}; graph weights are distances or similarities >= 0 (0 = no edge)."
        )


def check_meta(arrays: Mapping[str, np.ndarray], keys: tuple[str, ...], where: str
               ) -> dict[str, str]:
    """Metadata keys (``city``, ``units``, ...): one string or number each."""
    meta = {}
    for key in keys:
        if key not in arrays:
            continue
        value = np.asarray(arrays[key])
        if value.size != 1 or value.dtype.kind not in "UbiufS":
            raise CityDataError(
                f"{where}: metadata '{key}' must be one string (a 0-d or 1-element array), got "
                f"dtype {value.dtype} shape {value.shape}; store e.g. np.array('...')."
            )
        meta[key] = str(value.reshape(()).item())
    return meta


def check_names(
    arrays: Mapping[str, np.ndarray], key: str, size: int, prefix: str, where: str
) -> tuple[str, ...]:
    """Return the string labels under ``key`` (length ``size``) or ``prefix0..`` defaults."""
    if key not in arrays:
        return tuple(f"{prefix}{i}" for i in range(size))
    values = np.asarray(arrays[key]).reshape(-1)
    if values.shape[0] != size:
        raise CityDataError(
            f"{where}: '{key}' must have {size} entries, got {values.shape[0]}; "
            f"store one name per index or drop the key."
        )
    return tuple(str(v) for v in values.tolist())


def check_channel_names(arrays: Mapping[str, np.ndarray], size: int, where: str) -> tuple[str, ...]:
    """Channel names: distinct, non-empty, and not ``mean`` (the results' average over channels)."""
    names = check_names(arrays, "channels", size, "ch", where)
    bad = [n for n in names if not n.strip() or n == "mean"]
    if bad or len(set(names)) != len(names):
        raise CityDataError(
            f"{where}: 'channels' must be distinct, non-empty names other than 'mean' (the "
            f"results use 'mean' for the average over channels), got {list(names)}; rename them."
        )
    return names


def check_observed(
    arrays: Mapping[str, np.ndarray], shape: tuple[int, int], where: str
) -> np.ndarray:
    """Return the ``observed`` mask as bool [T, N] (all True when absent)."""
    if "observed" not in arrays:
        return np.ones(shape, dtype=bool)
    obs = np.asarray(arrays["observed"])
    if obs.shape != shape:
        raise CityDataError(
            f"{where}: 'observed' must have shape (T, N) = {shape}, got {obs.shape}."
        )
    if obs.dtype != bool:
        if obs.dtype.kind not in "iu" or not np.isin(obs, (0, 1)).all():
            raise CityDataError(
                f"{where}: 'observed' must be bool (or 0/1 integers), got dtype {obs.dtype}."
            )
        obs = obs.astype(bool)
    return np.ascontiguousarray(obs)


def check_matrix(
    arrays: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...], where: str,
    dtype: type = np.float32,
) -> np.ndarray | None:
    """Return ``arrays[key]`` as a finite ``dtype`` array of ``shape``, or None when absent."""
    if key not in arrays:
        return None
    value = np.asarray(arrays[key])
    if value.shape != shape:
        raise CityDataError(
            f"{where}: '{key}' must have shape {shape} (N = number of regions in flow), "
            f"got {value.shape}; fix the array or drop the key."
        )
    return _finite(value, key, where, dtype)


def _finite(value: np.ndarray, key: str, where: str, dtype: type = np.float32) -> np.ndarray:
    if value.dtype.kind not in "biuf" or not np.isfinite(value).all():
        raise CityDataError(f"{where}: '{key}' must be finite numbers, got dtype {value.dtype} "
                            f"with non-finite or non-numeric entries.")
    return np.ascontiguousarray(value, dtype=dtype)


def check_poi(
    arrays: Mapping[str, np.ndarray], num_regions: int, where: str
) -> tuple[np.ndarray | None, tuple[str, ...] | None]:
    """Return ``(poi [N, K] float32, categories)`` or ``(None, None)`` when absent."""
    if "poi" not in arrays:
        return None, None
    poi = np.asarray(arrays["poi"])
    if poi.ndim != 2 or poi.shape[0] != num_regions:
        raise CityDataError(
            f"{where}: 'poi' must have shape (N, K) with N = {num_regions} regions, got "
            f"{poi.shape}; store one row of category counts per region (same order as flow)."
        )
    poi = _finite(poi, "poi", where)
    if (poi < 0).any():
        raise CityDataError(f"{where}: 'poi' holds counts and must be >= 0.")
    categories = check_names(arrays, "poi_categories", poi.shape[1], "poi", where)
    return poi, categories


def check_edges(
    arrays: Mapping[str, np.ndarray], num_regions: int, where: str
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Return ``(edge_index [2, E] int64, edge_weight [E] float32 | None)`` or Nones."""
    if "edge_index" not in arrays:
        if "edge_weight" in arrays:
            raise CityDataError(f"{where}: 'edge_weight' given without 'edge_index'; add the "
                                f"(2, E) int edge list or drop 'edge_weight'.")
        return None, None
    ei = np.asarray(arrays["edge_index"])
    if ei.ndim != 2 or ei.shape[0] != 2 or ei.dtype.kind not in "iu":
        raise CityDataError(
            f"{where}: 'edge_index' must be an integer array of shape (2, E) (source row, "
            f"target row), got dtype {ei.dtype} shape {ei.shape}; transpose an (E, 2) list."
        )
    if ei.size and (ei.min() < 0 or ei.max() >= num_regions):
        raise CityDataError(
            f"{where}: 'edge_index' values must lie in [0, {num_regions - 1}] (region "
            f"positions), got range [{int(ei.min())}, {int(ei.max())}]."
        )
    weight = check_matrix(arrays, "edge_weight", (ei.shape[1],), where)
    return np.ascontiguousarray(ei, dtype=np.int64), weight


def check_grid_shape(
    arrays: Mapping[str, np.ndarray], num_regions: int, where: str
) -> tuple[int, int] | None:
    """Return ``(H, W)`` with ``H * W == N``, or None when absent."""
    if "grid_shape" not in arrays:
        return None
    gs = np.asarray(arrays["grid_shape"]).reshape(-1)
    if gs.shape != (2,) or gs.dtype.kind not in "iu" or (gs <= 0).any():
        raise CityDataError(f"{where}: 'grid_shape' must be two positive ints (H, W), got "
                            f"{gs.tolist()}.")
    h, w = int(gs[0]), int(gs[1])
    if h * w != num_regions:
        raise CityDataError(
            f"{where}: 'grid_shape' = ({h}, {w}) gives H*W = {h * w} cells but flow has "
            f"N = {num_regions} regions; a grid city stores every cell row-major (n = row*W + "
            f"col), so H*W must equal N."
        )
    return h, w
