"""End-to-end checks of the cross-city protocol (paper Sec. 5.1) on the real tiny data.

Target city: the last ``test_days`` are the test set, the ``val_days`` before them the
validation set and the ``train_days`` immediately before validation its scarce training
data (0 = zero-shot). Source cities: chronological train:val = 2:1. Scalers, descriptors
and the valid-region mask see training data only; no target flow trains a zero-shot model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from stbat_plugin.data import SplitError, load_city
from stbat_plugin.pipeline import api, method_registry
from stbat_plugin.pipeline import methods as methods_module
from stbat_plugin.pipeline.config import TransferConfig
from stbat_plugin.pipeline.tasks import source_task, target_task

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny"
DAY = 24  # hourly data
T_TINY = 672  # 28 days
SMALL_NET = {"channels": 8, "hidden": 16}


def tiny_config(**kw) -> TransferConfig:
    base = dict(val_days=3, test_days=4, max_epochs=1, finetune_epochs=1,
                max_batches_per_epoch=2, batch_size=8, backbone_kwargs=dict(SMALL_NET))
    base.update(kw)
    return TransferConfig(**base)


def copy_city(tmp: Path, name: str, edit=None, as_name: str | None = None) -> Path:
    """Copy ``data/tiny/<name>.npz`` into ``tmp`` (as ``as_name``), ``edit(arrays)`` first."""
    tmp.mkdir(parents=True, exist_ok=True)
    dest = tmp / f"{as_name or name}.npz"
    if edit is None:
        shutil.copy(TINY / f"{name}.npz", dest)
        return dest
    with np.load(TINY / f"{name}.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k].copy() for k in npz.files}
    edit(arrays)
    np.savez(dest, **arrays)
    return dest


def steps(sl: slice) -> range:
    return range(sl.start, sl.stop)


# --------------------------------------------------------------------------- target split
@pytest.mark.parametrize("train_days", [3, 1, 5])
def test_target_split_is_train_then_val_then_test_at_the_end(train_days):
    # 1 day holds no 24-step window, nor one with the default 1-day lag input
    cfg = tiny_config(val_days=3, test_days=4, window=6, lag_days=[])
    task = target_task(load_city(TINY, "melbourne_pedestrian"), train_days, cfg)
    split = task.split
    assert task.city.num_steps == T_TINY
    assert split.test == slice(T_TINY - 4 * DAY, T_TINY)  # test = the last test_days
    assert split.val == slice(split.test.start - 3 * DAY, split.test.start)
    # train = the train_days immediately before validation, nothing else
    assert split.train == slice(split.val.start - train_days * DAY, split.val.start)
    assert max(steps(split.train)) < min(steps(split.val))
    assert max(steps(split.val)) < min(steps(split.test))
    assert task.scaler_fit_on == "train"


def test_training_windows_stay_inside_the_training_slice():
    cfg = tiny_config(lag_days=[])  # the window arithmetic with lag inputs: test_data_windows
    task = target_task(load_city(TINY, "melbourne_pedestrian"), 3, cfg)
    tr = task.split.train
    ds = task.dataset("train")
    t = np.array([int(ds[i]["t_index"]) for i in range(len(ds))])
    assert len(ds) == 3 * DAY - cfg.window  # 72 steps, window 6, horizon 1 -> 66 windows
    assert t.min() - cfg.window == tr.start  # the first input step is the first train step
    assert t.max() + cfg.horizon == tr.stop  # the last target step is the last train step
    # the inputs really are the scaled training flow (no value from validation)
    last = ds[len(ds) - 1]
    np.testing.assert_array_equal(last["x"].numpy(), task.scaled[tr.stop - 1 - cfg.window:tr.stop - 1])
    np.testing.assert_array_equal(last["y"].numpy(), task.scaled[tr.stop - 1:tr.stop])
    # validation / test windows have their targets in their own slice
    for part in ("val", "test"):
        sl = getattr(task.split, part)
        pds = task.dataset(part)
        tp = np.array([int(pds[i]["t_index"]) for i in range(len(pds))])
        assert tp.min() == sl.start and tp.max() == sl.stop - 1


def test_zero_shot_has_no_training_slice_and_scaler_fit_on_val():
    cfg = tiny_config()
    city = load_city(TINY, "melbourne_pedestrian")
    task = target_task(city, 0, cfg)
    assert task.split.train.start == task.split.train.stop == task.split.val.start
    assert len(steps(task.split.train)) == 0
    assert task.scaler_fit_on == "val"
    assert len(task.dataset("train")) == 0  # no window can be cut from an empty slice
    val = task.split.val
    flow = city.flow[val][city.observed[val]]  # observed cells of the validation days
    np.testing.assert_allclose(task.scaler.offset, [flow.min()], rtol=1e-6)
    np.testing.assert_allclose(task.scaler.scale, [flow.max() - flow.min()], rtol=1e-6)
    assert task.region_mask.all()  # nothing to judge regions by without training flow


def _mean_rows(rows, days):
    return {(r["method"], r["seed"]): (r["rmse"], r["mae"]) for r in rows
            if r["train_days"] == days and r["channel"] == "mean"}


def test_zero_shot_uses_no_target_flow_for_training(tmp_path, monkeypatch):
    """Zero-shot never fine-tunes; its metrics ignore every target step before validation."""
    calls: list[int] = []
    real_finetune = methods_module.finetune

    def spy(net, target, config, seed, progress=True):
        calls.append(len(steps(target.split.train)))
        return real_finetune(net, target, config, seed, progress=progress)

    monkeypatch.setattr(method_registry, "finetune", spy)
    monkeypatch.setattr(methods_module, "finetune", spy)
    cfg = tiny_config(source_span="2019-03-25:2019-03-31", max_batches_per_epoch=1)
    copy_city(tmp_path / "a", "nyc_bike")
    copy_city(tmp_path / "a", "melbourne_pedestrian")

    def scramble(arrays):  # every step before validation: new values
        cut = T_TINY - 7 * DAY
        rng = np.random.default_rng(1)
        arrays["flow"][:cut] = rng.integers(0, 5000, arrays["flow"][:cut].shape)

    copy_city(tmp_path / "b", "nyc_bike")
    copy_city(tmp_path / "b", "melbourne_pedestrian", scramble)

    kw = dict(train_days=[3, 0], methods=["stbat", "finetune"], config=cfg, progress=False)
    rows_a = api.transfer(tmp_path / "a", ["nyc_bike"], "melbourne_pedestrian", **kw)
    assert calls == [3 * DAY, 3 * DAY]  # fine-tuned only for 3 days, once per method
    calls.clear()
    rows_b = api.transfer(tmp_path / "b", ["nyc_bike"], "melbourne_pedestrian", **kw)
    assert calls == [3 * DAY, 3 * DAY]

    zero_a, zero_b = _mean_rows(rows_a, 0), _mean_rows(rows_b, 0)
    assert set(zero_a) == {("stbat", 0), ("finetune", 0)}
    for key in zero_a:
        np.testing.assert_allclose(zero_a[key], zero_b[key], rtol=1e-6)
    assert all(r["scaler_fit_on"] == "val" for r in rows_a if r["train_days"] == 0)
    # control: the few-shot results do see the changed training days
    few_a, few_b = _mean_rows(rows_a, 3), _mean_rows(rows_b, 3)
    assert any(not np.allclose(few_a[k], few_b[k], rtol=1e-4) for k in few_a)


def test_zero_shot_only_transfer_never_calls_finetune(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("finetune called in a zero-shot run")

    monkeypatch.setattr(method_registry, "finetune", forbidden)
    monkeypatch.setattr(methods_module, "finetune", forbidden)
    monkeypatch.setattr(method_registry, "train_target_only", forbidden)
    cfg = tiny_config(source_span="2019-03-25:2019-03-31", max_batches_per_epoch=1)
    rows = api.transfer(TINY, ["nyc_bike"], "melbourne_pedestrian", train_days=[0],
                        methods=["stbat", "finetune", "persistence", "seasonal"], config=cfg,
                        progress=False)
    assert {r["method"] for r in rows} == {"stbat", "finetune", "persistence", "seasonal"}
    assert {r["train_days"] for r in rows} == {0}


def test_a_method_that_needs_training_days_is_refused_in_a_zero_shot_only_run():
    """Nothing would run for it: an error before any training, not an empty result."""
    with pytest.raises(ValueError, match="needs target training days"):
        api.transfer(TINY, ["nyc_bike"], "melbourne_pedestrian", train_days=[0],
                     methods=["stbat", "ha"], config=tiny_config(), progress=False)


# --------------------------------------------------------------------------- scalers
def _fit(scaler) -> tuple[list[float], list[float]]:
    """What a scaler's fit learned: the per-channel offset and scale."""
    return scaler.offset.tolist(), scaler.scale.tolist()


