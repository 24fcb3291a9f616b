"""Classical baselines: historical average and ARIMA."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from _data_synth import TINY, city_arrays, hourly_stamps

from stbat_plugin.data import city_from_arrays, load_city
from stbat_plugin.pipeline.classical import BaselineError, arima_forecast, historical_average


def _weekly_city(weeks: int = 4):
    t = np.arange(weeks * 168)
    hour, day = t % 24, (t // 24) % 7
    base = 10 + 5 * np.sin(2 * np.pi * hour / 24) + 3 * day
    flow = np.stack([base * (r + 1) for r in range(3)], axis=1)[..., None]
    # 2021-03-01 is a Monday
    arrays = city_arrays(flow=flow.astype(np.float32), timestamps=hourly_stamps(len(t)))
    return city_from_arrays("weekly", arrays)


def test_ha_exact_on_weekly_periodic_series() -> None:
    city = _weekly_city()
    pred = historical_average(city, slice(0, 336), slice(336, 672))
    assert pred.shape == (336, 3, 1) and pred.dtype == np.float32
    np.testing.assert_allclose(pred, city.flow[336:672], rtol=1e-5)


def test_ha_falls_back_to_hour_of_day_with_few_training_days() -> None:
    city = _weekly_city()
    pred = historical_average(city, slice(0, 72), slice(72, 168))  # Mon-Wed train
    hours = np.arange(72, 168) % 24
    mean_day = np.mean([city.flow[d * 24 : (d + 1) * 24] for d in range(3)], axis=0)
    np.testing.assert_allclose(pred, mean_day[hours], rtol=1e-5)


def test_ha_ignores_unobserved_cells() -> None:
    city = _weekly_city()
    observed = city.observed.copy()
    flow = city.flow.copy()
    observed[10, 0] = False
    flow[10, 0] = 0.0
    pred = historical_average(dataclasses.replace(city, flow=flow, observed=observed),
                              slice(0, 336), slice(336, 672))
    np.testing.assert_allclose(pred, city.flow[336:672], rtol=1e-5)


def test_baselines_need_training_data() -> None:
    city = _weekly_city()
    with pytest.raises(BaselineError, match="zero-shot"):
        historical_average(city, slice(100, 100), slice(100, 200))
    with pytest.raises(BaselineError, match="zero-shot"):
        arima_forecast(city, slice(100, 100), slice(100, 200))
    with pytest.raises(BaselineError, match="leaks"):
        historical_average(city, slice(0, 100), slice(50, 200))


def test_arima_on_real_tiny_series() -> None:
    full = load_city(TINY, "nyc_taxi")
    city = city_from_arrays("taxi2", {"flow": full.flow[:120, 2:4],
                                      "timestamps": full.timestamps[:120]})
    train, test = slice(0, 72), slice(72, 120)
    pred = arima_forecast(city, train, test, max_series=3)
    assert pred.shape == (48, 2, 2) and pred.dtype == np.float32 and np.isfinite(pred).all()
    # the series past max_series (region 1, channel 1) uses persistence y[t-1]
    np.testing.assert_array_equal(pred[:, 1, 1], city.flow[71:119, 1, 1])
    fitted = pred[:, 0]
    assert not np.array_equal(fitted, city.flow[71:119, 0])
    assert np.abs(fitted - city.flow[test][:, 0]).mean() < city.flow[test][:, 0].mean()


def test_arima_constant_series_and_no_leakage() -> None:
    flow = np.random.default_rng(0).poisson(20, (120, 2, 1)).astype(np.float32)
    flow[:, 1] = 4.0
    city = city_from_arrays("c", city_arrays(flow=flow, timestamps=hourly_stamps(120)))
    pred = arima_forecast(city, slice(0, 80), slice(80, 120))
    np.testing.assert_array_equal(pred[:, 1, 0], 4.0)
    changed = flow.copy()
    changed[100, 0] = 500.0  # a target value may affect later forecasts, never its own
    pred2 = arima_forecast(dataclasses.replace(city, flow=changed), slice(0, 80),
                           slice(80, 120))
    np.testing.assert_allclose(pred2[:21, 0], pred[:21, 0])
    assert not np.allclose(pred2[21:, 0], pred[21:, 0])


def test_arima_eval_after_a_gap_matches_adjacent_run() -> None:
    flow = np.random.default_rng(1).poisson(30, (140, 1, 1)).astype(np.float32)
    city = city_from_arrays("g", city_arrays(flow=flow, timestamps=hourly_stamps(140)))
    adjacent = arima_forecast(city, slice(0, 80), slice(80, 140))
    gap = arima_forecast(city, slice(0, 80), slice(100, 140))  # validation days in between
    assert gap.shape == (40, 1, 1)
    np.testing.assert_allclose(gap, adjacent[20:], rtol=1e-5)
