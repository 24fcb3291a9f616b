"""Chronological splits (property tests) and the valid-region mask."""

from __future__ import annotations

import numpy as np
import pytest
from _data_synth import TINY, city_arrays
from hypothesis import given, settings
from hypothesis import strategies as st

from stbat_plugin.data import (
    SplitError,
    city_from_arrays,
    load_city,
    source_split,
    steps_per_day,
    target_split,
    valid_region_mask,
)


def _indices(sl: slice | None, n: int) -> range:
    assert sl is not None
    return range(*sl.indices(n))


@settings(max_examples=40, deadline=None)
@given(num_steps=st.integers(2, 5000), train=st.integers(1, 5), val=st.integers(1, 5))
def test_source_split_properties(num_steps: int, train: int, val: int) -> None:
    split = source_split(num_steps, train, val)
    tr, va = _indices(split.train, num_steps), _indices(split.val, num_steps)
    assert split.test is None and tr.start == 0 and va.stop == num_steps
    assert len(tr) >= 1 and len(va) >= 1 and tr.stop == va.start
    assert abs(len(tr) - num_steps * train / (train + val)) <= 1


@settings(max_examples=60, deadline=None)
@given(spd=st.sampled_from([1, 24, 48, 96]), train_days=st.integers(0, 10),
       val_days=st.integers(1, 10), test_days=st.integers(1, 10), slack=st.integers(0, 500))
def test_target_split_properties(spd: int, train_days: int, val_days: int, test_days: int,
                                 slack: int) -> None:
    num_steps = (train_days + val_days + test_days) * spd + slack
    split = target_split(num_steps, spd, train_days, val_days, test_days)
    tr, va = _indices(split.train, num_steps), _indices(split.val, num_steps)
    te = _indices(split.test, num_steps)
    assert (len(tr), len(va), len(te)) == (train_days * spd, val_days * spd, test_days * spd)
    assert tr.stop == va.start and va.stop == te.start and te.stop == num_steps
    assert not set(tr) & set(va) and not set(va) & set(te)
    if train_days == 0:
        assert len(tr) == 0


@settings(max_examples=60, deadline=None)
@given(spd=st.sampled_from([1, 24, 96]), days=st.integers(2, 60), extra=st.integers(0, 23),
       train_days=st.integers(0, 30), val_days=st.integers(1, 90), test_days=st.integers(1, 90))
def test_too_short_suggests_values_that_fit(spd: int, days: int, extra: int, train_days: int,
                                            val_days: int, test_days: int) -> None:
    num_steps = days * spd + min(extra, spd - 1)
    if (train_days + val_days + test_days) * spd <= num_steps:
        return
    with pytest.raises(SplitError, match=f"has {num_steps / spd:.1f} days") as info:
        target_split(num_steps, spd, train_days, val_days, test_days, name="city")
    suggestion = info.value.suggestion
    assert suggestion is not None
    assert str(suggestion["val_days"]) in str(info.value)
    split = target_split(num_steps, spd, **suggestion)
    assert split.test is not None


def test_too_short_message_example() -> None:
    with pytest.raises(SplitError) as info:
        target_split(600, 24, 3, 60, 60, name="city")
    assert "city has 25.0 days" in str(info.value)
    assert "with train_days=3 try --val-days 11 --test-days 11" in str(info.value)
    with pytest.raises(SplitError, match="at least 2 whole days"):
        target_split(30, 24, 0, 1, 1)


def test_bad_arguments() -> None:
    with pytest.raises(SplitError, match="val_days >= 1"):
        target_split(1000, 24, 3, 0, 5)
    with pytest.raises(SplitError, match="does not divide a day"):
        steps_per_day(7)
    assert steps_per_day(60) == 24 and steps_per_day(15) == 96


def test_valid_region_mask_nyc_bike() -> None:
    city = load_city(TINY, "nyc_bike")
    mask = valid_region_mask(city, slice(0, 72))
    assert mask.dtype == bool and mask.shape == (69,)
    np.testing.assert_array_equal(mask, city.flow[:72].sum(axis=(0, 2)) > 0)
    # zones without Citi Bike stations are all-zero (DATA.md) and always invalid
    never = city.flow.sum(axis=(0, 2)) == 0
    assert never.sum() >= 5 and not mask[never].any()
    assert valid_region_mask(city, slice(100, 100)).all()


def test_valid_region_mask_uses_observed_training_cells_only() -> None:
    flow = np.zeros((48, 3, 2), np.float32)
    flow[10, 0, 1] = 3.0  # region 0: real flow in training
    flow[5, 1, 0] = 9.0  # region 1: flow only at an unobserved cell
    flow[40, 2, 0] = 1.0  # region 2: flow only after the training slice
    observed = np.ones((48, 3), bool)
    observed[5, 1] = False
    city = city_from_arrays("m", city_arrays(flow=flow, observed=observed))
    assert valid_region_mask(city, slice(0, 24)).tolist() == [True, False, False]
