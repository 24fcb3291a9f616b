"""Region descriptors: POI distributions and the temporal-profile fallback."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from _data_synth import TINY, city_arrays

from stbat_plugin.data import (
    CityDataError,
    city_from_arrays,
    load_city,
    poi_descriptors,
    region_descriptors,
    temporal_profile_descriptors,
)


def _rows_are_distributions(values: np.ndarray) -> None:
    assert values.dtype == np.float32 and (values >= 0).all()
    np.testing.assert_allclose(values.sum(axis=1), 1.0, atol=1e-5)


def test_poi_rows_sum_to_one_and_zero_rows_uniform() -> None:
    city = load_city(TINY, "nyc_bike")
    desc = poi_descriptors(city)
    assert desc.kind == "poi" and desc.values.shape == (69, 14) and len(desc.names) == 14
    _rows_are_distributions(desc.values)
    poi = np.ones((4, 3), np.float32)
    poi[2] = 0
    zero = poi_descriptors(city_from_arrays("z", city_arrays(poi=poi)))
    np.testing.assert_allclose(zero.values[2], 1 / 3)


def test_temporal_profile_shape_and_sums() -> None:
    city = load_city(TINY, "melbourne_pedestrian")
    desc = temporal_profile_descriptors(city, train_stop=72)
    assert desc.kind == "temporal_profile" and desc.values.shape == (55, 31)
    _rows_are_distributions(desc.values)
    np.testing.assert_allclose(desc.values[:, :24].sum(axis=1), 0.5, atol=1e-5)
    # 3 days starting on a Monday: only Mon-Wed bins are non-zero for regions with flow.
    active = (city.flow[:72, :, 0] * city.observed[:72]).sum(axis=0) > 0
    assert (desc.values[active, 27:] == 0).all() and (desc.values[active, 24] > 0).all()


def test_temporal_profile_ignores_data_after_train_stop() -> None:
    city = load_city(TINY, "nyc_taxi")
    before = temporal_profile_descriptors(city, train_stop=100)
    flow = city.flow.copy()
    flow[100:] = np.random.default_rng(0).uniform(0, 1000, flow[100:].shape)
    after = temporal_profile_descriptors(dataclasses.replace(city, flow=flow), train_stop=100)
    np.testing.assert_array_equal(before.values, after.values)
    window = temporal_profile_descriptors(city, train_stop=100, train_start=50)
    assert not np.array_equal(window.values, before.values)


def test_temporal_profile_ignores_unobserved_cells_and_empty_regions() -> None:
    flow = np.ones((48, 3, 1), np.float32)
    flow[:, 1] = 0
    observed = np.ones((48, 3), bool)
    observed[5, 0] = False
    flow[5, 0] = 0  # a missing reading, stored as 0: must not lower hour 5's mean
    desc = temporal_profile_descriptors(
        city_from_arrays("s", city_arrays(flow=flow, observed=observed)), train_stop=48)
    np.testing.assert_allclose(desc.values[0, :24], 1 / 48, rtol=1e-6)
    # no flow: uniform within each part, which keeps each part's mass at 1/2
    np.testing.assert_allclose(desc.values[1, :24], 1 / 48, rtol=1e-6)
    np.testing.assert_allclose(desc.values[1, 24:], 1 / 14, rtol=1e-6)


def test_temporal_profile_any_interval() -> None:
    from _data_synth import hourly_stamps

    arrays = city_arrays(num_steps=96 * 2, timestamps=hourly_stamps(96 * 2, minutes=15))
    desc = temporal_profile_descriptors(city_from_arrays("q", arrays), train_stop=96)
    _rows_are_distributions(desc.values)
    assert (desc.values[:, :24] > 0).all()


def test_auto_picks_poi_or_profile() -> None:
    nyc, mel = load_city(TINY, "nyc_bike"), load_city(TINY, "melbourne_pedestrian")
    grid = load_city(TINY, "nyc_bike_grid2014")
    descs, kind = region_descriptors([nyc, mel], [72, 72])
    assert kind == "poi" and [d.values.shape for d in descs] == [(69, 14), (55, 14)]
    descs, kind = region_descriptors([nyc, grid], [72, slice(100, 172)])
    assert kind == "temporal_profile" and {d.values.shape[1] for d in descs} == {31}
    with pytest.raises(CityDataError, match="'nyc_bike_grid2014' has no POI"):
        region_descriptors([nyc, grid], [72, 72], kind="poi")
    other = city_from_arrays("other", city_arrays(poi=np.ones((4, 3), np.float32)))
    assert region_descriptors([nyc, other], [72, 24])[1] == "temporal_profile"
    with pytest.raises(CityDataError, match="unknown descriptor kind"):
        region_descriptors([nyc], [72], kind="graph")


# ------------------------------------------------------------------ the shared helpers
def test_clock_matches_python_datetime() -> None:
    import datetime as dt

    from stbat_plugin.data.covariates import clock

    stamps = np.datetime64("1969-12-29T22:15") + np.arange(0, 60 * 24 * 9, 97) * np.timedelta64(
        1, "m")
    minute, weekday = clock(stamps)
    for s, m, d in zip(stamps.astype(object), minute, weekday, strict=True):
        assert isinstance(s, dt.datetime)
        assert m == s.hour * 60 + s.minute and d == s.weekday()


@pytest.mark.parametrize("trailing", [(), (3,)])
def test_masked_bin_means_match_a_loop(trailing: tuple[int, ...]) -> None:
    from stbat_plugin.data.descriptors import masked_bin_means

    rng = np.random.default_rng(4)
    values = rng.uniform(0, 10, (40, 5) + trailing)
    observed = rng.random((40, 5)) < 0.6
    bins = rng.integers(0, 7, 40)
    bins[bins == 6] = 5  # bin 6 stays empty
    means, counts = masked_bin_means(values, observed, bins, 7)
    assert means.shape == (7, 5) + trailing and counts.shape == (7, 5)
    for k in range(7):
        for n in range(5):
            rows = [t for t in range(40) if bins[t] == k and observed[t, n]]
            assert counts[k, n] == len(rows)
            want = np.mean([values[t, n] for t in rows], axis=0) if rows else 0.0
            np.testing.assert_allclose(means[k, n], want, rtol=1e-12)


def test_masked_bin_means_refuses_mismatched_shapes_and_bins() -> None:
    from stbat_plugin.data.descriptors import masked_bin_means

    values, observed = np.ones((6, 2)), np.ones((6, 2), bool)
    with pytest.raises(ValueError, match=r"Expected values \[T, N, \.\.\.\].*\(5,\)"):
        masked_bin_means(values, observed, np.zeros(5, int), 3)
    with pytest.raises(ValueError, match=r"Expected bins in \[0, 3\) \(got 0 \.\. 3\)"):
        masked_bin_means(values, observed, np.array([0, 1, 2, 3, 0, 0]), 3)


def test_descriptor_rows_are_the_wrappers_normalisation() -> None:
    import torch

    from stbat_plugin.riam import normalize_descriptors

    city = load_city(TINY, "nyc_taxi")
    assert city.poi is not None
    want = normalize_descriptors(torch.as_tensor(city.poi, dtype=torch.float64)).float().numpy()
    np.testing.assert_array_equal(poi_descriptors(city).values, want)
    with pytest.raises(ValueError, match="non-negative"):
        poi_descriptors(dataclasses.replace(city, poi=-city.poi))


def test_mean_flow_matches_a_loop_and_is_nan_where_never_observed() -> None:
    flow = np.random.default_rng(5).uniform(0, 9, (30, 4, 2)).astype(np.float32)
    observed = np.random.default_rng(6).random((30, 4)) < 0.7
    observed[:, 3] = False
    city = city_from_arrays("m", city_arrays(num_steps=30, flow=flow, observed=observed))
    got = city.mean_flow(slice(5, 25))
    for n in range(3):
        rows = [flow[t, n].astype(np.float64).sum() for t in range(5, 25) if observed[t, n]]
        np.testing.assert_allclose(got[n], np.mean(rows), rtol=1e-12)
    assert np.isnan(got[3]) and np.isnan(city.mean_flow()[3])


def test_region_descriptors_names_what_it_returns() -> None:
    nyc, mel = load_city(TINY, "nyc_bike"), load_city(TINY, "melbourne_pedestrian")
    found = region_descriptors([nyc, mel], [72, 72], kind="temporal_profile")
    assert found.kind == "temporal_profile"
    assert [d.kind for d in found.descriptors] == ["temporal_profile"] * 2
    descs, kind = found  # still unpacks as (descriptors, kind)
    assert descs is found.descriptors and kind == found.kind
