"""Small synthetic city arrays for the data-layer tests (bad inputs are written to tmp_path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny"
TINY_NAMES = ("melbourne_pedestrian", "nyc_bike", "nyc_bike_grid2014", "nyc_taxi")


def hourly_stamps(num_steps: int, start: str = "2021-03-01T00:00", minutes: int = 60) -> np.ndarray:
    """ISO strings of a regular grid. Shapes: [T] str."""
    first = np.datetime64(start, "m")
    stamps = first + np.arange(num_steps) * np.timedelta64(minutes, "m")
    return np.datetime_as_string(stamps, unit="m")


def city_arrays(
    num_steps: int = 48, num_regions: int = 4, num_channels: int = 2, seed: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    """Valid minimal arrays (flow + timestamps) merged with ``extra`` (None removes a key)."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, Any] = {
        "flow": rng.poisson(5.0, (num_steps, num_regions, num_channels)).astype(np.float32),
        "timestamps": hourly_stamps(num_steps),
    }
    arrays.update(extra)
    return {k: v for k, v in arrays.items() if v is not None}


def write_city(directory: Path, name: str, **arrays: Any) -> Path:
    """Write ``name.npz`` with ``city_arrays(**arrays)`` into ``directory``."""
    sizes = {k: arrays.pop(k) for k in ("num_steps", "num_regions", "num_channels", "seed")
             if k in arrays}
    path = directory / f"{name}.npz"
    np.savez(path, **city_arrays(**sizes, **arrays))
    return path