def _edit_flow(sl: slice, value: float = 9999.0):
    def edit(arrays):
        arrays["flow"][sl] = value
    return edit


def test_target_scaler_sees_only_the_training_days(tmp_path):
    cfg = tiny_config()
    base = target_task(load_city(TINY, "nyc_taxi"), 3, cfg)
    tr = base.split.train
    # everything outside the training slice changed: before it, validation and test
    before = copy_city(tmp_path / "before", "nyc_taxi", _edit_flow(slice(0, tr.start)))
    after = copy_city(tmp_path / "after", "nyc_taxi", _edit_flow(slice(tr.stop, None)))
    inside = copy_city(tmp_path / "inside", "nyc_taxi", _edit_flow(slice(tr.start + 5, tr.start + 6)))
    for path in (before, after):
        task = target_task(load_city(path.parent, "nyc_taxi"), 3, cfg)
        assert _fit(task.scaler) == _fit(base.scaler)
        np.testing.assert_array_equal(task.region_mask, base.region_mask)
    changed = target_task(load_city(inside.parent, "nyc_taxi"), 3, cfg)
    assert _fit(changed.scaler) != _fit(base.scaler)  # control


def test_zero_shot_scaler_sees_only_the_validation_days(tmp_path):
    cfg = tiny_config()
    base = target_task(load_city(TINY, "melbourne_pedestrian"), 0, cfg)
    val = base.split.val
    for label, sl in (("before", slice(0, val.start)), ("test", slice(val.stop, None))):
        path = copy_city(tmp_path / label, "melbourne_pedestrian", _edit_flow(sl))
        task = target_task(load_city(path.parent, "melbourne_pedestrian"), 0, cfg)
        assert _fit(task.scaler) == _fit(base.scaler), label


