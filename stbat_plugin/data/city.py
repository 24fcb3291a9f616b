"""One city's flow data: the :class:`City` container, loading and listing ``.npz`` city files.

The file format is documented in ``data/DATA.md``: ``flow`` (T, N, C) and ``timestamps`` (T,)
are required; ``observed``, ``coords``, ``adjacency``, ``edge_index``/``edge_weight``, ``poi``,
``grid_shape`` and metadata strings are optional. Arrays follow the ``[t, n, c]`` layout.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stbat_plugin.data import validation as v
from stbat_plugin.data.validation import CityDataError

logger = logging.getLogger(__name__)

META_KEYS = ("city", "modality", "units", "source", "timezone", "edge_weight_units", "poi_source")
_STAMP = r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2})?"
_SPAN_RE = re.compile(rf"^\s*({_STAMP})?\s*:\s*({_STAMP})?\s*$")

__all__ = ["City", "CityDataError", "CityInfo", "CityNotFoundError", "available_cities",
           "city_from_arrays", "format_city_table", "list_cities", "load_city", "parse_span",
           "span_of"]
STATIC_FEATURES = ("poi", "coords", "adjacency", "edge_index", "grid_shape", "observed")


class CityNotFoundError(FileNotFoundError):
    """No ``<name>.npz`` file in the data directory (or the directory does not exist)."""


@dataclass(frozen=True, eq=False)
class City:
    """A city's flow series and static features (validated; see :func:`load_city`).

    Shapes:
        flow: [T, N, C] float32 raw counts; timestamps: [T] datetime64[m] interval starts;
        observed: [T, N] bool; region_ids: [N] str; coords: [N, 2] (lat, lon);
        adjacency: [N, N]; edge_index: [2, E] int64; edge_weight: [E]; poi: [N, K] float32.
    """

    name: str
    flow: np.ndarray
    timestamps: np.ndarray
    interval_minutes: int
    channels: tuple[str, ...]
    region_ids: np.ndarray
    observed: np.ndarray
    coords: np.ndarray | None = None
    adjacency: np.ndarray | None = None
    edge_index: np.ndarray | None = None
    edge_weight: np.ndarray | None = None
    poi: np.ndarray | None = None
    poi_categories: tuple[str, ...] | None = None
    grid_shape: tuple[int, int] | None = None
    meta: dict[str, str] = field(default_factory=dict)
    path: str = ""

    @property
    def num_steps(self) -> int:
        return int(self.flow.shape[0])

    @property
    def num_regions(self) -> int:
        return int(self.flow.shape[1])

    @property
    def num_channels(self) -> int:
        return int(self.flow.shape[2])

    @property
    def has_poi(self) -> bool:
        return self.poi is not None

    @property
    def span(self) -> tuple[str, str]:
        """First and last timestamp as ISO ``YYYY-MM-DDTHH:MM`` strings."""
        return str(self.timestamps[0]), str(self.timestamps[-1])

    def mean_flow(self, steps: slice = slice(None)) -> np.ndarray:
        """Mean observed flow per step of each region over ``steps``, channels summed.

        Shapes:
            returns [N] float64, NaN for a region with no observed step in ``steps``.
        """
        observed = self.observed[steps]
        total = np.where(observed, self.flow[steps].sum(-1, dtype=np.float64), 0.0).sum(0)
        count = observed.sum(0)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def restrict(self, start: str | None = None, end: str | None = None) -> City:
        """Keep the steps whose timestamp lies in ``[start, end]``.

        A date ``YYYY-MM-DD`` means the whole day (``end`` inclusive: up to 23:59 of that day);
        ``YYYY-MM-DDTHH:MM`` is an exact, inclusive bound. ``None`` leaves that side open.

        Shapes:
            returns a City with flow [T', N, C], timestamps [T'], observed [T', N].
        """
        lo = _parse_bound(start, is_end=False) if start else None
        hi = _parse_bound(end, is_end=True) if end else None
        keep = np.ones(self.num_steps, dtype=bool)
        if lo is not None:
            keep &= self.timestamps >= lo
        if hi is not None:
            keep &= self.timestamps < hi
        idx = np.flatnonzero(keep)
        if idx.size == 0:
            raise CityDataError(
                f"city {self.name!r}: no time step in [{start}, {end}]; the city spans "
                f"{self.span[0]} .. {self.span[1]}. Pick dates inside that span."
            )
        sl = slice(int(idx[0]), int(idx[-1]) + 1)
        return dataclasses.replace(
            self, flow=self.flow[sl], timestamps=self.timestamps[sl], observed=self.observed[sl]
        )


def _parse_bound(text: str, is_end: bool) -> np.datetime64:
    """Parse a restrict bound; ends are returned exclusive (date end -> next midnight)."""
    text = text.strip().replace(" ", "T")
    if not re.fullmatch(_STAMP, text):
        raise CityDataError(f"bad date {text!r}: expected 'YYYY-MM-DD' or 'YYYY-MM-DDTHH:MM'.")
    try:
        stamp = np.datetime64(text, "m")
    except ValueError as exc:
        raise CityDataError(f"bad date {text!r}: {exc}.") from exc
    if not is_end:
        return stamp
    step = np.timedelta64(1, "D") if "T" not in text else np.timedelta64(1, "m")
    return stamp + step


def span_of(text: str | None, city: str) -> str | None:
    """The span that applies to ``city``: ``text`` itself, or its ``city=START:END`` entry.

    ``text`` is one span for every city (``"2019-01-01:2019-04-30"``) or comma-separated
    per-city spans (``"nyc_taxi=2019-01-01:2019-04-30,melbourne_pedestrian=2022-01-01:"``);
    a city not named there is used whole. Every span is checked with :func:`parse_span`.
    """
    if text is None or "=" not in text:
        if text is not None:
            parse_span(text)
        return text
    spans: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, span = part.partition("=")
        if not sep or not name.strip():
            raise CityDataError(f"bad per-city span {part!r} in {text!r}: expected "
                                f"'city=START:END' entries separated by commas.")
        parse_span(span)
        spans[name.strip()] = span.strip()
    return spans.get(city)


def parse_span(text: str) -> tuple[str | None, str | None]:
    """Parse ``"START:END"`` (e.g. ``"2019-01-01:2019-12-31"``); either side may be empty.

    Bounds are ``YYYY-MM-DD`` or ``YYYY-MM-DDTHH:MM``; the result feeds :meth:`City.restrict`.
    """
    match = _SPAN_RE.match(text)
    if match is None:
        raise CityDataError(
            f"bad span {text!r}: expected 'START:END' with dates 'YYYY-MM-DD' or "
            f"'YYYY-MM-DDTHH:MM', either side may be empty (e.g. '2019-01-01:2019-12-31', "
            f"'2019-06-01:')."
        )
    start, end = match.group(1), match.group(2)
    for side, is_end in ((start, False), (end, True)):
        if side:
            _parse_bound(side, is_end)  # a real date, e.g. no month 13
    if start and end and _parse_bound(start, False) >= _parse_bound(end, True):
        raise CityDataError(f"bad span {text!r}: start {start} is after end {end}.")
    return start, end


def city_from_arrays(name: str, arrays: Mapping[str, np.ndarray], path: str = "") -> City:
    """Validate a mapping of arrays in the ``.npz`` format and build a :class:`City`.

    Shapes:
        arrays["flow"]: [T, N, C]; arrays["timestamps"]: [T]; optional keys as in DATA.md.
    """
    where = f"city {name!r}" + (f" ({path})" if path else "")
    v.check_required(arrays, where)
    flow = v.check_flow(np.asarray(arrays["flow"]), where)
    t, n, c = flow.shape
    timestamps = v.parse_timestamps(np.asarray(arrays["timestamps"]), t, where)
    poi, poi_categories = v.check_poi(arrays, n, where)
    edge_index, edge_weight = v.check_edges(arrays, n, where)
    adjacency = v.check_matrix(arrays, "adjacency", (n, n), where)
    v.check_nonnegative(adjacency, "adjacency", where)
    v.check_nonnegative(edge_weight, "edge_weight", where)
    return City(
        name=name,
        flow=flow,
        timestamps=timestamps,
        interval_minutes=v.check_interval(timestamps, arrays, where),
        channels=v.check_channel_names(arrays, c, where),
        region_ids=np.asarray(v.check_names(arrays, "region_ids", n, "", where), dtype=str),
        observed=v.check_observed(arrays, (t, n), where),
        coords=v.check_matrix(arrays, "coords", (n, 2), where, dtype=np.float64),
        adjacency=adjacency,
        edge_index=edge_index,
        edge_weight=edge_weight,
        poi=poi,
        poi_categories=poi_categories,
        grid_shape=v.check_grid_shape(arrays, n, where),
        meta=v.check_meta(arrays, META_KEYS, where),
        path=path,
    )


def available_cities(data_dir: str | Path) -> list[str]:
    """Names (file stems) of the ``*.npz`` files in ``data_dir``, sorted."""
    directory = Path(data_dir)
    if not directory.is_dir():
        raise CityNotFoundError(
            f"data directory {str(directory)!r} does not exist; pass the folder holding the "
            f"city .npz files (e.g. data/ or data/tiny/)."
        )
    return sorted(p.stem for p in directory.glob("*.npz") if p.is_file())


def load_city(data_dir: str | Path, name: str) -> City:
    """Load and validate ``data_dir/name.npz`` (``np.load(..., allow_pickle=False)``).

    Raises:
        CityNotFoundError: no such file (the message lists the cities in ``data_dir``).
        CityDataError: the file breaks the format (missing keys, NaN flow, bad shapes, ...).
    """
    path = Path(data_dir) / f"{name}.npz"
    if path.is_dir():
        raise CityDataError(f"city {name!r}: {str(path)!r} is a directory, not a city file; "
                            "rename it or give the folder that holds the .npz files.")
    if not path.is_file():
        names = available_cities(data_dir)
        raise CityNotFoundError(
            f"unknown city {name!r}: no file {str(path)!r}. Cities in {str(data_dir)!r}: "
            f"{', '.join(names) if names else '(none: no .npz files)'}."
        )
    arrays = _read_npz(path, name)
    city = city_from_arrays(name, arrays, str(path))
    logger.debug("loaded city %s: T=%d N=%d C=%d", name, *city.flow.shape)
    return city


def _read_npz(path: Path, name: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` archive, or a :class:`CityDataError` naming the file and
    what it holds instead (empty, damaged, a single ``.npy`` array, pickled objects)."""
    where = f"city {name!r}: {str(path)!r}"
    if path.stat().st_size == 0:
        raise CityDataError(f"{where} is an empty file; write the city with "
                            "np.savez(path, flow=..., timestamps=...).")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CityDataError(
            f"{where} cannot be read as a plain .npz ({exc}); store numeric and unicode arrays "
            f"only (no object arrays / pickles), with np.savez."
        ) from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise CityDataError(
            f"{where} holds a single .npy array of shape {np.shape(loaded)}, not an .npz "
            f"archive of named arrays; save it with np.savez(path, flow=..., timestamps=...)."
        )
    try:
        with loaded as npz:
            return {key: npz[key] for key in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CityDataError(
            f"{where}: an array cannot be read ({exc}); store numeric and unicode arrays only "
            f"(no object arrays / pickles), with np.savez."
        ) from exc


@dataclass
class CityInfo:
    """Summary of one city file, for ``stbat datasets``."""

    name: str
    num_regions: int
    num_steps: int
    num_channels: int
    channels: tuple[str, ...]
    span: tuple[str, str]
    interval_minutes: int
    features: tuple[str, ...]

    @classmethod
    def from_city(cls, city: City, stored_keys: tuple[str, ...] = ()) -> CityInfo:
        """Summarise ``city``; ``observed`` counts as a feature only when it was stored."""
        present = {
            "poi": city.poi is not None, "coords": city.coords is not None,
            "adjacency": city.adjacency is not None, "edge_index": city.edge_index is not None,
            "grid_shape": city.grid_shape is not None, "observed": "observed" in stored_keys,
        }
        return cls(city.name, city.num_regions, city.num_steps, city.num_channels,
                   city.channels, city.span, city.interval_minutes,
                   tuple(k for k in STATIC_FEATURES if present[k]))


def list_cities(data_dir: str | Path) -> list[CityInfo]:
    """Load and summarise every ``*.npz`` city in ``data_dir`` (sorted by name).

    Raises the loading error of the first invalid file (nothing is skipped silently: a
    directory or a broken link named ``*.npz`` is refused by name too).
    """
    available_cities(data_dir)  # refuses a missing folder
    infos = []
    for name in sorted(p.stem for p in Path(data_dir).glob("*.npz")):
        city = load_city(data_dir, name)
        with np.load(city.path, allow_pickle=False) as npz:
            keys = tuple(npz.files)
        infos.append(CityInfo.from_city(city, keys))
    return infos


def format_city_table(infos: list[CityInfo]) -> str:
    """Render :func:`list_cities` output as a markdown table."""
    header = ("| city | N | T | C | channels | interval | span | static features |\n"
              "|---|---|---|---|---|---|---|---|")
    rows = [
        f"| {i.name} | {i.num_regions} | {i.num_steps} | {i.num_channels} | "
        f"{', '.join(i.channels)} | {i.interval_minutes} min | {i.span[0]} .. {i.span[1]} | "
        f"{', '.join(i.features) if i.features else '-'} |"
        for i in infos
    ]
    return "\n".join([header, *rows])
