"""The input-pipeline options of issue 7 item 2: the log1p scaler, seasonal lag inputs,
per-region output calibration and the fine-tuning learning rate chosen on validation.

Each transform is held to a naive loop twin in float64 (values, and gradients where it is
differentiable); the pipeline tests run on the tiny data.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli_helpers import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from stbat_plugin.calibration import apply_affine_calibration, fit_affine_calibration
from stbat_plugin.data import ScalerError, load_city
from stbat_plugin.network import NLinear, PredictionNetwork
from stbat_plugin.pipeline import api, method_registry
from stbat_plugin.pipeline.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from stbat_plugin.pipeline.cli import _config, build_parser
from stbat_plugin.pipeline.config import ADAPTATION_ONLY, TransferConfig
from stbat_plugin.pipeline.experiment import load_spec, plan, run_experiment
from stbat_plugin.pipeline.method_registry import get_method
from stbat_plugin.pipeline.methods import (
    Adapted,
    adapt_to_target,
    build_linear,
    finetune,
    original_rmse,
    predict,
)
from stbat_plugin.pipeline.tasks import fold_channels, source_task, target_task
from stbat_plugin.pipeline.trainer import FitResult

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny"
MELB = "melbourne_pedestrian"


def tiny_config(**kw) -> TransferConfig:
    base = dict(val_days=3, test_days=4, max_epochs=1, finetune_epochs=1,
                max_batches_per_epoch=2, batch_size=8,
                backbone_kwargs={"channels": 8, "hidden": 16})
    base.update(kw)
    return TransferConfig(**base)


@pytest.fixture(scope="module")
def melb():
    return load_city(TINY, MELB)


# =========================================================================== config and CLI
def test_new_settings_are_fields_with_flags_and_checked():
    cfg = TransferConfig(lag_days=[7, 1], time_features=True)
    assert cfg.lag_days == [1, 7] and cfg.input_channels == 1 + 2 + 4
    assert cfg.model_signature()["lag_days"] == [1, 7]
    assert TransferConfig().lag_days == [1] and TransferConfig().input_channels == 2  # default
    assert TransferConfig(lag_days=[]).input_channels == 1
    assert set(ADAPTATION_ONLY) >= {"calibrate", "calibrate_shrinkage", "finetune_lr_grid"}
    assert not {"scaler", "lag_days"} & set(ADAPTATION_ONLY)
    args = build_parser().parse_args(
        ["transfer", "--data-dir", "d", "--source", "a", "--target", "b", "--out", "o",
         "--lag-days", "7,1", "--finetune-lr-grid", "1e-3,3e-4", "--calibrate", "auto",
         "--calibrate-shrinkage", "5", "--scaler", "log1p"])
    got = _config(args)
    assert (got.lag_days, got.finetune_lr_grid, got.calibrate, got.calibrate_shrinkage,
            got.scaler) == ([1, 7], [1e-3, 3e-4], "auto", 5.0, "log1p")
    assert _config(build_parser().parse_args(
        ["transfer", "--data-dir", "d", "--source", "a", "--target", "b", "--out", "o",
         "--lag-days", "none"])).lag_days == []
    for bad, match in (({"lag_days": [0]}, "lag_days"), ({"lag_days": [1, 1]}, "lag_days"),
                       ({"lag_days": [True]}, "lag_days"), ({"lag_days": "1,7"}, "lag_days"),
                       ({"finetune_lr_grid": [0.0]}, "finetune_lr_grid"),
                       ({"finetune_lr_grid": [math.nan]}, "finetune_lr_grid"),
                       ({"finetune_lr_grid": [1e-3, 1e-3]}, "finetune_lr_grid"),
                       ({"calibrate": "isotonic"}, "calibrate"),
                       ({"calibrate_shrinkage": 0.0}, "calibrate_shrinkage"),
                       ({"scaler": "log"}, "scaler")):
        with pytest.raises(ValueError, match=match):
            TransferConfig(**bad)


@pytest.mark.parametrize("flag", [["--lag-days", "0"], ["--lag-days", "x"],
                                  ["--finetune-lr-grid", "-1"]])
def test_bad_flags_exit_2_before_any_data_is_read(flag, tmp_path):
    code, _, err = run_cli(["transfer", "--data-dir", tmp_path / "none", "--source", "a",
                            "--target", "b", "--out", tmp_path / "out", *flag])
    assert code == 2, err
    assert flag[0].lstrip("-").replace("-", "_") in err or flag[0] in err


def test_a_checkpoint_with_other_lag_inputs_is_refused(tmp_path):
    with_lags = tiny_config(lag_days=[1, 7])
    path = save_checkpoint(tmp_path / "m.ckpt", build_linear(with_lags).state_dict(),
                           config=with_lags, method="linear", data={})
    with pytest.raises(CheckpointError, match="lag_days"):
        load_checkpoint(path, expect_config=tiny_config())
    net = api.from_checkpoint(path, with_lags).net
    assert isinstance(net, NLinear) and net.lag_channels == 2


def test_a_config_saved_before_lag_inputs_existed_means_no_lags(tmp_path):
    """The default became lag_days=[1]; a checkpoint or run folder written before the key
    existed was trained without lag inputs and must still load as such."""
    old = tiny_config(lag_days=[])
    saved = old.to_dict()
    del saved["lag_days"]
    assert TransferConfig.from_saved(saved).lag_days == []
    assert TransferConfig.from_dict(saved).lag_days == [1]  # a partial dict (flags, spec): today's
    path = save_checkpoint(tmp_path / "old.ckpt", build_linear(old).state_dict(), config=old,
                           method="linear", data={})
    payload = torch.load(path, weights_only=True)
    del payload["config"]["lag_days"]
    torch.save(payload, path)
    pre = api.from_checkpoint(path)
    assert pre.config.lag_days == [] and pre.net.lag_channels == 0
    with pytest.raises(CheckpointError, match="lag_days"):  # today's default asks for a lag
        api.from_checkpoint(path, tiny_config())


# =========================================================================== log1p in the pipeline
def test_log1p_refuses_negative_flow_up_front_naming_city_channel_and_fix(melb):
    flow = melb.flow.copy()
    flow[5, 3, 0] = -2.0  # before the training days: the transform would still see it
    bad = dataclasses.replace(melb, flow=flow)
    for build in (lambda c: target_task(bad, 3, c), lambda c: source_task(bad, c)):
        with pytest.raises(ScalerError, match=r"city 'melbourne_pedestrian', channel "
                           r"'pedestrians': 1 negative flow cell.*--scaler minmax or zscore"):
            build(tiny_config(scaler="log1p"))
        build(tiny_config(scaler="minmax"))  # control: an affine scaler takes it


def test_log1p_task_maps_back_to_the_original_flow(melb):
    task = target_task(melb, 3, tiny_config(scaler="log1p"))
    tr = task.split.train
    seen = task.scaled[tr][melb.observed[tr]]  # observed training cells: [0, 1]
    assert seen.min() == pytest.approx(0.0, abs=1e-6) and seen.max() == pytest.approx(1.0, abs=1e-6)
    back = task.to_original(torch.as_tensor(task.scaled)).numpy()
    np.testing.assert_allclose(back, melb.flow, rtol=1e-4, atol=1e-2)
    logs = np.log1p(melb.flow[tr][melb.observed[tr]].astype(np.float64))
    np.testing.assert_allclose(task.scaler.offset, [logs.min()])
    np.testing.assert_allclose(task.scaler.scale, [logs.max() - logs.min()])


# =========================================================================== lag inputs: data
def test_lag_days_delay_training_windows_and_carry_the_seasonal_value(melb):
    task = target_task(melb, 3, tiny_config(lag_days=[1]))
    tr, val = task.split.train, task.split.val
    assert task.lags == (24,)
    train = task.dataset("train")
    assert int(train.t_indices[0]) == tr.start + 24 + 23 and len(train) == 72 - 47
    for i in (0, len(train) - 1):
        t = int(train.t_indices[i])
        np.testing.assert_array_equal(train[i]["lags"][-1, ..., 0].numpy(), task.scaled[t - 24])
        assert t - 24 + 1 - 24 >= tr.start  # every lag input inside the training days
    assert int(task.dataset("val").t_indices[0]) == val.start  # history before the slice


def test_a_lag_that_leaves_no_training_window_is_refused_with_the_numbers(melb):
    with pytest.raises(ValueError, match=r"3 training day\(s\) \(72 steps\) hold no training "
                       r"window, which needs 192 steps .*7-day lag.*--train-days 8 or more, "
                       r"drop the 7-day lag from --lag-days"):
        target_task(melb, 3, tiny_config(lag_days=[7]))
    assert len(target_task(melb, 8, tiny_config(lag_days=[7])).dataset("train")) == 1
    short = melb.restrict(None, "2022-03-13")  # 7 days: no source training window
    with pytest.raises(ValueError, match="--lag-days"):
        source_task(short, tiny_config(lag_days=[7]))


def test_fold_channels_gives_each_channel_its_own_lags_then_shared_covariates():
    b, t, n, c, lags, k = 2, 3, 4, 2, 2, 3
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.rand(b, t, n, c, generator=g),
             "lags": torch.rand(b, t, n, c, lags, generator=g),
             "cov": torch.rand(b, t, k, generator=g), "y": torch.rand(b, 1, n, c, generator=g),
             "mask": torch.ones(b, 1, n, c, dtype=torch.bool)}
    x, y, _ = fold_channels(batch, "cpu")
    assert x.shape == (b * c, t, n, 1 + lags + k)
    for bb in range(b):
        for ch in range(c):
            row = bb * c + ch
            assert torch.equal(y[row, ..., 0], batch["y"][bb, ..., ch])
            for j in range(t):
                for r in range(n):
                    want = [batch["x"][bb, j, r, ch], *batch["lags"][bb, j, r, ch],
                            *batch["cov"][bb, j]]
                    assert torch.equal(x[row, j, r], torch.stack(want))


# =========================================================================== lag inputs: networks
class _Record(nn.Module):
    """A toy extractor that keeps its input: features = [time mean of every channel, 1]."""

    def __init__(self, channels: int):
        super().__init__()
        self.feature_dim = channels + 1
        self.seen: torch.Tensor | None = None

    def forward_features(self, x, **graph):
        self.seen = x
        m = x.mean(1)
        return torch.cat([m, torch.ones_like(m[..., :1])], dim=-1)


def _norm_twin(series: list, mode: str) -> tuple:
    """Offset and scale of one window, as a loop (:func:`window_norm`)."""
    if mode == "none":
        return 0.0, 1.0
    mean = sum(series) / len(series)
    std = (sum((v - mean) ** 2 for v in series) / len(series) + 1e-5) ** 0.5
    return (series[-1] if mode == "revin-last" else mean), std


def _prediction_twin(net: PredictionNetwork, x: torch.Tensor, mode: str):
    """The normalised backbone input and (head at zero) the output, cell by cell."""
    b, t, n, _ = x.shape
    c, lags = net.out_channels, net.lag_channels
    w, bias = net.skip.weight, net.skip.bias
    seen = [[[[None] * x.shape[3] for _ in range(n)] for _ in range(t)] for _ in range(b)]
    out = [[[[None] * c for _ in range(n)] for _ in range(net.horizon)] for _ in range(b)]
    for bb in range(b):
        for r in range(n):
            for ch in range(c):
                off, sc = _norm_twin([x[bb, j, r, ch] for j in range(t)], mode)
                blocks = [[(x[bb, j, r, c * i + ch] - off) / sc for j in range(t)]
                          for i in range(1 + lags)]  # the series, then each lag
                for i, block in enumerate(blocks):
                    for j in range(t):
                        seen[bb][j][r][c * i + ch] = block[j]
                for s in range(net.horizon):
                    ar = bias[s] + sum(w[s, i * t + j] * blocks[i][j]
                                       for i in range(1 + lags) for j in range(t))
                    out[bb][s][r][ch] = ar * sc + off
            for j in range(t):
                for q in range(c * (1 + lags), x.shape[3]):
                    seen[bb][j][r][q] = x[bb, j, r, q]  # covariates pass unchanged
    to_tensor = lambda nested: torch.stack([torch.stack([torch.stack([torch.stack(cell)  # noqa: E731
                                                                      for cell in row])
                                                         for row in step]) for step in nested])
    return to_tensor(seen), to_tensor(out)


@pytest.mark.parametrize("mode", ["none", "revin-last", "revin"])
def test_lag_channels_share_the_series_normalisation_and_feed_skip_and_backbone(mode):
    torch.manual_seed(0)
    c, lags, t = 2, 2, 4
    net = PredictionNetwork(_Record(c * (1 + lags) + 1), horizon=2, out_channels=c,
                            normalize=mode, linear_skip=True, window=t,
                            lag_channels=lags).double()
    nn.init.zeros_(net.head[-1].weight)
    nn.init.zeros_(net.head[-1].bias)
    nn.init.normal_(net.skip.weight)
    nn.init.normal_(net.skip.bias)
    assert net.skip.in_features == t * (1 + lags)
    x = torch.rand(2, t, 3, c * (1 + lags) + 1, dtype=torch.float64, requires_grad=True)
    out = net(x)
    seen_want, out_want = _prediction_twin(net, x, mode)
    torch.testing.assert_close(net.extractor.seen, seen_want)
    torch.testing.assert_close(out, out_want)
    probe = torch.rand_like(out)
    grads = torch.autograd.grad((out * probe).sum(), [x, net.skip.weight])
    grads_want = torch.autograd.grad((out_want * probe).sum(), [x, net.skip.weight])
    for got, want in zip(grads, grads_want, strict=True):
        torch.testing.assert_close(got, want)


def test_normalised_network_with_lags_is_affine_equivariant():
    """Series and lags rescaled alike (they share one scale): the forecast follows."""
    torch.manual_seed(0)
    net = PredictionNetwork(_Record(3), normalize="revin-last", linear_skip=True, window=5,
                            lag_channels=1).double()
    for p in net.parameters():
        nn.init.normal_(p)
    x = torch.rand(3, 5, 4, 3, dtype=torch.float64)
    moved = x.clone()
    moved[..., :2] = 7 * x[..., :2] + 3  # the series and its lag; the covariate is kept
    torch.testing.assert_close(net(moved), 7 * net(x) + 3, rtol=1e-3, atol=1e-3)
    only_series = x.clone()
    only_series[..., :1] = 7 * x[..., :1] + 3  # control: a lag on another scale changes it
    assert not torch.allclose(net(only_series), 7 * net(x) + 3, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="at least 2 channels"):
        net(torch.rand(3, 5, 4, 1, dtype=torch.float64))


def test_nlinear_with_lags_matches_its_formula_and_starts_as_persistence():
    torch.manual_seed(0)
    t, lags, c = 4, 2, 2
    net = NLinear(t, horizon=2, out_channels=c, lag_channels=lags).double()
    x = torch.rand(2, t, 3, c * (1 + lags) + 1, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(net(x), x[:, -1:, :, :c].expand(-1, 2, -1, -1))  # zero init
    for p in net.parameters():
        nn.init.normal_(p)
    out = net(x)
    w, bias, v = net.linear.weight, net.linear.bias, net.lag_linear.weight
    want = torch.stack([torch.stack([torch.stack([torch.stack([
        x[b, -1, r, ch] + bias[s]
        + sum(w[s, j] * (x[b, j, r, ch] - x[b, -1, r, ch]) for j in range(t))
        + sum(v[s, i * t + j] * (x[b, j, r, c * (1 + i) + ch] - x[b, -1, r, ch])
              for i in range(lags) for j in range(t))
        for ch in range(c)]) for r in range(3)]) for s in range(2)]) for b in range(2)])
    torch.testing.assert_close(out, want)
    probe = torch.rand_like(out)
    for got, exp in zip(torch.autograd.grad((out * probe).sum(), [x, v]),
                        torch.autograd.grad((want * probe).sum(), [x, v]), strict=True):
        torch.testing.assert_close(got, exp)
    assert "lag_linear.weight" not in NLinear(t).state_dict()  # no lags: the old network


# =========================================================================== calibration math
def _calibration_twin(pred: np.ndarray, y: np.ndarray, mask: np.ndarray, lam: float):
    """Per region and channel: minimise sum (y - a p - b)^2 + lam ((a-1)^2 + b^2) by solving
    the normal equations of the stacked least-squares problem."""
    n, c = pred.shape[-2:]
    a, b = np.ones((n, c)), np.zeros((n, c))
    for r in range(n):
        for ch in range(c):
            rows = [(p, t) for p, t, m in zip(pred[..., r, ch].ravel(), y[..., r, ch].ravel(),
                                              mask[..., r, ch].ravel(), strict=True) if m]
            design = np.array([[p, 1.0] for p, _ in rows]).reshape(-1, 2)
            target = np.array([t for _, t in rows])
            lhs = design.T @ design + lam * np.eye(2)
            rhs = design.T @ target + lam * np.array([1.0, 0.0])
            a[r, ch], b[r, ch] = np.linalg.solve(lhs, rhs)
    return a, b


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.integers(1, 8), st.integers(1, 2), st.integers(1, 3),
                       st.integers(1, 2)),
       lam=st.floats(1e-3, 1e3), data=st.data())
def test_calibration_matches_its_least_squares_twin(shape, lam, data):
    values = st.floats(-3, 3, allow_nan=False)
    pred = data.draw(arrays(np.float64, shape, elements=values))
    y = data.draw(arrays(np.float64, shape, elements=values))
    mask = data.draw(arrays(bool, shape))
    a, b = fit_affine_calibration(torch.as_tensor(pred), torch.as_tensor(np.where(mask, y, np.nan)),
                                  torch.as_tensor(mask), lam)  # masked cells: NaN changes nothing
    a_want, b_want = _calibration_twin(pred, y, mask, lam)
    np.testing.assert_allclose(a.numpy(), a_want, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b.numpy(), b_want, rtol=1e-6, atol=1e-8)
    # the minimiser: any small step away raises the objective
    obj = lambda aa, bb: (np.where(mask, y - aa * pred - bb, 0) ** 2).sum((0, 1)) \
        + lam * ((aa - 1) ** 2 + bb ** 2)  # noqa: E731
    base = obj(a.numpy(), b.numpy())
    for da, db in ((1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)):
        assert (obj(a.numpy() + da, b.numpy() + db) >= base - 1e-12).all()


def test_calibration_gradients_match_a_loop_twin():
    torch.manual_seed(0)
    pred = torch.rand(6, 1, 3, 2, dtype=torch.float64, requires_grad=True)
    y = torch.rand(6, 1, 3, 2, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(6, 1, 3, 2) > 0.3
    a, b = fit_affine_calibration(pred, y, mask, 2.0)
    twin_a, twin_b = torch.ones(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64)
    rows_a, rows_b = [], []
    for r in range(3):
        for ch in range(2):
            m = mask[:, 0, r, ch]
            design = torch.stack([pred[:, 0, r, ch][m], torch.ones(int(m.sum()),
                                                                   dtype=torch.float64)], -1)
            lhs = design.T @ design + 2.0 * torch.eye(2, dtype=torch.float64)
            rhs = design.T @ y[:, 0, r, ch][m] + 2.0 * torch.tensor([1.0, 0.0],
                                                                      dtype=torch.float64)
            sol = torch.linalg.solve(lhs, rhs)
            rows_a.append(sol[0])
            rows_b.append(sol[1])
    twin_a, twin_b = torch.stack(rows_a).view(3, 2), torch.stack(rows_b).view(3, 2)
    torch.testing.assert_close(a, twin_a)
    torch.testing.assert_close(b, twin_b)
    probe = torch.rand(2, 3, 2, dtype=torch.float64)
    got = torch.autograd.grad((a * probe[0] + b * probe[1]).sum(), [pred, y])
    want = torch.autograd.grad((twin_a * probe[0] + twin_b * probe[1]).sum(), [pred, y])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_calibration_limits_and_errors():
    p = torch.linspace(0, 1, 50, dtype=torch.float64).view(50, 1, 1, 1).expand(50, 1, 2, 1)
    y = 2 * p + 0.5
    a, b = fit_affine_calibration(p, y, None, 1e-9)  # exact affine data: recovered
    torch.testing.assert_close(a, torch.full((2, 1), 2.0, dtype=torch.float64))
    torch.testing.assert_close(b, torch.full((2, 1), 0.5, dtype=torch.float64))
    a, b = fit_affine_calibration(p, y, None, 1e12)  # all shrinkage: the identity
    torch.testing.assert_close(a, torch.ones(2, 1, dtype=torch.float64))
    torch.testing.assert_close(b, torch.zeros(2, 1, dtype=torch.float64), atol=1e-9, rtol=0)
    mask = torch.ones_like(p, dtype=torch.bool)
    mask[..., 1, :] = False  # a region with no counted cell keeps the identity
    a, b = fit_affine_calibration(p, y, mask, 1.0)
    assert (float(a[1, 0]), float(b[1, 0])) == (1.0, 0.0) and float(a[0, 0]) != 1.0
    torch.testing.assert_close(apply_affine_calibration(p.float(), a, b),
                               (p * a + b).float())
    with pytest.raises(ValueError, match="shrinkage"):
        fit_affine_calibration(p, y, None, 0.0)
    with pytest.raises(ValueError, match="same shape|one shape"):
        fit_affine_calibration(p, y[:3], None, 1.0)
    with pytest.raises(ValueError, match=r"\[n, c\]"):
        apply_affine_calibration(p, a[:1], b)


# =========================================================================== the shared adapt path
@pytest.fixture(scope="module")
def target(melb):
    return target_task(melb, 3, tiny_config())


def test_the_learning_rate_grid_keeps_the_best_on_validation_and_is_deterministic(target):
    net, rates = build_linear(tiny_config()), []

    def fit(cfg):
        rates.append(cfg.finetune_lr)
        return finetune(net, target, cfg, 0, progress=False)

    cfg = tiny_config(finetune_lr_grid=[1e-4, 3e-1, 1e-2], finetune_epochs=2)
    adapted = adapt_to_target(target, cfg, fit, net)
    assert rates == [1e-4, 3e-1, 1e-2]  # one fine-tuning per rate, in the given order
    tried = adapted.info["finetune_lr_val_rmse"]
    assert [t["lr"] for t in tried] == [1e-4, 3e-1, 1e-2]
    best = min(tried, key=lambda t: t["val_rmse"])  # ties: the first
    assert adapted.info["finetune_lr"] == best["lr"]
    for t in tried:  # each candidate is the run with that one rate, from the same start
        alone = adapt_to_target(target, dataclasses.replace(cfg, finetune_lr_grid=[],
                                                            finetune_lr=t["lr"]), fit, net)
        assert "finetune_lr_val_rmse" not in alone.info and alone.info["finetune_lr"] == t["lr"]
        pred, y, mask = alone.predict(target, "val", "cpu")
        assert original_rmse(target, pred, y, mask) == t["val_rmse"]
        if t["lr"] == best["lr"]:
            for k, v in alone.net.state_dict().items():
                assert torch.equal(v, adapted.net.state_dict()[k])
    again = adapt_to_target(target, cfg, fit, net)
    assert again.info == adapted.info


def test_target_only_trains_with_the_same_grid(target):
    cfg = tiny_config(finetune_lr_grid=[1e-3, 1e-2])
    fc = get_method("target-only").adapt(None, target, cfg, 0, None, False)
    assert [t["lr"] for t in fc.info["finetune_lr_val_rmse"]] == [1e-3, 1e-2]
    assert fc.info["finetune_lr"] in (1e-3, 1e-2) and "best_epoch" in fc.info


class _Biased(nn.Module):
    """Persistence, shrunk and shifted: a per-region affine map can undo it."""

    def forward(self, x, **graph):
        return 0.5 * x[:, -1:, :, :1] + 0.1


def test_calibration_is_fitted_on_training_windows_and_auto_keeps_it_only_if_val_improves(target):
    biased = _Biased()
    fit = lambda cfg: (biased, FitResult(0.0, 0, 0, 0.0))  # noqa: E731
    affine = adapt_to_target(target, tiny_config(calibrate="affine", calibrate_shrinkage=3.0),
                             fit, biased)
    pred, y, mask = predict(biased, target, "train", "cpu")
    assert pred.shape[0] == len(target.dataset("train"))  # every training window counts
    a, b = fit_affine_calibration(pred, y, mask, 3.0)
    assert affine.calibration is not None and affine.info["calibrated"] is True
    torch.testing.assert_close(affine.calibration[0], a)
    torch.testing.assert_close(affine.calibration[1], b)
    raw = predict(biased, target, "test", "cpu")[0]
    torch.testing.assert_close(affine.predict(target, "test", "cpu")[0],
                               apply_affine_calibration(raw, a, b))
    info = affine.info
    assert info["val_rmse_calibrated"] < info["val_rmse_uncalibrated"]
    auto = adapt_to_target(target, tiny_config(calibrate="auto"), fit, biased)
    assert auto.info["calibrated"] is True and auto.calibration is not None
    # a calibration that hurts persistence: the training steps shuffled in time (the last
    # value no longer predicts the next), validation as is
    hurt = dataclasses.replace(target, scaled=target.scaled.copy())
    tr = hurt.split.train
    hurt.scaled[tr] = hurt.scaled[tr][np.random.default_rng(0).permutation(tr.stop - tr.start)]
    persistence = build_linear(tiny_config())  # zero init: the last value
    worse = adapt_to_target(hurt, tiny_config(calibrate="auto", calibrate_shrinkage=1e-3),
                            lambda cfg: (persistence, FitResult(0.0, 0, 0, 0.0)), persistence)
    assert worse.info["val_rmse_calibrated"] > worse.info["val_rmse_uncalibrated"]
    assert worse.info["calibrated"] is False and worse.calibration is None
    none = adapt_to_target(target, tiny_config(), fit, biased)
    assert "calibrated" not in none.info and none.calibration is None


def test_zero_shot_has_no_calibration_and_says_so(melb):
    zero = target_task(melb, 0, tiny_config())
    net = build_linear(tiny_config())
    adapted = adapt_to_target(zero, tiny_config(calibrate="auto", finetune_lr_grid=[1e-3, 1e-2]),
                              lambda cfg: pytest.fail("zero-shot must not train"), net)
    assert adapted.calibration is None and adapted.info["calibrated"] is False
    assert "zero-shot" in adapted.info["calibration"]


@pytest.mark.parametrize("method", ["stbat", "finetune", "maml", "linear", "target-only"])
def test_every_deep_method_adapts_through_the_one_shared_path(method, target, monkeypatch):
    seen = []

    def spy(task, config, fit, net=None):
        seen.append((task, config))
        return Adapted(net if net is not None else build_linear(config), None,
                       {"spy": True, "finetune_best_epoch": 0})

    monkeypatch.setattr(method_registry, "adapt_to_target", spy)
    cfg = tiny_config(calibrate="auto")
    spec = get_method(method)
    fc = spec.adapt(build_linear(cfg) if spec.pretrains else None, target, cfg, 0, None, False)
    assert len(seen) == 1 and seen[0][0] is target and seen[0][1] is cfg
    assert fc.info["spy"] is True and "val_rmse" in fc.info


def test_a_transfer_with_every_new_option_writes_what_it_chose(target):
    cfg = tiny_config(scaler="log1p", lag_days=[1], calibrate="auto",
                      finetune_lr_grid=[1e-3, 1e-2], source_span="2019-03-18:2019-03-31")
    src = api.prepare_sources(TINY, ["nyc_taxi"], cfg)
    targets = {3: target_task(target.city, 3, cfg), 0: target_task(target.city, 0, cfg)}
    rows = api.run_method("linear", 0, src, targets, cfg, progress=False)
    few = [r for r in rows if r["train_days"] == 3]
    zero = [r for r in rows if r["train_days"] == 0]
    assert few and zero and all(math.isfinite(r["rmse"]) for r in rows)
    info = few[0]["info"]
    assert info["finetune_lr"] in (1e-3, 1e-2) and len(info["finetune_lr_val_rmse"]) == 2
    assert isinstance(info["calibrated"], bool)
    kept = info["val_rmse_calibrated"] if info["calibrated"] else info["val_rmse_uncalibrated"]
    assert info["val_rmse"] == pytest.approx(kept)
    assert zero[0]["info"]["calibrated"] is False


# =========================================================================== experiment cache
def test_adaptation_only_variants_share_one_cached_pre_training(tmp_path, monkeypatch):
    spec_text = (f'[experiment]\nname = "cache"\ndata_dir = "{TINY}"\nmethods = ["linear"]\n'
                 "train_days = [3]\nseeds = [0]\n"
                 "[defaults]\nval_days = 3\ntest_days = 4\nmax_epochs = 1\nfinetune_epochs = 1\n"
                 'max_batches_per_epoch = 2\nbatch_size = 8\nsource_span = "2019-03-25:2019-03-31"\n'
                 '[grid]\nscaler = ["minmax", "log1p"]\ncalibrate = ["none", "auto"]\n'
                 "finetune_lr_grid = [[], [1e-3, 1e-2]]\n"
                 f'[[task]]\nname = "t"\nsources = ["nyc_taxi"]\ntarget = "{MELB}"\n')
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(spec_text)
    units = plan(load_spec(spec_path))
    assert len(units) == 8
    names = {u.cache_name for u in units}
    assert names == {"t__scaler=minmax__linear__seed0.pt", "t__scaler=log1p__linear__seed0.pt"}
    lagged = dataclasses.replace(units[0], variant=dataclasses.replace(
        units[0].variant, label="lag_days=[1]", options={"lag_days": [1]}))
    assert lagged.cache_name not in names  # an input change is another pre-training
    calls = []
    real = api._pretrain
    monkeypatch.setattr(api, "_pretrain", lambda *a, **kw: calls.append(a[0]) or real(*a, **kw))
    summary = run_experiment(spec_path, tmp_path / "out")
    assert summary.units_run == 8 and calls == ["linear", "linear"]  # one per scaler
    assert sorted(p.name for p in (tmp_path / "out" / "cache").iterdir()) == sorted(names)


def test_stbat_adapt_goes_through_the_shared_path_and_scores_the_calibrated_forecast(
        tmp_path, monkeypatch):
    cfg = tiny_config(calibrate="affine", calibrate_shrinkage=1.0)
    path = save_checkpoint(tmp_path / "m.ckpt", build_linear(cfg).state_dict(), config=cfg,
                           method="linear", data={})
    seen, real = [], api.adapt_to_target
    monkeypatch.setattr(api, "adapt_to_target",
                        lambda *a, **kw: seen.append(a[1]) or real(*a, **kw))
    calibrated = api.adapt(path, TINY, MELB, 3, config=cfg, progress=False)
    plain = api.adapt(path, TINY, MELB, 3, config=dataclasses.replace(cfg, calibrate="none"),
                      progress=False)
    assert [c.calibrate for c in seen] == ["affine", "none"]
    assert calibrated["mean"]["rmse"] != plain["mean"]["rmse"]  # the calibration is scored
