"""Scalers: round trips, training-only fitting, masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stbat_plugin.data import MinMaxScaler, ScalerError, StandardScaler, make_scaler
from stbat_plugin.data.scalers import Log1pScaler, Scaler


def _stats(scaler: Scaler) -> tuple[list[float], list[float]]:
    """What a fit learned: the per-channel offset and scale."""
    assert scaler.offset is not None and scaler.scale is not None
    return scaler.offset.tolist(), scaler.scale.tolist()


FLOWS = arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(1, 5), st.integers(1, 3)),
               elements=st.floats(0, 1e4, allow_nan=False))


@settings(max_examples=50, deadline=None)
@given(flow=FLOWS, name=st.sampled_from(["minmax", "zscore", "log1p"]))
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


@pytest.mark.parametrize("name", ["minmax", "zscore", "log1p"])
def test_fit_on_training_slice_only(name: str) -> None:
    flow = np.random.default_rng(1).uniform(0, 10, (40, 3, 2))
    train = slice(0, 20)
    before = _stats(make_scaler(name).fit(flow[train]))
    flow[20:] *= 100.0
    assert _stats(make_scaler(name).fit(flow[train])) == before


@pytest.mark.parametrize("name", ["minmax", "zscore", "log1p"])
def test_masked_cells_change_nothing(name: str) -> None:
    flow = np.random.default_rng(2).uniform(0, 10, (20, 3, 2))
    mask = np.ones((20, 3), bool)
    mask[4, 1] = mask[7, 0] = False
    before = _stats(make_scaler(name).fit(flow, mask))
    flow[4, 1] = 1e6
    flow[7, 0] = -5.0
    assert _stats(make_scaler(name).fit(flow, mask)) == before


def test_constant_channel_is_only_shifted() -> None:
    flow = np.ones((10, 2, 1)) * 7.0
    scaler = MinMaxScaler().fit(flow)
    assert scaler.fitted and _stats(scaler) == ([7.0], [1.0])
    np.testing.assert_allclose(scaler.transform(flow), 0.0)
    np.testing.assert_allclose(scaler.inverse_transform(np.zeros((3, 1))), 7.0)


def test_errors() -> None:
    with pytest.raises(ScalerError, match="not fitted"):
        StandardScaler().transform(np.zeros((2, 1)))
    with pytest.raises(ScalerError, match=r"choose one of \['log1p', 'minmax', 'zscore'\]"):
        make_scaler("robust")
    scaler = MinMaxScaler().fit(np.ones((5, 2, 2)))
    with pytest.raises(ScalerError, match="last axis"):
        scaler.transform(np.ones((5, 2, 3)))
    with pytest.raises(ScalerError, match="zero observed cells"):
        MinMaxScaler().fit(np.ones((5, 2, 2)), np.zeros((5, 2), bool))


def _log1p_twin(fit: np.ndarray, mask: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Loop twin of the log1p scaler: per channel, min-max of log(1 + flow) over the observed
    fit cells (a range below 1e-6 counts as 1), applied to ``x``."""
    out = np.zeros_like(x, dtype=np.float64)
    for c in range(fit.shape[2]):
        logs = [math.log1p(fit[t, n, c]) for t in range(fit.shape[0])
                for n in range(fit.shape[1]) if mask[t, n]]
        low, high = min(logs), max(logs)
        scale = high - low if high - low >= 1e-6 else 1.0
        for idx in np.ndindex(x.shape[:-1]):
            out[idx + (c,)] = (math.log1p(x[idx + (c,)]) - low) / scale
    return out


@settings(max_examples=30, deadline=None)
@given(flow=FLOWS, data=st.data())
def test_log1p_matches_its_loop_twin_and_inverts_with_expm1(flow: np.ndarray, data) -> None:
    mask = data.draw(arrays(bool, flow.shape[:2]))
    mask[0, 0] = True  # at least one observed cell
    scaler = make_scaler("log1p").fit(flow, mask)
    assert isinstance(scaler, Log1pScaler) and not scaler.affine and scaler.requires_nonnegative
    np.testing.assert_allclose(scaler.transform(flow), _log1p_twin(flow, mask, flow),
                               rtol=1e-9, atol=1e-9)
    z = data.draw(arrays(np.float64, (4, flow.shape[2]), elements=st.floats(-2, 2)))
    want = np.expm1(z * scaler.scale + scaler.offset)  # the inverse of the min-max of the logs
    np.testing.assert_allclose(scaler.inverse_transform(z), want, rtol=1e-12)


def test_log1p_is_not_affine_and_maps_the_fit_range_to_unit_interval() -> None:
    flow = np.random.default_rng(3).uniform(0, 1000, (50, 4, 2))
    scaler = make_scaler("log1p").fit(flow)
    scaled = scaler.transform(flow)
    np.testing.assert_allclose(scaled.min(axis=(0, 1)), 0.0, atol=1e-12)
    np.testing.assert_allclose(scaled.max(axis=(0, 1)), 1.0, atol=1e-12)
    x = np.array([[0.0, 0.0], [10.0, 10.0], [20.0, 20.0]])
    y = scaler.transform(x)
    assert abs((y[1] - y[0]) - (y[2] - y[1])).min() > 1e-3  # equal steps, unequal images
    assert MinMaxScaler.affine and StandardScaler.affine


def test_log1p_refuses_negative_flow_naming_the_channel_and_the_fix() -> None:
    flow = np.ones((6, 2, 3))
    flow[2, 1, 2] = -4.0
    with pytest.raises(ScalerError, match=r"channel 2 of the fit data.*--scaler minmax or zscore"):
        make_scaler("log1p").fit(flow)
    mask = np.ones((6, 2), bool)
    mask[2, 1] = False  # an unobserved negative cell does not enter the fit ...
    scaler = make_scaler("log1p").fit(flow, mask)
    with pytest.raises(ScalerError, match=r"channel 2 of the data to transform"):
        scaler.transform(flow)  # ... but it cannot be transformed
    with pytest.raises(ScalerError, match="channel 0"):
        scaler.transform(-torch.ones(3, 3))
