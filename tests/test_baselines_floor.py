"""The classical floor (persistence, seasonal naive), NLinear, window normalisation and
calendar covariates, each held to a naive twin written as a loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _data_synth import city_arrays, hourly_stamps
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stbat_plugin.data import city_from_arrays
from stbat_plugin.data.covariates import time_features
from stbat_plugin.network import NLinear, PredictionNetwork, window_norm
from stbat_plugin.pipeline.classical import BaselineError, persistence, seasonal_naive


def _city(flow: np.ndarray, observed: np.ndarray | None = None):
    arrays_ = city_arrays(flow=flow.astype(np.float32), timestamps=hourly_stamps(flow.shape[0]))
    if observed is not None:
        arrays_["observed"] = observed
        arrays_["flow"] = np.where(observed[..., None], arrays_["flow"], 0).astype(np.float32)
    return city_from_arrays("toy", arrays_)


def _naive_lagged(flow: np.ndarray, observed: np.ndarray, start: int, stop: int, lag: int):
    """Loop twin: the latest observed value at or before t - lag (0 if none)."""
    t_, n, c = flow.shape
    out = np.zeros((stop - start, n, c))
    for i, t in enumerate(range(start, stop)):
        for r in range(n):
            for s in range(t - lag, -1, -1):
                if observed[s, r]:
                    out[i, r] = flow[s, r]
                    break
    return out


@settings(max_examples=25, deadline=None)
@given(arrays(np.float32, (30, 3, 2), elements=st.floats(0, 100, width=32)),
       arrays(bool, (30, 3)), st.integers(1, 5), st.integers(24, 30))
def test_persistence_and_seasonal_match_their_loop_twins(flow, observed, start, stop):
    city = _city(flow, observed)
    got = persistence(city, slice(start, stop))
    want = _naive_lagged(city.flow, city.observed, start, stop, 1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for lag in range(1, start + 1):
        got = seasonal_naive(city, slice(start, stop), lag)
        np.testing.assert_allclose(got, _naive_lagged(city.flow, city.observed, start, stop, lag))


def test_seasonal_needs_history_before_the_evaluation_slice():
    city = _city(np.ones((48, 2, 1)))
    with pytest.raises(BaselineError, match="24 step"):
        seasonal_naive(city, slice(10, 48), 24)
    with pytest.raises(BaselineError, match="lag must be"):
        seasonal_naive(city, slice(30, 48), 0)
    with pytest.raises(BaselineError, match="history"):
        persistence(city, slice(0, 48))


def test_seasonal_is_exact_on_a_daily_periodic_series():
    t = np.arange(24 * 5)
    flow = (10 + 5 * np.sin(2 * np.pi * t / 24))[:, None, None] * np.ones((1, 3, 1))
    city = _city(flow)
    np.testing.assert_allclose(seasonal_naive(city, slice(48, 120), 24), city.flow[48:120],
                               rtol=1e-5)


def test_time_features_follow_the_local_clock():
    stamps = np.array(["2021-03-01T00:00", "2021-03-01T06:00", "2021-03-07T12:00",
                       "2021-03-08T00:00"], dtype="datetime64[m]")  # Monday 2021-03-01
    f = time_features(stamps)
    assert f.shape == (4, 4) and f.dtype == np.float32
    np.testing.assert_allclose(f[0], [0, 1, 0, 1], atol=1e-6)  # Monday midnight
    np.testing.assert_allclose(f[1, :2], [1, 0], atol=1e-6)  # 06:00 = a quarter of the day
    np.testing.assert_allclose(f[3], f[0], atol=1e-5)  # one week later
    angle = 2 * np.pi * (6 * 1440 + 720) / (7 * 1440)  # Sunday noon
    np.testing.assert_allclose(f[2], [0, -1, np.sin(angle), np.cos(angle)], atol=1e-5)


@pytest.mark.parametrize("mode", ["none", "revin", "last", "revin-last"])
def test_window_norm_matches_a_loop(mode):
    torch.manual_seed(0)
    x = torch.rand(2, 5, 3, 1, dtype=torch.float64)
    offset, scale = window_norm(x, mode)
    for b in range(2):
        for n in range(3):
            series = x[b, :, n, 0]
            mean = sum(series) / len(series)
            std = (sum((v - mean) ** 2 for v in series) / len(series) + 1e-5) ** 0.5
            want = {"none": (0.0, 1.0), "revin": (mean, std), "last": (series[-1], 1.0),
                    "revin-last": (series[-1], std)}[mode]
            assert float(offset[b, 0, n, 0]) == pytest.approx(float(want[0]))
            assert float(scale[b, 0, n, 0]) == pytest.approx(float(want[1]))


class _Mean(torch.nn.Module):
    """A toy extractor: features = [time means of the first and last input channel, 1]."""

    feature_dim = 3

    def forward_features(self, x, **graph):
        m = x.mean(1)
        return torch.cat([m[..., :1], m[..., -1:], torch.ones_like(m[..., :1])], dim=-1)


@pytest.mark.parametrize("mode", ["revin", "revin-last"])
def test_normalised_network_is_scale_equivariant_and_leaves_covariates_alone(mode):
    torch.manual_seed(0)
    net = PredictionNetwork(_Mean(), normalize=mode).double()
    x = torch.rand(4, 6, 5, 2, dtype=torch.float64)
    scaled = x.clone()
    scaled[..., 0] = 7 * x[..., 0] + 3  # affine change of the series, covariate kept
    # exact up to the variance floor EPS = 1e-5 of RevIN
    torch.testing.assert_close(net(scaled), 7 * net(x) + 3, rtol=1e-3, atol=1e-3)
    pred, z = net.forward_with_features(x)
    torch.testing.assert_close(net.forward_features(x), z)
    # the covariate channel reaches the features unnormalised
    assert torch.allclose(z[..., 1], x[..., 1].mean(1))
    assert not torch.allclose(z[..., 0], x[..., 0].mean(1))  # the series is normalised


def test_residual_heads_start_as_persistence():
    x = torch.rand(3, 6, 4, 1)
    for mode in ("last", "revin-last"):
        net = PredictionNetwork(_Mean(), normalize=mode)
        torch.testing.assert_close(net(x), x[:, -1:])
    torch.testing.assert_close(NLinear(6)(x), x[:, -1:])


def test_nlinear_matches_its_formula_and_checks_the_window():
    torch.manual_seed(0)
    net = NLinear(4, horizon=2).double()
    torch.nn.init.normal_(net.linear.weight)
    torch.nn.init.normal_(net.linear.bias)
    x = torch.rand(2, 4, 3, 2, dtype=torch.float64)  # channel 1 is a covariate: ignored
    out = net(x, edge_index=None)
    assert out.shape == (2, 2, 3, 1)
    for b in range(2):
        for n in range(3):
            v = x[b, :, n, 0]
            for s in range(2):
                want = v[-1] + sum(net.linear.weight[s, k] * (v[k] - v[-1]) for k in range(4)) \
                    + net.linear.bias[s]
                assert float(out[b, s, n, 0]) == pytest.approx(float(want.detach()))
    with pytest.raises(ValueError, match="t = 4"):
        net(torch.rand(2, 5, 3, 1, dtype=torch.float64))


def test_unknown_normalisation_is_refused():
    with pytest.raises(ValueError, match="normalize"):
        PredictionNetwork(_Mean(), normalize="batch")


def test_unobserved_history_is_skipped_by_persistence():
    flow = np.arange(10, dtype=np.float32)[:, None, None] * np.ones((1, 2, 1))
    observed = np.ones((10, 2), bool)
    observed[5:8, 0] = False
    city = _city(flow, observed)
    pred = persistence(city, slice(6, 10))
    assert pred[:, 0, 0].tolist() == [4, 4, 4, 8]  # y[4] until y[8] is observed again
    assert pred[:, 1, 0].tolist() == [5, 6, 7, 8]


def test_linear_skip_is_nlinear_plus_the_deep_head():
    """With the head at zero, revin-last + linear_skip is NLinear on the normalised window."""
    torch.manual_seed(0)
    net = PredictionNetwork(_Mean(), normalize="revin-last", linear_skip=True, window=5).double()
    torch.nn.init.normal_(net.skip.weight)
    x = torch.rand(2, 5, 3, 1, dtype=torch.float64)
    offset, scale = window_norm(x, "revin-last")
    want = offset + scale * torch.einsum("btnc,st->bsnc", (x - offset) / scale, net.skip.weight)
    torch.testing.assert_close(net(x), want + scale * net.skip.bias.view(1, -1, 1, 1))
    torch.nn.init.normal_(net.head[-1].weight)  # the deep part adds to it
    assert not torch.allclose(net(x), want + scale * net.skip.bias.view(1, -1, 1, 1))
    with pytest.raises(ValueError, match="t = 5"):
        net(torch.rand(2, 6, 3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="window"):
        PredictionNetwork(_Mean(), linear_skip=True)
