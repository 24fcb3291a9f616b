"""NaN/inf never spreads: a non-finite loss is never stepped on.

``train_iteration`` checks every loss term before any optimiser step: on NaN or inf it
raises :class:`NonFiniteLossError` naming the term and the cause (the batch's data, or a
diverging model), or, with ``on_nonfinite="skip"``, skips the step. Either way the
parameters and the RIAM imbalance state are exactly what they were. Masked-out targets
take no part in the loss, and metrics are never written as NaN.
"""

from __future__ import annotations

import copy

import pytest
import torch

from stbat_plugin._registry import create_backbone
from stbat_plugin.pipeline import api
from stbat_plugin.pipeline.trainer import Trainer
from stbat_plugin.wrapper import BalancedTransfer, NonFiniteLossError

N, K = 7, 5


def _model(seed: int = 0) -> BalancedTransfer:
    torch.manual_seed(seed)
    backbone = create_backbone("graph_stnet", in_channels=1, channels=8, hidden=8)
    model = BalancedTransfer(backbone, region_features={"a": torch.rand(N, K) + 0.1},
                             horizon=1, out_channels=1)
    return model


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 6, N, 1, generator=g)
    y = torch.rand(4, 1, N, 1, generator=g)
    ring = torch.arange(N)
    edge_index = torch.stack([ring, (ring + 1) % N])
    return x, y, edge_index


def _snapshot(model: BalancedTransfer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _primed(model: BalancedTransfer, opts) -> None:
    x, y, ei = _batch(5)
    model.train_iteration(x, y, opts, edge_index=ei)  # the RIAM state exists and is finite


@pytest.mark.parametrize("poison, words", [
    (float("nan"), ["x", "NaN or inf", "data"]),
    (float("inf"), ["x", "NaN or inf", "data"]),
])
def test_non_finite_input_raises_naming_the_data_and_changes_nothing(poison, words):
    model = _model()
    opts = model.configure_optimizers()
    _primed(model, opts)
    before, opt_before = _snapshot(model), copy.deepcopy([o.state_dict() for o in opts])
    x, y, ei = _batch()
    x[0, 2, 3, 0] = poison
    with pytest.raises(NonFiniteLossError) as err:
        model.train_iteration(x, y, opts, edge_index=ei)
    for word in words:
        assert word in str(err.value)
    assert "prediction loss" in str(err.value) or "SimDCL loss" in str(err.value)
    assert _same(before, _snapshot(model))
    assert [o.state_dict()["state"].keys() for o in opts] == \
        [o["state"].keys() for o in opt_before]


def test_huge_input_never_writes_nan_into_the_model():
    """1e30 inputs: either the losses stay finite and so do the parameters, or the step is
    refused with the size named and nothing changes."""
    model = _model()
    opts = model.configure_optimizers()
    _primed(model, opts)
    before = _snapshot(model)
    x, y, ei = _batch()
    x[1] = 1e30
    try:
        losses = model.train_iteration(x, y, opts, edge_index=ei)
    except NonFiniteLossError as err:
        assert "1e+30" in str(err)
        assert _same(before, _snapshot(model))
    else:
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.as_dict().values())
        assert all(bool(torch.isfinite(v).all()) for v in _snapshot(model).values()
                   if v.is_floating_point())


def test_skip_mode_skips_and_changes_nothing():
    model = _model()
    opts = model.configure_optimizers()
    _primed(model, opts)
    before = _snapshot(model)
    x, y, ei = _batch()
    y[0, 0, 0, 0] = float("nan")
    losses = model.train_iteration(x, y, opts, edge_index=ei, on_nonfinite="skip")
    assert losses.skipped == 1.0 and losses.as_dict()["skipped"] == 1.0
    assert _same(before, _snapshot(model))
    x, y, ei = _batch()
    assert "skipped" not in model.train_iteration(x, y, opts, edge_index=ei).as_dict()


def test_nan_target_in_a_masked_out_cell_does_not_poison_the_step():
    model, twin = _model(), _model()
    x, y, ei = _batch()
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[0, 0, 2, 0] = False
    y_bad = y.clone()
    y_bad[0, 0, 2, 0] = float("nan")
    a = model.train_iteration(x, y_bad, model.configure_optimizers(), mask=mask, edge_index=ei)
    b = twin.train_iteration(x, y, twin.configure_optimizers(), mask=mask, edge_index=ei)
    assert a == b
    assert _same(_snapshot(model), _snapshot(twin))


def test_diverging_model_is_named_as_the_cause():
    model = _model()
    opts = model.configure_optimizers()
    with torch.no_grad():
        for p in model.net.head.parameters():
            p.fill_(float("inf"))
    x, y, ei = _batch()
    with pytest.raises(NonFiniteLossError, match="diverged.*lower --lr"):
        model.train_iteration(x, y, opts, edge_index=ei)


def test_riam_state_is_never_overwritten_with_nan():
    model = _model()
    opts = model.configure_optimizers()
    _primed(model, opts)
    state = model.cities["a"]
    density = state.log_density.clone()
    with torch.no_grad():
        next(model.riam.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="RIAM"):
        model.refresh_imbalance("a")
    assert torch.equal(state.log_density, density)


def test_on_nonfinite_must_be_raise_or_skip():
    model = _model()
    x, y, ei = _batch()
    with pytest.raises(ValueError, match="raise.*skip"):
        model.train_iteration(x, y, model.configure_optimizers(), edge_index=ei,
                              on_nonfinite="ignore")


def test_trainer_counts_skipped_steps_and_refuses_an_all_skipped_epoch():
    net = torch.nn.Linear(1, 1)
    steps = iter([{"skipped": 1.0}, {"total": 1.0}, {"skipped": 1.0}])
    fit = Trainer(max_epochs=1, progress=False).fit(net, lambda: range(3), lambda b: next(steps),
                                                     lambda: 1.0)
    assert fit.history[1]["skipped"] == 2.0 and fit.history[1]["total"] == 1.0
    with pytest.raises(FloatingPointError, match="every step"):
        Trainer(max_epochs=1, progress=False).fit(net, lambda: range(2),
                                                  lambda b: {"skipped": 1.0}, lambda: 1.0)


def test_nan_forecast_is_an_error_naming_method_and_seed():
    fc = type("F", (), {})()
    fc.pred = torch.full((3, 1, 4, 1), float("nan"))
    fc.target = torch.ones(3, 1, 4, 1)
    fc.mask = torch.ones(3, 1, 4, 1, dtype=torch.bool)
    with pytest.raises(FloatingPointError, match="method 'finetune', seed 3"):
        api.evaluate_forecast(fc, ["flow"], "method 'finetune', seed 3")


def test_metrics_are_never_written_as_nan(tmp_path):
    """Results files are strict JSON: a NaN metric is refused and nothing is written."""
    from stbat_plugin.pipeline.results import append_rows, write_results

    rows = [{"method": "ha", "sources": "a", "target": "b", "train_days": 3, "channel": "mean",
             "seed": 0, "rmse": float("nan"), "mae": 0.5}]
    with pytest.raises(FloatingPointError, match="NaN"):
        write_results(rows, tmp_path)
    with pytest.raises(FloatingPointError, match="NaN"):
        append_rows(tmp_path / "results.jsonl", rows)
    assert list(tmp_path.iterdir()) == []