def test_source_split_is_two_to_one_and_its_scaler_sees_only_training(tmp_path):
    cfg = tiny_config(lag_days=[])
    task = source_task(load_city(TINY, "nyc_bike"), cfg)
    assert task.split.train == slice(0, 448) and task.split.val == slice(448, T_TINY)
    assert task.split.test is None and task.scaler_fit_on == "train"
    ds = task.dataset("train")
    t = np.array([int(ds[i]["t_index"]) for i in range(len(ds))])
    assert t.min() == cfg.window and t.max() == 447
    other = source_task(load_city(TINY, "nyc_bike"), tiny_config(source_train_ratio=3))
    assert other.split.train == slice(0, 504)

    path = copy_city(tmp_path / "val", "nyc_bike", _edit_flow(slice(448, None)))
    changed_val = source_task(load_city(path.parent, "nyc_bike"), cfg)
    assert _fit(changed_val.scaler) == _fit(task.scaler)
    np.testing.assert_array_equal(changed_val.region_mask, task.region_mask)
    path = copy_city(tmp_path / "train", "nyc_bike", _edit_flow(slice(447, 448)))
    changed_train = source_task(load_city(path.parent, "nyc_bike"), cfg)
    assert _fit(changed_train.scaler) != _fit(task.scaler)  # control


# --------------------------------------------------------------------------- descriptors
def test_temporal_profile_descriptors_of_a_source_see_only_its_training_slice(tmp_path):
    """nyc_bike_grid2014 has no POI: its descriptors come from its training flow only."""
    cfg = tiny_config(descriptors="temporal_profile")
    name = "nyc_bike_grid2014"
    src = api.prepare_sources(TINY, [name], cfg)
    base, kind = src.descriptors, src.kind
    assert kind == "temporal_profile"
    assert base[name].shape == (128, 31)
    n_train = source_task(load_city(TINY, name), cfg).split.train.stop
    assert n_train == 1295 * 2 // 3

    rng = np.random.default_rng(0)

    def scramble_after(arrays):
        arrays["flow"][n_train:] = rng.integers(0, 500, arrays["flow"][n_train:].shape)

    copy_city(tmp_path / "after", name, scramble_after)
    after = api.prepare_sources(tmp_path / "after", [name], cfg).descriptors
    np.testing.assert_array_equal(after[name], base[name])

    def scramble_inside(arrays):
        arrays["flow"][n_train - 48:n_train] = rng.integers(0, 500, (48, 128, 2))

    copy_city(tmp_path / "inside", name, scramble_inside)
    inside = api.prepare_sources(tmp_path / "inside", [name], cfg).descriptors
    assert not np.allclose(inside[name], base[name])  # control

    # "auto" falls back to temporal profiles too (no POI in the grid city)
    auto_kind = api.prepare_sources(TINY, [name, "nyc_bike"], tiny_config()).kind
    assert auto_kind == "temporal_profile"


