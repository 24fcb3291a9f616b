"""How ``BalancedTransfer`` is put together: its options (``STBaTOptions``), the optimiser of
each submodule, the open ``Losses`` breakdown and the per-city state that ``state_dict``
leaves out."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle

import pytest
import torch
from torch import nn

from stbat_plugin import BalancedTransfer, Losses, STBaTOptions

SMALL = {"in_channels": 2, "channels": 8, "hidden": 16}
WIDTHS = {"out_channels": 2, "predictor_hidden": 32, "projector_dim": 32}


def _model(registry, poi, **kwargs) -> BalancedTransfer:
    torch.manual_seed(0)
    return BalancedTransfer(registry.create("graph_stnet", **SMALL), region_features=poi,
                            registry=registry, **{**WIDTHS, **kwargs})


def _steps(model: BalancedTransfer, nyc_taxi, starts=(0, 16)) -> list[Losses]:
    optimizers = model.configure_optimizers(lr=1e-2)
    return [model.train_iteration(*nyc_taxi.batch(start, 8), optimizers,
                                  edge_index=nyc_taxi.edge_index) for start in starts]


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"loss": "maee"}, r"loss must be one of \['mse', 'mae', 'huber'\] \(got 'maee'\)"),
    ({"tau": 0.0}, r"tau must be a finite number > 0 \(got 0.0\)"),
    ({"bandwidth": float("inf")}, "bandwidth must be a finite number > 0"),
    ({"beta": -1.0}, "beta must be a finite number >= 0"),
    ({"embed_dim": 0}, "embed_dim must be a whole number >= 1"),
    ({"use_poi": "no"}, "use_poi must be True or False"),
])
def test_bad_options_fail_on_construction(registry, nyc_taxi, kwargs, match):
    with pytest.raises(ValueError, match=match):
        STBaTOptions(**kwargs)
    with pytest.raises(ValueError, match=match):
        _model(registry, nyc_taxi.poi, **kwargs)


def test_options_object_and_keywords_build_the_same_model(registry, nyc_taxi):
    by_keywords = _model(registry, nyc_taxi.poi, tau=0.5, beta=0.1)
    by_options = _model(registry, nyc_taxi.poi, options=STBaTOptions(tau=0.5, beta=0.1))
    assert by_keywords.options == by_options.options
    assert all(torch.equal(a, b) for a, b in zip(by_keywords.state_dict().values(),
                                                 by_options.state_dict().values(), strict=True))
    assert _steps(by_keywords, nyc_taxi) == _steps(by_options, nyc_taxi)
    over = _model(registry, nyc_taxi.poi, options=STBaTOptions(tau=0.5), tau=2.0)
    assert over.options.tau == 2.0  # a keyword wins over options=


def test_unknown_keyword_names_the_settings_and_a_close_match(registry, nyc_taxi):
    with pytest.raises(TypeError, match=r"\['simdcl_weigth'\].*did you mean 'simdcl_weight'"):
        _model(registry, nyc_taxi.poi, simdcl_weigth=0.1)
    with pytest.raises(TypeError, match="Expected 'options' to be an STBaTOptions"):
        _model(registry, nyc_taxi.poi, options={"tau": 0.5})


def test_signature_and_docstring_list_every_option():
    params = inspect.signature(BalancedTransfer).parameters
    doc = BalancedTransfer.__doc__ or ""
    for f in dataclasses.fields(STBaTOptions):
        assert params[f.name].default == f.default and params[f.name].kind is \
            inspect.Parameter.KEYWORD_ONLY, f.name
        assert f"{f.name}: {f.metadata['help'].split()[0]}" in doc, f.name
    assert "settings" not in params  # no **kwargs shown
    assert "<STBaTOptions fields>" not in doc


def test_options_read_as_attributes_but_never_set(registry, nyc_taxi):
    model = _model(registry, nyc_taxi.poi, simdcl_weight=0.25)
    assert model.simdcl_weight == 0.25 and model.tau == model.options.tau == 1.0
    with pytest.raises(AttributeError):
        model.simdcl_weight = 0.5  # silently ignored before; a setting is fixed on construction


# --------------------------------------------------------------------------- optimisers
def test_the_two_optimisers_split_every_parameter_by_owner(registry, nyc_taxi):
    model = _model(registry, nyc_taxi.poi)
    groups = model.parameter_groups()
    ids = {name: {id(p) for p in params} for name, params in groups.items()}
    assert not ids["stblm"] & ids["riam"]
    assert ids["stblm"] | ids["riam"] == {id(p) for p in model.parameters()}
    assert ids["riam"] == {id(p) for p in model.riam.parameters()}
    stblm, riam = model.configure_optimizers()
    assert [p for g in stblm.param_groups for p in g["params"]] == groups["stblm"]
    assert [p for g in riam.param_groups for p in g["params"]] == groups["riam"]


def test_a_new_submodule_with_parameters_is_never_silently_left_out(registry, nyc_taxi):
    class WithExtra(BalancedTransfer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.extra = nn.Linear(3, 3)

    backbone = registry.create("graph_stnet", **SMALL)
    model = WithExtra(backbone, region_features=nyc_taxi.poi, registry=registry, **WIDTHS)
    with pytest.raises(ValueError, match=r"parameters in \['extra'\] that no optimiser owns"):
        model.configure_optimizers()

    class Declared(WithExtra):
        OPTIMISED_BY = {**BalancedTransfer.OPTIMISED_BY, "extra": "stblm"}

    model = Declared(backbone, region_features=nyc_taxi.poi, registry=registry, **WIDTHS)
    stblm = model.configure_optimizers()[0]
    owned = {id(p) for g in stblm.param_groups for p in g["params"]}
    assert {id(p) for p in model.extra.parameters()} <= owned


# --------------------------------------------------------------------------- Losses
def test_losses_take_a_new_term_and_keep_the_old_access():
    losses = Losses(total=3.0, pred=2.0, simdcl=1.0, spread=0.5)
    assert (losses.total, losses.pred, losses.simdcl, losses.spread) == (3.0, 2.0, 1.0, 0.5)
    assert losses.kld == 0.0 and losses.skipped == 0.0  # switched-off terms read 0.0
    assert losses.as_dict() == {"total": 3.0, "pred": 2.0, "simdcl": 1.0, "emb": 0.0,
                                "poi_ce": 0.0, "kld": 0.0, "spread": 0.5}
    assert Losses(total=1.0, pred=1.0, skipped=1.0).as_dict()["skipped"] == 1.0
    with pytest.raises(AttributeError, match="no term 'sprad'"):
        _ = losses.sprad
    with pytest.raises(AttributeError, match="immutable"):
        losses.total = 0.0
    assert pickle.loads(pickle.dumps(losses)) == losses == copy.deepcopy(losses)
    assert "Losses(total=3.0, pred=2.0" in repr(losses)


# --------------------------------------------------------------------------- per-city state
def test_derived_city_state_is_not_saved_and_a_loaded_model_recomputes_it(registry, nyc_taxi):
    model = _model(registry, nyc_taxi.poi)
    _steps(model, nyc_taxi)
    state = model.state_dict()
    assert "cities.default.descriptors" in state and "cities.default.valid" in state
    assert not any(k.endswith((".log_density", ".delta", ".phi")) for k in state)
    loaded = _model(registry, nyc_taxi.poi)
    loaded.load_state_dict(state)
    assert not loaded.cities["default"].fresh  # recomputed on first use
    assert torch.allclose(loaded.city_weights(), model.city_weights())
    x, y = nyc_taxi.batch(40, 8)
    a = model.train_iteration(x, y, model.configure_optimizers(), edge_index=nyc_taxi.edge_index)
    b = loaded.train_iteration(x, y, loaded.configure_optimizers(),
                               edge_index=nyc_taxi.edge_index)
    assert a == b


def test_a_state_dict_written_with_the_derived_buffers_still_loads(registry, nyc_taxi):
    model = _model(registry, nyc_taxi.poi)
    _steps(model, nyc_taxi)
    old = {**model.state_dict(), **{f"cities.default.{k}": v for k, v in
                                   model.cities["default"].derived_state().items()}}
    loaded = _model(registry, nyc_taxi.poi)
    loaded.load_state_dict(old)  # strict: the old keys are taken, not unexpected
    assert torch.equal(loaded.cities["default"].delta, model.cities["default"].delta)


def test_imbalance_state_continues_a_run_bit_identically(two_cities, nyc_taxi):
    """City B's state lags RIAM after steps on A; recomputing it would change the run."""
    model, ei = two_cities, nyc_taxi.edge_index
    optimizers = model.configure_optimizers(lr=1e-2)
    for city, start in (("A", 0), ("B", 8), ("A", 16)):
        model.train_iteration(*nyc_taxi.batch(start, 8), optimizers, city=city, edge_index=ei)
    saved = (copy.deepcopy(model.state_dict()), model.imbalance_state(),
             [copy.deepcopy(o.state_dict()) for o in optimizers])
    restored = copy.deepcopy(model)
    restored.load_state_dict(saved[0])
    restored.load_imbalance_state(saved[1])
    restored_opts = restored.configure_optimizers(lr=1e-2)
    for opt, opt_state in zip(restored_opts, saved[2], strict=True):
        opt.load_state_dict(opt_state)
    batch = nyc_taxi.batch(24, 8)
    assert model.train_iteration(*batch, optimizers, city="B", edge_index=ei) == \
        restored.train_iteration(*batch, restored_opts, city="B", edge_index=ei)
    recomputed = copy.deepcopy(restored)
    recomputed.refresh_imbalance("B")  # what a load without imbalance_state would do
    assert not torch.equal(recomputed.cities["B"].delta, saved[1]["B"]["delta"])


@pytest.fixture
def two_cities(registry, nyc_taxi) -> BalancedTransfer:
    return _model(registry, {"A": nyc_taxi.poi, "B": nyc_taxi.poi.flip(0)})
