"""RIAM (Sec. 4.1) and ``BalancedTransfer`` (Sec. 4.2-4.3) on the real tiny NYC taxi data."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from stbat_plugin import RIAM, BalancedTransfer, Losses, PredictionNetwork
from stbat_plugin import functional as SF
from stbat_plugin.riam import normalize_descriptors

# graph ST-net, narrower than the paper's 64/128 so that the suite stays fast on 2 cores
SMALL = {"in_channels": 2, "channels": 8, "hidden": 16}
BATCH = 8


def make_model(registry, region_features=None, **kwargs) -> BalancedTransfer:
    kwargs = {"out_channels": 2, "predictor_hidden": 32, "projector_dim": 32, **kwargs}
    backbone = registry.create("graph_stnet", **SMALL)
    return BalancedTransfer(backbone, region_features=region_features, registry=registry,
                            **kwargs)


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def changed(before, params) -> list[bool]:
    return [not torch.equal(b, p.detach()) for b, p in zip(before, params, strict=True)]


@pytest.fixture
def taxi_model(registry, nyc_taxi):
    torch.manual_seed(0)
    return make_model(registry, nyc_taxi.poi)


# =========================================================================== RIAM
def test_riam_dimensions_follow_the_paper():
    k, feature_dim = 14, 128
    riam = RIAM(k, feature_dim)
    linears = lambda block: [(m.in_features, m.out_features)  # noqa: E731
                             for m in block if isinstance(m, torch.nn.Linear)]
    assert linears(riam.encoder) == [(14, 16), (16, 32)]  # Eq. 1, K -> 16 -> 32
    assert linears(riam.poi_classifier) == [(32, 32), (32, 14)]  # Eq. 3
    assert linears(riam.fdp_mu) == [(32, 32), (32, 128)]  # Eq. 4
    assert linears(riam.fdp_sigma) == [(32, 32), (32, 128)]
    for block in (riam.encoder, riam.poi_classifier, riam.fdp_mu):
        assert isinstance(block[1], torch.nn.ReLU)
    assert riam(torch.rand(5, k)).shape == (5, 32)


def test_riam_poi_term_is_cross_entropy_against_softmax():
    torch.manual_seed(1)
    riam = RIAM(6, 4).double()
    p = normalize_descriptors(torch.rand(5, 6, dtype=torch.float64))
    _, parts = riam.loss(p, torch.zeros(5, 4, dtype=torch.float64),
                         torch.ones(5, 4, dtype=torch.float64), beta=0.0)
    logits = riam.poi_classifier(riam(p))
    expected = 0.0
    for r in range(5):
        p_hat = torch.exp(logits[r]) / torch.exp(logits[r]).sum()  # Eq. 3 softmax
        expected = expected - sum(p[r, k] * torch.log(p_hat[k]) for k in range(6))
    assert torch.allclose(parts["poi_ce"], expected / 5, rtol=1e-10)
    # cross-entropy is at least the entropy of the POI distribution (Gibbs)
    entropy = -(p * p.log()).sum(-1).mean()
    assert parts["poi_ce"] >= entropy


@pytest.mark.parametrize("sigma_bias", [-1e4, -3.0, 0.0, 2.0])
def test_riam_sigma_hat_is_positive_and_kld_matches_the_paper(sigma_bias):
    riam = RIAM(3, 4).double()
    with torch.no_grad():  # decoder heads output constants: mu_hat = 0.5, sigma_hat from bias
        for head, bias in ((riam.fdp_mu, 0.5), (riam.fdp_sigma, sigma_bias)):
            head[2].weight.zero_()
            head[2].bias.fill_(bias)
    p = normalize_descriptors(torch.rand(2, 3, dtype=torch.float64))
    mu = torch.tensor([[0.0, 1.0, -1.0, 0.5]] * 2, dtype=torch.float64)
    sigma = torch.tensor([[1.0, 0.5, 2.0, 0.1]] * 2, dtype=torch.float64)
    total, parts = riam.loss(p, mu, sigma, beta=0.25)
    sigma_hat = math.log1p(math.exp(sigma_bias)) + riam.min_sigma  # softplus(.) + floor > 0
    assert sigma_hat > 0
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(torch.full_like(mu, 0.5), torch.full_like(mu, sigma_hat)),
        torch.distributions.Normal(mu, sigma),
    ).sum(-1).mean()
    assert torch.isfinite(parts["kld"])
    assert torch.allclose(parts["kld"], expected, rtol=1e-9)
    assert torch.allclose(total, parts["poi_ce"] + 0.25 * parts["kld"])


def test_riam_fdp_needs_feature_statistics():
    with pytest.raises(ValueError, match="mu and sigma"):
        RIAM(3, 4).loss(torch.full((2, 3), 1 / 3), None, None, beta=1.0)


def test_normalize_descriptors():
    p = normalize_descriptors(torch.tensor([[1.0, 3.0], [0.0, 0.0]]))
    assert torch.allclose(p, torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="non-negative"):
        normalize_descriptors(torch.tensor([[1.0, -1.0]]))


# =========================================================================== forward, losses
def test_forward_shape_on_real_data(registry, nyc_taxi):
    model = make_model(registry, nyc_taxi.poi, horizon=3)
    x, _ = nyc_taxi.batch(0, BATCH)
    out = model(x, edge_index=nyc_taxi.edge_index)
    assert out.shape == (BATCH, 3, nyc_taxi.n, 2)
    assert torch.isfinite(out).all()


def test_train_iteration_reports_every_term(taxi_model, nyc_taxi):
    x, y = nyc_taxi.batch(0, BATCH)
    losses = taxi_model.train_iteration(x, y, taxi_model.configure_optimizers(),
                                        edge_index=nyc_taxi.edge_index)
    assert isinstance(losses, Losses)
    values = losses.as_dict()
    assert set(values) == {"total", "pred", "simdcl", "emb", "poi_ce", "kld"}
    assert all(math.isfinite(v) and v > 0 for v in values.values()), values
    assert losses.total == pytest.approx(losses.pred + taxi_model.simdcl_weight * losses.simdcl,
                                         rel=1e-5)
    assert losses.emb == pytest.approx(losses.poi_ce + taxi_model.beta * losses.kld, rel=1e-5)


def test_constant_region_gives_finite_gradients(registry, nyc_taxi):
    """Regions 18 and 19 have no flow and no neighbours: their features never vary (sigma=0)."""
    model = make_model(registry, nyc_taxi.poi)
    x, y = nyc_taxi.batch(0, BATCH)
    model.refresh_imbalance()
    loss, _, (mu, sigma) = model.stblm_loss(x, y, state=model.cities["default"],
                                            edge_index=nyc_taxi.edge_index)
    assert (sigma[[18, 19]] < 1e-6).all()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.stblm_parameters())
    emb, parts = model.riam_loss(model.cities["default"], mu, sigma)
    assert torch.isfinite(emb) and torch.isfinite(parts["kld"])


# =========================================================================== Sec. 4.3
def test_bidirectional_step_order_and_detached_statistics(taxi_model, nyc_taxi):
    """Step 1 = grad of the STBLM loss only; step 2 = grad of L_emb only, from detached stats."""
    model, ei = taxi_model, nyc_taxi.edge_index
    x, y = nyc_taxi.batch(40, BATCH)
    opts = model.configure_optimizers(lr=1e-2)
    model.refresh_imbalance()
    ref = copy.deepcopy(model)
    state = ref.cities["default"]

    loss, _, (mu, sigma) = ref.stblm_loss(x, y, state=state, edge_index=ei)
    assert not mu.requires_grad and not sigma.requires_grad
    loss.backward()
    assert all(p.grad is None for p in ref.riam_parameters()), "step 1 reached RIAM"
    step1 = {name: p.grad.clone() for name, p in ref.named_parameters() if p.grad is not None}
    assert set(step1) == {f"net.{k}" for k, _ in ref.net.named_parameters()} | \
        {f"projector.{k}" for k, _ in ref.projector.named_parameters()}

    emb, _ = ref.riam_loss(state, mu, sigma)
    emb.backward()
    for name, p in ref.named_parameters():  # L_emb added nothing to the STBLM gradients
        if name in step1:
            assert torch.equal(p.grad, step1[name]), name
    step2 = {name: p.grad.clone() for name, p in ref.named_parameters() if name.startswith("riam.")}

    stblm_before = snapshot(model.stblm_parameters())
    riam_before = snapshot(model.riam_parameters())
    model.train_iteration(x, y, opts, edge_index=ei)
    for name, p in model.named_parameters():
        expected = step1.get(name, step2.get(name))
        assert p.grad is not None and torch.allclose(p.grad, expected, rtol=1e-4, atol=1e-7), name
    assert all(changed(stblm_before, model.stblm_parameters()))
    assert any(changed(riam_before, model.riam_parameters()))


@pytest.mark.parametrize("frozen", ["riam", "stblm"])
def test_each_step_updates_only_its_own_parameters(taxi_model, nyc_taxi, frozen):
    model = taxi_model
    stblm = torch.optim.Adam(model.stblm_parameters(), lr=0.0 if frozen == "stblm" else 1e-2)
    riam = torch.optim.Adam(model.riam_parameters(), lr=0.0 if frozen == "riam" else 1e-2)
    stblm_before = snapshot(model.stblm_parameters())
    riam_before = snapshot(model.riam_parameters())
    x, y = nyc_taxi.batch(0, BATCH)
    model.train_iteration(x, y, (stblm, riam), edge_index=nyc_taxi.edge_index)
    stblm_changed = changed(stblm_before, model.stblm_parameters())
    riam_changed = changed(riam_before, model.riam_parameters())
    if frozen == "riam":
        assert not any(riam_changed) and any(stblm_changed)
    else:
        assert not any(stblm_changed) and any(riam_changed)
    assert {id(p) for p in model.stblm_parameters()}.isdisjoint(
        id(p) for p in model.riam_parameters())
    assert len(model.stblm_parameters()) + len(model.riam_parameters()) == \
        len(list(model.parameters()))


def test_imbalance_refreshed_after_riam_step(taxi_model, nyc_taxi):
    model = taxi_model
    state = model.cities["default"]
    model.refresh_imbalance()
    log_density, delta = state.log_density.clone(), state.delta.clone()
    x, y = nyc_taxi.batch(0, BATCH)
    model.train_iteration(x, y, model.configure_optimizers(lr=1e-2),
                          edge_index=nyc_taxi.edge_index)
    assert not torch.equal(state.log_density, log_density)
    assert not torch.equal(state.delta, delta)
    with torch.no_grad():
        phi = model.riam(state.descriptors)
        assert torch.allclose(state.log_density, SF.kde_log_density(phi, model.bandwidth))
        assert torch.allclose(state.delta, SF.pattern_similarity(phi))
    assert torch.allclose(model.city_weights(), SF.density_weights(state.log_density))


def test_float64_model_keeps_float64_weights(registry, nyc_taxi):
    model = make_model(registry, nyc_taxi.poi).double()
    weights = model.city_weights()
    assert weights.dtype == torch.float64
    assert torch.equal(weights, SF.density_weights(model.cities["default"].log_density))
    x, y = nyc_taxi.batch(0, BATCH)
    losses = model.train_iteration(x.double(), y.double(), model.configure_optimizers(),
                                   edge_index=nyc_taxi.edge_index)
    assert all(math.isfinite(v) for v in losses.as_dict().values())


# =========================================================================== ablations
def _forbid(monkeypatch, *names):
    for name in names:
        def boom(*_a, _name=name, **_k):
            raise AssertionError(f"{_name} was computed although switched off")
        monkeypatch.setattr(SF, name, boom)


def test_without_simdcl(registry, nyc_taxi, monkeypatch):
    model = make_model(registry, nyc_taxi.poi, use_simdcl=False)
    assert model.projector is None
    assert all(not n.startswith("projector") for n, _ in model.named_parameters())
    _forbid(monkeypatch, "simdcl_loss", "pattern_similarity")
    x, y = nyc_taxi.batch(0, BATCH)
    losses = model.train_iteration(x, y, model.configure_optimizers(),
                                   edge_index=nyc_taxi.edge_index)
    assert losses.simdcl == 0.0 and losses.total == pytest.approx(losses.pred)
    assert losses.kld > 0 and losses.poi_ce > 0
    assert (model.cities["default"].delta == 0).all()


def test_without_poi(registry, nyc_taxi):
    model = make_model(registry, nyc_taxi.poi, use_poi=False)
    assert model.riam.poi_classifier is None
    x, y = nyc_taxi.batch(0, BATCH)
    losses = model.train_iteration(x, y, model.configure_optimizers(),
                                   edge_index=nyc_taxi.edge_index)
    assert losses.poi_ce == 0.0 and losses.kld > 0
    assert losses.emb == pytest.approx(model.beta * losses.kld, rel=1e-5)


def test_without_fdp(registry, nyc_taxi):
    model = make_model(registry, nyc_taxi.poi, use_fdp=False)
    assert model.riam.fdp_mu is None and model.riam.fdp_sigma is None
    x, y = nyc_taxi.batch(0, BATCH)
    losses = model.train_iteration(x, y, model.configure_optimizers(),
                                   edge_index=nyc_taxi.edge_index)
    assert losses.kld == 0.0 and losses.poi_ce > 0
    assert losses.emb == pytest.approx(losses.poi_ce, rel=1e-6)


def test_without_poi_and_fdp_riam_is_not_trained(registry, nyc_taxi):
    model = make_model(registry, nyc_taxi.poi, use_poi=False, use_fdp=False)
    assert not model.riam.trainable
    opts = model.configure_optimizers()
    assert len(opts) == 1
    before = snapshot(model.riam_parameters())
    x, y = nyc_taxi.batch(0, BATCH)
    losses = model.train_iteration(x, y, opts, edge_index=nyc_taxi.edge_index)
    assert losses.emb == losses.poi_ce == losses.kld == 0.0 and losses.simdcl > 0
    assert not any(changed(before, model.riam_parameters()))


def test_without_weighted_loss(registry, nyc_taxi, monkeypatch):
    model = make_model(registry, nyc_taxi.poi, use_weighted_loss=False)
    _forbid(monkeypatch, "kde_log_density", "density_weights")
    x, y = nyc_taxi.batch(0, BATCH)
    model.refresh_imbalance()
    _, parts, _ = model.stblm_loss(x, y, state=model.cities["default"],
                                   edge_index=nyc_taxi.edge_index)
    with torch.no_grad():
        plain = SF.weighted_prediction_loss(model(x, edge_index=nyc_taxi.edge_index), y, None)
    assert torch.allclose(parts["pred"], plain)
    losses = model.train_iteration(x, y, model.configure_optimizers(),
                                   edge_index=nyc_taxi.edge_index)
    assert losses.simdcl > 0
    assert (model.cities["default"].log_density == 0).all()


def test_weighted_loss_uses_density_weights(taxi_model, nyc_taxi):
    model = taxi_model
    x, y = nyc_taxi.batch(0, BATCH)
    model.refresh_imbalance()
    _, parts, _ = model.stblm_loss(x, y, state=model.cities["default"],
                                   edge_index=nyc_taxi.edge_index)
    with torch.no_grad():
        pred = model(x, edge_index=nyc_taxi.edge_index)
        weights = SF.density_weights(model.cities["default"].log_density)
        assert not torch.allclose(weights, torch.ones_like(weights))
        assert torch.allclose(parts["pred"], SF.weighted_prediction_loss(pred, y, weights))
        assert not torch.allclose(parts["pred"], SF.weighted_prediction_loss(pred, y))


def test_without_simdcl_and_weighted_loss_no_riam(registry, nyc_taxi, monkeypatch):
    model = make_model(registry, None, use_simdcl=False, use_weighted_loss=False)
    assert model.riam is None and model.projector is None and len(model.cities) == 0
    _forbid(monkeypatch, "region_feature_stats", "kde_log_density", "pattern_similarity",
            "simdcl_loss")
    opts = model.configure_optimizers()
    assert len(opts) == 1
    x, y = nyc_taxi.batch(0, BATCH)
    losses = model.train_iteration(x, y, opts, edge_index=nyc_taxi.edge_index)
    assert losses.simdcl == losses.emb == losses.poi_ce == losses.kld == 0.0
    assert losses.total == pytest.approx(losses.pred)


# =========================================================================== cities
@pytest.fixture
def two_cities(registry, nyc_taxi):
    subset = torch.randperm(nyc_taxi.n, generator=torch.Generator().manual_seed(3))[:40]
    torch.manual_seed(0)
    model = make_model(registry, {"A": nyc_taxi.poi, "B": nyc_taxi.poi[subset]})
    return model, subset


def test_multi_city_shares_riam_and_keeps_imbalance_per_city(two_cities, nyc_taxi):
    model, subset = two_cities
    assert set(model.cities) == {"A", "B"}
    assert sum(isinstance(m, RIAM) for m in model.modules()) == 1
    a, b = model.cities["A"], model.cities["B"]
    model.refresh_imbalance("A")
    model.refresh_imbalance("B")
    assert a.delta.shape == (69, 69) and b.delta.shape == (40, 40)
    with torch.no_grad():
        phi_b = model.riam(normalize_descriptors(nyc_taxi.poi[subset]))
    # density and similarity of B are computed among B's regions only
    assert torch.allclose(b.log_density, SF.kde_log_density(phi_b, model.bandwidth))
    assert torch.allclose(b.delta, a.delta[subset][:, subset])  # cosine is pairwise
    assert not torch.allclose(b.log_density, a.log_density[subset])
    assert model.city_weights("B").sum().item() == pytest.approx(40, rel=1e-5)


def test_multi_city_weights_do_not_leak_across_cities(two_cities):
    model, _ = two_cities
    weights_a, weights_b = model.city_weights("A"), model.city_weights("B")
    a = model.cities["A"]
    gen = torch.Generator().manual_seed(4)
    a.descriptors.copy_(normalize_descriptors(torch.rand(a.descriptors.shape, generator=gen)))
    assert torch.equal(model.city_weights("B"), weights_b)
    assert not torch.allclose(model.city_weights("A"), weights_a)


def test_multi_city_training_alternates_cities(two_cities, nyc_taxi, monkeypatch):
    model, subset = two_cities
    opts = model.configure_optimizers()
    seen = []
    simdcl = SF.simdcl_loss
    monkeypatch.setattr(SF, "simdcl_loss",
                        lambda d, delta, tau: seen.append(d.shape[0]) or simdcl(d, delta, tau))
    xa, ya = nyc_taxi.batch(0, BATCH)
    xb, yb = nyc_taxi.batch(0, BATCH, regions=subset)
    la = model.train_iteration(xa, ya, opts, city="A", edge_index=nyc_taxi.edge_index)
    lb = model.train_iteration(xb, yb, opts, city="B", edge_index=nyc_taxi.subgraph(subset))
    assert seen == [69, 40]
    assert all(math.isfinite(v) for v in (*la.as_dict().values(), *lb.as_dict().values()))
    with pytest.raises(ValueError, match="pass city="):
        model.train_iteration(xa, ya, opts, edge_index=nyc_taxi.edge_index)
    with pytest.raises(KeyError, match="Unknown city 'C'"):
        model.train_iteration(xa, ya, opts, city="C", edge_index=nyc_taxi.edge_index)


def test_valid_regions_are_excluded(registry, nyc_taxi):
    valid = torch.ones(nyc_taxi.n, dtype=torch.bool)
    invalid = [18, 19, 38]
    valid[invalid] = False
    torch.manual_seed(0)
    model = make_model(registry, {"A": nyc_taxi.poi}, valid_regions={"A": valid})
    state = model.cities["A"]
    weights = model.city_weights("A")
    assert state.log_density.shape == (66,) and state.delta.shape == (66, 66)
    assert (weights[invalid] == 0).all() and (weights[valid] > 0).all()
    assert weights[valid].mean().item() == pytest.approx(1.0, rel=1e-5)
    # descriptors of excluded regions do not move the others' weights
    state.descriptors[invalid] = normalize_descriptors(torch.rand(3, 14))
    assert torch.allclose(model.city_weights("A"), weights)
    # nor do their targets move the loss
    x, y = nyc_taxi.batch(0, BATCH)
    y2 = y.clone()
    y2[:, :, invalid] += 5.0
    first, _, (mu, _) = model.stblm_loss(x, y, state=state, edge_index=nyc_taxi.edge_index)
    second, _, _ = model.stblm_loss(x, y2, state=state, edge_index=nyc_taxi.edge_index)
    assert mu.shape[0] == 66
    assert torch.allclose(first, second)
    losses = model.train_iteration(x, y, model.configure_optimizers(), city="A",
                                   edge_index=nyc_taxi.edge_index)
    assert math.isfinite(losses.kld)


def test_valid_regions_need_two(registry, nyc_taxi):
    valid = torch.zeros(nyc_taxi.n, dtype=torch.bool)
    valid[0] = True
    with pytest.raises(ValueError, match="at least 2 True"):
        make_model(registry, {"A": nyc_taxi.poi}, valid_regions={"A": valid})


# =========================================================================== transfer
def test_transferable_runs_without_riam(taxi_model, nyc_taxi):
    model = taxi_model
    opts = model.configure_optimizers()
    for start in (0, 50):
        x, y = nyc_taxi.batch(start, BATCH)
        model.train_iteration(x, y, opts, edge_index=nyc_taxi.edge_index)
    net = model.transferable()
    assert type(net) is PredictionNetwork
    assert not any(isinstance(m, RIAM) for m in net.modules())
    assert all(not k.startswith(("riam", "projector", "cities")) for k in net.state_dict())
    plain = copy.deepcopy(net)
    del model  # the plain network is self-sufficient
    x, _ = nyc_taxi.batch(100, BATCH)
    with torch.no_grad():
        expected = net(x, edge_index=nyc_taxi.edge_index)
        got = plain(x, edge_index=nyc_taxi.edge_index)
    assert torch.equal(got, expected)


def test_transferable_gives_the_wrapper_predictions(taxi_model, nyc_taxi):
    x, _ = nyc_taxi.batch(10, BATCH)
    with torch.no_grad():
        assert torch.equal(taxi_model.transferable()(x, edge_index=nyc_taxi.edge_index),
                           taxi_model(x, edge_index=nyc_taxi.edge_index))


def test_losses_decrease_on_real_data(registry, nyc_taxi):
    torch.manual_seed(0)
    model = make_model(registry, nyc_taxi.poi)
    opts = model.configure_optimizers(lr=3e-3)
    history = []
    rng = np.random.default_rng(0)
    for start in rng.integers(0, 600, size=40):
        x, y = nyc_taxi.batch(int(start), BATCH)
        history.append(model.train_iteration(x, y, opts, edge_index=nyc_taxi.edge_index))
    for term in ("pred", "poi_ce", "kld"):
        values = [getattr(h, term) for h in history]
        first, last = np.mean(values[:5]), np.mean(values[-5:])
        assert last < first, (term, first, last)


# =========================================================================== errors
def test_error_mismatched_descriptor_size(registry, nyc_taxi):
    with pytest.raises(ValueError, match="same size k"):
        make_model(registry, {"A": nyc_taxi.poi, "B": nyc_taxi.poi[:, :10]})


def test_error_missing_region_features(registry):
    with pytest.raises(ValueError, match="needs region_features"):
        make_model(registry, None)
    with pytest.raises(ValueError, match="empty mapping"):
        make_model(registry, {})


def test_error_unknown_city(taxi_model):
    with pytest.raises(KeyError, match="Unknown city 'paris'"):
        taxi_model.city_weights("paris")


def test_error_riam_optimizer_missing(taxi_model, nyc_taxi):
    x, y = nyc_taxi.batch(0, BATCH)
    with pytest.raises(ValueError, match="riam_optimizer"):
        taxi_model.train_iteration(x, y, taxi_model.configure_optimizers()[:1],
                                   edge_index=nyc_taxi.edge_index)


def test_batch_of_one_is_rejected(taxi_model, nyc_taxi):
    x, y = nyc_taxi.batch(0, 1)
    with pytest.raises(ValueError, match="at least 2 samples"):
        taxi_model.train_iteration(x, y, taxi_model.configure_optimizers(),
                                   edge_index=nyc_taxi.edge_index)
