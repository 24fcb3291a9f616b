"""Non-deep baselines in ORIGINAL units: persistence, seasonal naive, historical average (HA)
and per-series ARIMA.

HA and ARIMA fit on the target's training slice; persistence and seasonal need no training
data (they run zero-shot). All predict every step of an evaluation slice (the same targets
the deep models are scored on) from observations before that step only.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator

import numpy as np

from stbat_plugin.data.city import City
from stbat_plugin.data.covariates import MINUTES_PER_DAY, clock
from stbat_plugin.data.descriptors import masked_bin_means

logger = logging.getLogger(__name__)


class BaselineError(ValueError):
    """A classical baseline cannot run with the given data/slices."""


def _check_slices(city: City, train: slice, eval_slice: slice, method: str) -> tuple[range, range]:
    tr = range(*train.indices(city.num_steps))
    ev = range(*eval_slice.indices(city.num_steps))
    if len(tr) == 0:
        raise BaselineError(
            f"{method} needs target training data but the training slice of {city.name!r} is "
            f"empty (zero-shot has none); run it with train_days >= 1."
        )
    if tr.step != 1 or ev.step != 1 or (len(ev) and ev.start < tr.stop):
        raise BaselineError(
            f"{method}: the evaluation slice {ev.start}:{ev.stop} must be contiguous and start "
            f"at or after the end of training ({tr.stop}); scoring on training steps leaks."
        )
    return tr, ev


def last_observed(city: City, stop: int) -> np.ndarray:
    """The last observed value at or before each step ``< stop`` (0 before any observation).

    Shapes:
        returns [stop, N, C] float64, original units.
    """
    obs = city.observed[:stop]
    steps = np.where(obs, np.arange(stop)[:, None], -1)
    latest = np.maximum.accumulate(steps, axis=0)  # [stop, N]: index of the last observation
    flow = city.flow[:stop].astype(np.float64)
    filled = np.take_along_axis(flow, np.maximum(latest, 0)[..., None], axis=0)
    return np.where((latest >= 0)[..., None], filled, 0.0)


def _eval_range(city: City, eval_slice: slice, method: str, lag: int = 1) -> range:
    ev = range(*eval_slice.indices(city.num_steps))
    if ev.step != 1 or (len(ev) and ev.start < lag):
        raise BaselineError(
            f"{method}: the evaluation slice {ev.start}:{ev.stop} needs {lag} step(s) of history "
            f"before it in {city.name!r}; start it at step {lag} or later."
        )
    return ev


def persistence(city: City, eval_slice: slice) -> np.ndarray:
    """Repeat the last observed value: the forecast of step ``t`` is ``y[t-1]``.

    An unobserved ``y[t-1]`` is replaced by the latest observed value before it.

    Shapes:
        returns [len(eval_slice), N, C] float32, original units.
    """
    ev = _eval_range(city, eval_slice, "persistence")
    if not len(ev):
        return np.zeros((0, city.num_regions, city.num_channels), np.float32)
    return last_observed(city, ev.stop - 1)[ev.start - 1:].astype(np.float32)


def seasonal_naive(city: City, eval_slice: slice, lag: int) -> np.ndarray:
    """The value ``lag`` steps earlier (e.g. the same hour one day or one week before).

    Where ``y[t-lag]`` is unobserved, the latest observed value before it is used.

    Shapes:
        returns [len(eval_slice), N, C] float32, original units.
    """
    if lag < 1:
        raise BaselineError(f"seasonal: lag must be >= 1 step (got {lag}).")
    ev = _eval_range(city, eval_slice, "seasonal", lag)
    if not len(ev):
        return np.zeros((0, city.num_regions, city.num_channels), np.float32)
    filled = last_observed(city, ev.stop - lag)
    return filled[ev.start - lag:].astype(np.float32)


def historical_average(city: City, train: slice, eval_slice: slice) -> np.ndarray:
    """Mean of the observed training values in the same time-of-day and day-of-week slot.

    Falls back, per region, to the same time-of-day slot (any weekday), then to the region's
    overall training mean, then 0 (logged) for a region never observed in training. With only
    3 training days most weekday slots are empty, so HA then mostly predicts the mean daily
    profile of those days. Slots are clock minutes of the day, so any interval works.

    Shapes:
        returns [len(eval_slice), N, C] float32, original units.
    """
    tr, ev = _check_slices(city, train, eval_slice, "historical average")
    day_key, dow = clock(city.timestamps)
    week_key = dow * MINUTES_PER_DAY + day_key
    idx_tr, idx_ev = np.asarray(tr), np.asarray(ev)
    values = city.flow[idx_tr].astype(np.float64)
    obs = city.observed[idx_tr]
    pred = np.zeros((len(ev), city.num_regions, city.num_channels))
    filled = np.zeros((len(ev), city.num_regions), dtype=bool)
    for keys in (week_key, day_key, np.zeros_like(day_key)):
        uniq, inv = np.unique(keys[np.concatenate([idx_tr, idx_ev])], return_inverse=True)
        means, counts = masked_bin_means(values, obs, inv[: len(tr)], uniq.size)
        ev_inv = inv[len(tr):]
        use = (counts[ev_inv] > 0) & ~filled
        pred[use] = means[ev_inv][use]
        filled |= use
    if not filled.all():
        logger.warning("HA on %s: %d region(s) never observed in training predict 0",
                       city.name, int((~filled.any(axis=0)).sum()))
    return pred.astype(np.float32)


def arima_forecast(
    city: City,
    train: slice,
    eval_slice: slice,
    order: tuple[int, int, int] = (6, 1, 1),
    max_series: int | None = None,
) -> np.ndarray:
    """One-step-ahead ARIMA forecasts, one model per region and channel.

    Each series is fitted (statsmodels ``ARIMA(order)``) on the training slice; the fitted
    parameters are then run, without refitting, over the actual history from the training
    start to the end of the evaluation slice (``results.apply``), and the prediction for step
    ``t`` uses observations before ``t`` only. Unobserved cells enter as missing values (NaN).
    A series constant over its observed training cells predicts that constant. A failed fit
    (exception or non-finite forecast) falls back to persistence, ``y[t-1]`` (counted, one
    warning). Only the first ``max_series`` series (region-major order) are fitted when given;
    the rest use persistence too (for quick runs and tests).

    Shapes:
        returns [len(eval_slice), N, C] float32, original units.
    """
    tr, ev = _check_slices(city, train, eval_slice, "ARIMA")
    import statsmodels.tsa.arima.model  # noqa: F401  (loads scipy's BLAS before limiting it)

    history = np.where(city.observed[..., None], city.flow, np.nan).astype(np.float64)
    history = history[tr.start : ev.stop] if len(ev) else history[tr.start : tr.stop]
    persistence = city.flow[ev.start - 1 : ev.stop - 1].astype(np.float64)
    pred = persistence.copy()
    series = [(n, c) for n in range(city.num_regions) for c in range(city.num_channels)]
    limit = len(series) if max_series is None else max(0, min(max_series, len(series)))
    failures, began = 0, time.perf_counter()
    with _single_blas_thread():
        for n, c in series[:limit]:
            forecast = _fit_one(history[:, n, c], len(tr), ev.start - tr.start, order)
            if forecast is None:
                failures += 1
            else:
                pred[:, n, c] = forecast
    if failures:
        logger.warning("ARIMA on %s: %d of %d fits failed, used persistence y[t-1]",
                       city.name, failures, limit)
    logger.info("ARIMA%s on %s: %d series in %.1f s (%d left to persistence)", order,
                city.name, limit, time.perf_counter() - began, len(series) - limit)
    return pred.astype(np.float32)


@contextlib.contextmanager
def _single_blas_thread() -> Iterator[None]:
    """Limit BLAS to one thread while fitting (tiny matrices: threads only add overhead).

    Multi-threaded OpenBLAS made each fit 5-50x slower on a busy 2-core machine.
    ``threadpoolctl`` is a dependency of the ``pipeline`` extra, like statsmodels.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _fit_one(
    y: np.ndarray, n_train: int, first: int, order: tuple[int, int, int]
) -> np.ndarray | None:
    """Fit on ``y[:n_train]``; one-step forecasts of ``y[first:]``, or None if the fit fails.

    Shapes:
        y: [T'] history from the training start, NaN at unobserved steps -> [T' - first].
    """
    n_eval = y.shape[0] - first
    if n_eval <= 0:
        return np.zeros(0)
    seen = y[:n_train][np.isfinite(y[:n_train])]
    if seen.size and np.all(seen == seen[0]):
        return np.full(n_eval, seen[0])
    if seen.size < 2:
        return None
    from statsmodels.tsa.arima.model import ARIMA  # imported (fast) by arima_forecast first

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = ARIMA(y[:n_train], order=order).fit(cov_type="none")
            forecast = result.apply(endog=y).predict(start=first, end=y.shape[0] - 1)
    except (ValueError, ArithmeticError, RuntimeError, IndexError, np.linalg.LinAlgError) as exc:
        logger.debug("ARIMA fit failed: %s", exc)
        return None
    forecast = np.asarray(forecast, dtype=np.float64)
    return forecast if np.isfinite(forecast).all() else None
