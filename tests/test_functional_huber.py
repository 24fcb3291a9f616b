"""``huber_delta`` of the prediction loss (Eq. 15 with a Huber loss), held against a naive twin,
and the option it is in ``STBaTOptions``, the wrapper and the ``stbat`` flags."""

from __future__ import annotations

import pytest
import torch

from stbat_plugin import BalancedTransfer, STBaTOptions
from stbat_plugin import functional as SF
from stbat_plugin.pipeline.cli import _config, build_parser

F64 = torch.float64


def naive_huber_loss(pred, target, weights, mask, delta):
    """Eq. 15 with l(e) = e^2 / 2 if |e| < delta else delta (|e| - delta / 2), a loop."""
    b, s, n, c = pred.shape
    total, count = 0.0, 0
    for ib in range(b):
        for js in range(s):
            for r in range(n):
                for kc in range(c):
                    if not bool(mask[ib, js, r, kc]):
                        continue
                    e = pred[ib, js, r, kc] - target[ib, js, r, kc]
                    loss = 0.5 * e**2 if torch.abs(e) < delta else delta * (torch.abs(e) - 0.5 * delta)
                    total = total + weights[r] * loss
                    count += 1
    return total / count


@pytest.mark.parametrize("delta", [0.05, 0.3, 1.0, 4.0])
def test_huber_delta_matches_the_naive_loop_with_gradients(delta):
    gen = torch.Generator().manual_seed(7)
    pred = torch.randn(3, 2, 5, 2, generator=gen, dtype=F64).requires_grad_(True)
    target = torch.randn(3, 2, 5, 2, generator=gen, dtype=F64)
    weights = torch.rand(5, generator=gen, dtype=F64) * 2
    mask = torch.rand(3, 2, 5, 2, generator=gen) > 0.3
    fast = SF.weighted_prediction_loss(pred, target, weights, mask, loss="huber",
                                       huber_delta=delta)
    naive = naive_huber_loss(pred, target, weights, mask, delta)
    assert torch.allclose(fast, naive, rtol=1e-10)
    (g_fast,) = torch.autograd.grad(fast, pred)
    (g_naive,) = torch.autograd.grad(naive, pred)
    assert torch.allclose(g_fast, g_naive, rtol=1e-10)


def test_the_default_delta_is_the_previous_huber_loss():
    gen = torch.Generator().manual_seed(8)
    pred, target = torch.randn(2, 1, 4, 1, generator=gen), torch.randn(2, 1, 4, 1, generator=gen)
    assert torch.equal(SF.weighted_prediction_loss(pred, target, loss="huber"),
                       torch.nn.functional.huber_loss(pred, target))


@pytest.mark.parametrize("delta", [0.0, -1.0, float("nan")])
def test_a_bad_delta_is_refused_by_the_loss_and_the_options(delta):
    x = torch.zeros(1, 1, 2, 1)
    with pytest.raises(ValueError, match="huber_delta must be a finite number > 0"):
        SF.weighted_prediction_loss(x, x, loss="huber", huber_delta=delta)
    with pytest.raises(ValueError, match="huber_delta must be a finite number > 0"):
        STBaTOptions(loss="huber", huber_delta=delta)


def test_the_wrapper_uses_it_and_the_cli_has_its_flag(registry, nyc_taxi, monkeypatch):
    seen = []
    loss = SF.weighted_prediction_loss
    monkeypatch.setattr(SF, "weighted_prediction_loss",
                        lambda *a, **kw: seen.append(kw) or loss(*a, **kw))
    model = BalancedTransfer(registry.create("graph_stnet", in_channels=2, channels=8, hidden=16),
                             region_features=nyc_taxi.poi, out_channels=2, registry=registry,
                             loss="huber", huber_delta=0.1)
    model.train_iteration(*nyc_taxi.batch(0, 8), model.configure_optimizers(),
                          edge_index=nyc_taxi.edge_index)
    assert seen[0]["loss"] == "huber" and seen[0]["huber_delta"] == 0.1
    args = build_parser().parse_args(["transfer", "--data-dir", "d", "--source", "a", "--target",
                                      "b", "--out", "o", "--loss", "huber", "--huber-delta",
                                      "0.1"])
    assert _config(args).stbat.huber_delta == 0.1
