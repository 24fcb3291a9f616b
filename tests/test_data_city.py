"""Loading, validating, restricting and listing city files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _data_synth import TINY, TINY_NAMES, hourly_stamps, write_city

from stbat_plugin.data import (
    CityDataError,
    CityNotFoundError,
    city_from_arrays,
    format_city_table,
    list_cities,
    load_city,
    parse_span,
)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_every_tiny_file_loads(name: str) -> None:
    city = load_city(TINY, name)
    t, n, c = city.flow.shape
    assert city.flow.dtype == np.float32
    assert city.timestamps.dtype == np.dtype("datetime64[m]") and city.timestamps.shape == (t,)
    assert city.observed.shape == (t, n) and city.observed.dtype == bool
    assert len(city.channels) == c and city.region_ids.shape == (n,)
    assert city.interval_minutes == 60
    assert city.meta["timezone"]
    assert city.path.endswith(f"{name}.npz")


def test_static_features_as_documented() -> None:
    bike = load_city(TINY, "nyc_bike")
    assert bike.has_poi and bike.poi is not None and bike.poi.shape == (69, 14)
    assert bike.adjacency is not None and bike.coords is not None
    assert bike.channels == ("pickup", "dropoff") and bike.observed.all()
    grid = load_city(TINY, "nyc_bike_grid2014")
    assert grid.grid_shape == (16, 8) and not grid.has_poi and grid.coords is None
    mel = load_city(TINY, "melbourne_pedestrian")
    assert not mel.observed.all() and mel.span == ("2022-03-07T00:00", "2022-04-03T23:00")


def test_defaults_for_optional_keys(tmp_path: Path) -> None:
    write_city(tmp_path, "mini", num_steps=10, num_regions=3, num_channels=2)
    city = load_city(tmp_path, "mini")
    assert city.channels == ("ch0", "ch1")
    assert city.region_ids.tolist() == ["0", "1", "2"]
    assert city.interval_minutes == 60 and city.observed.all()
    assert city.poi is None and city.grid_shape is None and city.meta == {}


def test_unknown_city_lists_available(tmp_path: Path) -> None:
    with pytest.raises(CityNotFoundError, match="melbourne_pedestrian.*nyc_bike"):
        load_city(TINY, "chicago")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_city(tmp_path / "nowhere", "x")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"flow": None}, r"missing required key\(s\) \['flow'\]"),
        ({"flow": None, "timestamps": None}, r"\['flow', 'timestamps'\]"),
        ({"flow": np.zeros((5, 3), np.float32)}, "must be 3-D"),
        ({"flow": np.full((48, 4, 2), -1.0, np.float32)}, "negative"),
        ({"timestamps": hourly_stamps(47)}, r"shape \(48,\)"),
        ({"timestamps": np.array(["x"] * 48)}, "ISO"),
        ({"interval_minutes": np.int64(30)}, "60 min apart"),
        ({"observed": np.ones((48, 5), bool)}, "'observed' must have shape"),
        ({"poi": np.ones((5, 3), np.float32)}, r"N = 4 regions, got \(5, 3\)"),
        ({"grid_shape": np.array([3, 2])}, "H\\*W = 6 cells but flow has N = 4"),
        ({"adjacency": np.ones((4, 3), np.float32)}, "'adjacency' must have shape"),
        ({"edge_index": np.array([[0, 1], [1, 4]])}, r"\[0, 3\]"),
        ({"edge_index": np.array([[0, 1, 2]])}, r"shape \(2, E\)"),
        ({"channels": np.array(["a"])}, "'channels' must have 2 entries"),
        ({"flow": np.ones((1, 4, 2), np.float32), "timestamps": hourly_stamps(1)},
         "single time step"),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path: Path, extra: dict, message: str) -> None:
    write_city(tmp_path, "bad", **extra)
    with pytest.raises(CityDataError, match=message):
        load_city(tmp_path, "bad")


def test_nan_in_flow_reports_count_and_first_index(tmp_path: Path) -> None:
    flow = np.ones((48, 4, 2), np.float32)
    flow[5, 2, 1] = np.nan
    flow[7, 0, 0] = np.inf
    write_city(tmp_path, "nan", flow=flow)
    with pytest.raises(CityDataError, match=r"2 NaN/inf cell\(s\), first at .* \(5, 2, 1\)"):
        load_city(tmp_path, "nan")


def test_irregular_timestamps(tmp_path: Path) -> None:
    stamps = hourly_stamps(48)
    stamps[10] = "2021-03-01T10:30"
    write_city(tmp_path, "irr", timestamps=stamps)
    with pytest.raises(CityDataError, match="constant step; first irregular step at index 10"):
        load_city(tmp_path, "irr")


def test_interval_from_spacing(tmp_path: Path) -> None:
    write_city(tmp_path, "q", timestamps=hourly_stamps(48, minutes=15))
    assert load_city(tmp_path, "q").interval_minutes == 15


def test_restrict_whole_days_and_exact_times() -> None:
    city = load_city(TINY, "nyc_bike")
    day = city.restrict("2019-03-05", "2019-03-06")
    assert day.num_steps == 48 and day.span == ("2019-03-05T00:00", "2019-03-06T23:00")
    assert day.flow.shape == (48, 69, 2) and day.observed.shape == (48, 69)
    exact = city.restrict("2019-03-05T10:00", "2019-03-05T12:00")
    assert exact.num_steps == 3
    assert city.restrict(None, None).num_steps == city.num_steps
    with pytest.raises(CityDataError, match="2019-03-04T00:00 .. 2019-03-31T23:00"):
        city.restrict("2020-01-01", None)


def test_parse_span() -> None:
    assert parse_span("2019-01-01:2019-12-31") == ("2019-01-01", "2019-12-31")
    assert parse_span("2019-06-01:") == ("2019-06-01", None)
    assert parse_span(":2019-06-01T12:00") == (None, "2019-06-01T12:00")
    assert parse_span("2019-01-01T05:00:2019-01-02T05:00") == ("2019-01-01T05:00",
                                                              "2019-01-02T05:00")
    for bad in ("2019-01-01", "yesterday:today", "2019-12-31:2019-01-01"):
        with pytest.raises(CityDataError, match="bad span"):
            parse_span(bad)


def test_list_cities_and_table() -> None:
    infos = list_cities(TINY)
    assert [i.name for i in infos] == sorted(TINY_NAMES)
    by_name = {i.name: i for i in infos}
    assert by_name["melbourne_pedestrian"].features == ("poi", "coords", "observed")
    assert by_name["nyc_bike_grid2014"].features == ("adjacency", "grid_shape")
    assert by_name["nyc_bike"].num_regions == 69 and by_name["nyc_bike"].num_steps == 672
    table = format_city_table(infos).splitlines()
    assert table[0].startswith("| city |") and len(table) == 2 + len(TINY_NAMES)


def test_city_from_arrays_matches_load() -> None:
    with np.load(TINY / "nyc_taxi.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    city = city_from_arrays("nyc_taxi", arrays)
    assert np.array_equal(city.flow, load_city(TINY, "nyc_taxi").flow)


def test_span_of_takes_one_span_or_per_city_spans():
    from stbat_plugin.data import CityDataError, span_of

    assert span_of(None, "a") is None
    assert span_of("2019-01-01:2019-02-01", "a") == "2019-01-01:2019-02-01"
    spans = "a=2019-01-01:2019-02-01, b=2022-01-01:"
    assert span_of(spans, "a") == "2019-01-01:2019-02-01"
    assert span_of(spans, "b") == "2022-01-01:"
    assert span_of(spans, "c") is None  # not named: the whole series
    for bad in ("a=2019-13-45:", "=2019-01-01:", "a=2019", "2019-01-01"):
        with pytest.raises(CityDataError):
            span_of(bad, "a")


@pytest.mark.parametrize("names", [["mean"], ["a", "a"], [" "]])
def test_reserved_duplicate_or_empty_channel_names_are_refused(names):
    from _data_synth import city_arrays, hourly_stamps

    from stbat_plugin.data import CityDataError, city_from_arrays

    c = len(names)
    arrays = city_arrays(flow=np.ones((48, 3, c), np.float32), timestamps=hourly_stamps(48),
                         channels=np.array(names))
    with pytest.raises(CityDataError, match="'mean'"):
        city_from_arrays("x", arrays)
