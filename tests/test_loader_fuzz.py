"""Hypothesis fuzzing of the city loader: every file is accepted and usable, or refused.

City files are generated from a valid one by random mutations: keys dropped or added,
dtypes and shapes changed, NaN / inf / negative / huge values written in, timestamps
shuffled or re-spaced, whole files replaced by something that is not an ``.npz``. Each must
either load into a :class:`City` that satisfies the documented invariants and run (a target
task is built, HA and persistence forecast its test days, and every metric is finite), or be
refused with :class:`CityDataError` / :class:`CityNotFoundError` at load, or with a
``ValueError`` naming the problem when the task is built: never another exception, never NaN
in a loaded city or in a metric.

Each case is counted by outcome (``tests/_fuzz_tally.py``); the counts are printed at the end
of the pytest session.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from _data_synth import city_arrays, hourly_stamps
from _fuzz_tally import record, refused
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stbat_plugin.data import load_city
from stbat_plugin.data.city import CityNotFoundError
from stbat_plugin.data.validation import CityDataError
from stbat_plugin.pipeline.api import evaluate_forecast
from stbat_plugin.pipeline.config import TransferConfig
from stbat_plugin.pipeline.method_registry import get_method
from stbat_plugin.pipeline.tasks import target_task

SUITE = "loader"
KEYS = ("flow", "timestamps", "observed", "coords", "adjacency", "edge_index", "edge_weight",
        "poi", "poi_categories", "grid_shape", "channels", "region_ids", "interval_minutes",
        "city", "units")
T, N, C = 24 * 9, 4, 2


def _base() -> dict[str, np.ndarray]:
    ring = np.arange(N)
    return city_arrays(
        num_steps=T, num_regions=N, num_channels=C,
        observed=np.ones((T, N), bool), coords=np.random.default_rng(0).random((N, 2)),
        adjacency=(np.abs(ring[:, None] - ring[None]) == 1).astype(np.float32),
        edge_index=np.stack([ring, (ring + 1) % N]), edge_weight=np.ones(N, np.float32),
        poi=np.ones((N, 3), np.float32), poi_categories=np.array(["a", "b", "c"]),
        grid_shape=np.array([2, 2]), channels=np.array(["in", "out"]),
        region_ids=np.array([f"r{i}" for i in range(N)]), interval_minutes=np.array(60),
        city=np.array("fuzz town"), units=np.array("trips"))


WEIRD_VALUES = st.sampled_from([np.nan, np.inf, -np.inf, -1.0, 0.0, 1e30, 1e-30, 7.5, 2**40])
WEIRD_DTYPES = st.sampled_from(["float64", "float16", "int8", "int64", "uint8", "bool", "U3",
                                "complex64", "datetime64[m]"])


@st.composite
def mutation(draw, arrays: dict) -> tuple[str, str]:
    key = draw(st.sampled_from(KEYS))
    kind = draw(st.sampled_from(["drop", "dtype", "shape", "value", "scalar", "empty",
                                 "transpose", "stamps", "unobserved", "short"]))
    if kind == "drop":
        arrays.pop(key, None)
    elif kind == "dtype" and key in arrays:
        try:
            with warnings.catch_warnings():  # NaN / inf / complex cast to integers or reals
                warnings.simplefilter("ignore")
                arrays[key] = np.asarray(arrays[key]).astype(draw(WEIRD_DTYPES))
        except (ValueError, TypeError, OverflowError):
            arrays[key] = np.array(["not", "numbers"])
    elif kind == "shape" and key in arrays:
        a = np.asarray(arrays[key])
        arrays[key] = np.concatenate([a, a[:1]]) if a.ndim and a.shape[0] else a.reshape(-1)[:0]
    elif kind == "value" and key in arrays and np.asarray(arrays[key]).dtype.kind in "fiub":
        a = np.asarray(arrays[key]).astype(np.float64)
        if a.size:
            a.reshape(-1)[draw(st.integers(0, a.size - 1))] = draw(WEIRD_VALUES)
        arrays[key] = a
    elif kind == "scalar":
        arrays[key] = np.array(draw(st.sampled_from([0, -3, 7, "x"])))
    elif kind == "empty":
        arrays[key] = np.zeros((0,) * max(1, np.asarray(arrays.get(key, 0)).ndim))
    elif kind == "transpose" and key in arrays:
        arrays[key] = np.asarray(arrays[key]).T
    elif kind == "stamps":
        minutes = draw(st.sampled_from([7, 45, 60, 90, 1440, -60, 0]))
        stamps = hourly_stamps(T, minutes=minutes) if minutes > 0 else hourly_stamps(T)[::-1]
        if draw(st.booleans()):
            stamps = stamps.copy()
            stamps[draw(st.integers(0, T - 1))] = draw(st.sampled_from(["", "nope", "2021-13-01"]))
        arrays["timestamps"] = stamps
    elif kind == "unobserved":  # whole days (or regions) never observed: e.g. the test days
        observed = np.asarray(arrays.get("observed", np.ones((T, N), bool)))
        observed = observed.copy() if observed.shape == (T, N) else np.ones((T, N), bool)
        first, days = draw(st.integers(0, 8)), draw(st.integers(1, 9))
        observed[24 * first:24 * (first + days)] = False
        if draw(st.booleans()):
            observed[:, draw(st.integers(0, N - 1))] = False
        arrays["observed"] = observed
    elif kind == "short":  # fewer days than the splits need
        keep = 24 * draw(st.sampled_from([1, 2, 5, 6, 7]))
        for name in ("flow", "timestamps", "observed"):
            value = np.asarray(arrays.get(name, ()))
            if value.ndim and value.shape[0] == T:
                arrays[name] = value[:keep]
    return key, kind


def _check_loaded(city) -> None:
    assert city.flow.dtype == np.float32 and np.isfinite(city.flow).all() and (city.flow >= 0).all()
    assert city.observed.shape == city.flow.shape[:2] and city.observed.dtype == bool
    assert (24 * 60) % city.interval_minutes == 0
    for name in ("adjacency", "edge_weight", "poi"):
        value = getattr(city, name)
        assert value is None or (np.isfinite(value).all() and (value >= 0).all())
    assert len(set(city.channels)) == city.num_channels


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), count=st.integers(1, 3))
def test_mutated_city_files_load_or_are_refused(data, count):
    arrays = _base()
    kinds = [data.draw(mutation(arrays)) for _ in range(count)]
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "fuzz.npz", **arrays)
        try:
            city = load_city(tmp, "fuzz")
        except (CityDataError, CityNotFoundError) as err:
            assert str(err) and "fuzz" in str(err), err  # names the city / file
            record(SUITE, refused(err, "at load"))
            return
        _check_loaded(city)
        config = TransferConfig(window=6, val_days=2, test_days=2)
        try:
            task = target_task(city, 3, config)
        except ValueError as err:  # e.g. too few days, no observed cell: a clear refusal
            assert str(err) and "fuzz" in str(err), (kinds, err)
            record(SUITE, refused(err, "when the task is built"))
            return
        for method in ("ha", "persistence"):  # runs, and every metric is finite (or it raises)
            forecast = get_method(method).adapt(None, task, config, 0, None, False)
            evaluate_forecast(forecast, list(city.channels), f"{method} on a fuzzed city {kinds}")
        record(SUITE, "accepted and ran")


@settings(max_examples=40, deadline=None)
@given(content=st.sampled_from([b"", b"PK\x03\x04garbage", b"\x93NUMPY", b"plain text\n"]),
       extra=st.binary(max_size=64))
def test_files_that_are_not_npz_archives_are_refused(content, extra):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "fuzz.npz").write_bytes(content + extra if content else b"")
        with pytest.raises(CityDataError, match="fuzz") as err:
            load_city(tmp, "fuzz")
        record(SUITE, refused(err.value, "at load (not an .npz archive)"))


def test_npy_renamed_and_directory_named_npz_are_refused(tmp_path):
    np.save(tmp_path / "arr.npy", np.zeros(3))
    (tmp_path / "arr.npy").rename(tmp_path / "renamed.npz")
    with pytest.raises(CityDataError, match="single .npy array"):
        load_city(tmp_path, "renamed")
    (tmp_path / "folder.npz").mkdir()
    with pytest.raises(CityDataError, match="is a directory"):
        load_city(tmp_path, "folder")


@pytest.mark.parametrize("extra, words", [
    ({"adjacency": -np.ones((4, 4), np.float32)}, ["adjacency", "negative"]),
    ({"edge_index": np.array([[0, 1], [1, 2]]), "edge_weight": np.array([1.0, -2.0])},
     ["edge_weight", "negative"]),
    ({"timestamps": hourly_stamps(48, minutes=7)}, ["7 min", "divide a day"]),
    ({"city": np.array(["a", "b"])}, ["metadata 'city'"]),
    ({"flow": np.zeros((0, 4, 2), np.float32), "timestamps": hourly_stamps(0)}, ["empty"]),
])
def test_loader_gaps_are_refused_with_the_key_and_the_fix(tmp_path, extra, words):
    np.savez(tmp_path / "c.npz", **city_arrays(num_steps=48, **extra))
    with pytest.raises(CityDataError) as err:
        load_city(tmp_path, "c")
    for word in words:
        assert word in str(err.value)


def test_a_city_with_zero_steps_is_a_clear_error_in_datasets(tmp_path):
    from _cli_helpers import run_cli

    np.savez(tmp_path / "c.npz", flow=np.zeros((0, 3, 1), np.float32),
             timestamps=hourly_stamps(0))
    code, _, err = run_cli(["datasets", "--data-dir", tmp_path])
    assert code == 2 and "empty" in err and "Traceback" not in err