# --------------------------------------------------------------------------- region mask
def test_regions_without_training_flow_are_masked_out():
    cfg = tiny_config()
    city = load_city(TINY, "nyc_bike")
    task = target_task(city, 3, cfg)
    tr = task.split.train
    expected = (city.flow[tr] * city.observed[tr][..., None]).sum(axis=(0, 2)) > 0
    np.testing.assert_array_equal(task.region_mask, expected)
    assert (~task.region_mask).sum() >= 5  # 5 Manhattan zones have no Citi Bike station
    # test windows never score a masked region
    sample = task.dataset("test")[0]
    assert not sample["mask"][:, ~task.region_mask].any()
    assert sample["mask"][:, task.region_mask].all()


def test_masked_regions_do_not_count_in_the_metrics(tmp_path):
    """Large test flow in a region with no training flow changes no metric; in a valid one it does.

    HA predicts each region from its own history only, so the scored cells alone decide.
    """
    cfg = tiny_config()
    city = load_city(TINY, "nyc_bike")
    task = target_task(city, 3, cfg)
    masked = int(np.flatnonzero(~task.region_mask)[0])
    valid = int(np.flatnonzero(task.region_mask)[0])
    test = task.split.test

    def spike(region):
        def edit(arrays):
            arrays["flow"][test.start:, region] += 500.0
        return edit

    run = dict(train_days=3, methods=["ha"], config=cfg, progress=False)
    base = _mean_rows(api.transfer(TINY, [], "nyc_bike", **run), 3)
    copy_city(tmp_path / "masked", "nyc_bike", spike(masked))
    same = _mean_rows(api.transfer(tmp_path / "masked", [], "nyc_bike", **run), 3)
    copy_city(tmp_path / "valid", "nyc_bike", spike(valid))
    other = _mean_rows(api.transfer(tmp_path / "valid", [], "nyc_bike", **run), 3)
    assert set(base) == {("ha", 0)}
    for key in base:
        np.testing.assert_allclose(same[key], base[key], rtol=1e-6)
        assert other[key][0] > base[key][0] + 1.0  # control: a valid region counts


# --------------------------------------------------------------------------- too short
def test_too_short_target_raises_with_values_that_fit():
    city = load_city(TINY, "melbourne_pedestrian")  # 28 days
    with pytest.raises(SplitError) as err:
        target_task(city, 3, tiny_config(val_days=20, test_days=10))
    msg = str(err.value)
    assert "melbourne_pedestrian" in msg and "28.0 days" in msg and "--val-days" in msg
    fix = err.value.suggestion
    assert fix is not None and fix["train_days"] == 3
    task = target_task(city, fix["train_days"],
                       tiny_config(val_days=fix["val_days"], test_days=fix["test_days"]))
    assert task.split.train.start >= 0


def test_too_few_training_steps_for_one_window_is_an_error():
    city = load_city(TINY, "melbourne_pedestrian")
    with pytest.raises(ValueError, match="--train-days"):
        target_task(city, 1, tiny_config(window=24))


def test_target_days_count_the_steps_of_the_city_interval():
    # 30-minute data: a day is 48 steps (steps_per_day of the city's interval, one function)
    from _data_synth import city_arrays, hourly_stamps

    from stbat_plugin.data import city_from_arrays

    T = 48 * 12
    coords = np.array([[40.70, -74.00], [40.71, -74.01], [40.72, -74.00]])
    city = city_from_arrays("half_hourly", city_arrays(
        num_steps=T, num_regions=3, num_channels=1, timestamps=hourly_stamps(T, minutes=30),
        coords=coords))
    task = target_task(city, 2, tiny_config(window=6))
    split = task.split
    assert split.test == slice(T - 4 * 48, T) and split.val == slice(T - 7 * 48, T - 4 * 48)
    assert split.train == slice(T - 9 * 48, T - 7 * 48)
