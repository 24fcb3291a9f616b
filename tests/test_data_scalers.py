"""Scalers: round trips, training-only fitting, masks, persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stbat_plugin.data import MinMaxScaler, ScalerError, StandardScaler, make_scaler
from stbat_plugin.data.scalers import scaler_from_state_dict

FLOWS = arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(1, 5), st.integers(1, 3)),
               elements=st.floats(0, 1e4, allow_nan=False))


@settings(max_examples=50, deadline=None)
@given(flow=FLOWS, name=st.sampled_from(["minmax", "zscore"]))
def test_round_trip(flow: np.ndarray, name: str) -> None:
    scaler = make_scaler(name).fit(flow)
    back = scaler.inverse_transform(scaler.transform(flow))
    np.testing.assert_allclose(back, flow, rtol=1e-9, atol=1e-6)
    tensor = torch.as_tensor(flow, dtype=torch.float32)
    back_t = scaler.inverse_transform(scaler.transform(tensor))
    assert isinstance(back_t, torch.Tensor) and back_t.dtype == torch.float32
    np.testing.assert_allclose(back_t.numpy(), flow, rtol=1e-4, atol=1e-2)


def test_minmax_maps_fit_data_to_unit_interval() -> None:
    flow = np.random.default_rng(0).uniform(3, 50, (30, 4, 2)).astype(np.float32)
    scaled = MinMaxScaler().fit(flow).transform(flow)
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled.min(axis=(0, 1)), 0.0, atol=1e-6)
    np.testing.assert_allclose(scaled.max(axis=(0, 1)), 1.0, atol=1e-6)
    z = StandardScaler().fit(flow).transform(flow)
    np.testing.assert_allclose(z.mean(axis=(0, 1)), 0.0, atol=1e-5)


@pytest.mark.parametrize("name", ["minmax", "zscore"])
def test_fit_on_training_slice_only(name: str) -> None:
    flow = np.random.default_rng(1).uniform(0, 10, (40, 3, 2))
    train = slice(0, 20)
    before = make_scaler(name).fit(flow[train]).state_dict()
    flow[20:] *= 100.0
    assert make_scaler(name).fit(flow[train]).state_dict() == before


@pytest.mark.parametrize("name", ["minmax", "zscore"])
def test_masked_cells_change_nothing(name: str) -> None:
    flow = np.random.default_rng(2).uniform(0, 10, (20, 3, 2))
    mask = np.ones((20, 3), bool)
    mask[4, 1] = mask[7, 0] = False
    before = make_scaler(name).fit(flow, mask).state_dict()
    flow[4, 1] = 1e6
    flow[7, 0] = -5.0
    assert make_scaler(name).fit(flow, mask).state_dict() == before


def test_constant_channel_and_state_dict() -> None:
    flow = np.ones((10, 2, 1)) * 7.0
    scaler = MinMaxScaler().fit(flow)
    np.testing.assert_allclose(scaler.transform(flow), 0.0)
    state = json.loads(json.dumps(scaler.state_dict()))
    again = scaler_from_state_dict(state)
    assert isinstance(again, MinMaxScaler) and again.fitted
    np.testing.assert_allclose(again.inverse_transform(np.zeros((3, 1))), 7.0)


def test_errors() -> None:
    with pytest.raises(ScalerError, match="not fitted"):
        StandardScaler().transform(np.zeros((2, 1)))
    with pytest.raises(ScalerError, match=r"choose one of \['minmax', 'zscore'\]"):
        make_scaler("robust")
    scaler = MinMaxScaler().fit(np.ones((5, 2, 2)))
    with pytest.raises(ScalerError, match="last axis"):
        scaler.transform(np.ones((5, 2, 3)))
    with pytest.raises(ScalerError, match="zero observed cells"):
        MinMaxScaler().fit(np.ones((5, 2, 2)), np.zeros((5, 2), bool))
    with pytest.raises(ScalerError, match="name='zscore'"):
        StandardScaler.from_state_dict(scaler.state_dict())
