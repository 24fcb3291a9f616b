"""Taps on real-code shapes: inputs, tuple / dict outputs, time reductions, flattened outputs,
modules called once per step, graph arguments by signature, and the model left untouched.

Each ``test_defect_*`` is a regression test of a defect of issue 8: it fails on the code
before the fix.
"""

from __future__ import annotations

import re
from typing import Any

import einops
import pytest
import torch
from torch import nn

from stbat_plugin import BackboneContractError, BalancedTransfer, TapFeatures
from stbat_plugin.adapters import resolve_backbone
from stbat_plugin.testing import ring_graph

PLAIN = {"use_simdcl": False, "use_weighted_loss": False, "predictor_hidden": 8}
B, T, N = 3, 4, 5


def _x(b: int = B, t: int = T, n: int = N, c: int = 1) -> torch.Tensor:
    return torch.randn(b, t, n, c, generator=torch.Generator().manual_seed(0))


class StepLoop(nn.Module):
    """A cell applied to each time step in a Python loop, then a readout: a common shape."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.cell = nn.Linear(1, d)
        self.readout = nn.Linear(d, 1)

    def forward(self, x):  # [b, t, n, 1] -> [b, 1, n, 1]
        steps = [torch.tanh(self.cell(x[:, i])) for i in range(x.shape[1])]  # t calls
        return self.readout(torch.stack(steps, 1).sum(1)).unsqueeze(1)


class RegionGRU(nn.Module):
    """``nn.GRU`` per region: its output is a tuple ``(sequence, h_n)`` of flattened tensors."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.gru = nn.GRU(1, d, batch_first=True)
        self.head = nn.Linear(d, 1)

    def forward(self, x):  # [b, t, n, 1]
        out, h_n = self.gru(einops.rearrange(x, "b t n c -> (b n) t c"))
        return self.head(h_n[-1])


class DictOut(nn.Module):
    def __init__(self, d: int = 3):
        super().__init__()
        self.enc = _DictEncoder(d)

    def forward(self, x):
        return self.enc(x)["hidden"].sum()


class _DictEncoder(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(1, d)

    def forward(self, x):
        h = self.lin(x[:, -1])
        return {"hidden": h, "aux": h.mean()}


# --------------------------------------------------------------------------- called per step
def test_defect_a_module_called_once_per_step_is_an_error_not_its_first_step():
    model = StepLoop()
    with pytest.raises(BackboneContractError) as info:
        TapFeatures(model, "cell", feature_dim=4).forward_features(_x())
    message = str(info.value)
    assert "tap='cell'" in message and "Linear" in message and f"called {T} times" in message
    assert "tap_calls='last'" in message and "tap_calls='stack'" in message


def test_tap_calls_last_and_stack_are_explicit_reductions_of_the_calls():
    model, x = StepLoop(), _x()
    steps = torch.stack([model.cell(x[:, i]) for i in range(T)], 1)  # [b, t, n, d]
    last = TapFeatures(model, "cell", feature_dim=4, calls="last").forward_features(x)
    mean = TapFeatures(model, "cell", feature_dim=4, calls="stack",
                       reduce_time="mean").forward_features(x)
    assert torch.allclose(last, steps[:, -1]) and torch.allclose(mean, steps.mean(1))


def test_tap_input_takes_what_the_readout_receives():
    model, x = StepLoop(), _x()
    z = TapFeatures(model, "readout", feature_dim=4, input=True).forward_features(x)
    expected = torch.stack([torch.tanh(model.cell(x[:, i])) for i in range(T)], 1).sum(1)
    assert torch.allclose(z, expected)


# --------------------------------------------------------------------------- selections
def test_defect_a_tuple_output_is_never_silently_element_zero():
    with pytest.raises(BackboneContractError) as info:
        TapFeatures(RegionGRU(), "gru", feature_dim=6).forward_features(_x())
    message = str(info.value)
    assert "tap='gru' (GRU output)" in message and "tap_select" in message
    assert f"0: Tensor [{B * N}, {T}, 6]" in message and f"1: Tensor [1, {B * N}, 6]" in message


def test_tap_select_picks_h_n_and_the_rearrange_unflattens_it():
    model, x = RegionGRU(), _x()
    z = TapFeatures(model, "gru", feature_dim=6, select=1,
                    rearrange="1 (b n) d -> b n d").forward_features(x)
    _, h_n = model.gru(einops.rearrange(x, "b t n c -> (b n) t c"))
    assert torch.allclose(z, einops.rearrange(h_n, "1 (b n) d -> b n d", b=B))


def test_tap_reduce_time_last_of_the_sequence_equals_h_n():
    model, x = RegionGRU(), _x()
    last = TapFeatures(model, "gru", feature_dim=6, select=0, reduce_time="last",
                       rearrange="(b n) t d -> b t n d").forward_features(x)
    h_n = TapFeatures(model, "gru", feature_dim=6, select=1,
                      rearrange="1 (b n) d -> b n d").forward_features(x)
    assert torch.allclose(last, h_n, atol=1e-6)


def test_dict_outputs_and_named_inputs_are_selected_by_key():
    model, x = DictOut(), _x()
    z = TapFeatures(model, "enc", feature_dim=3, select="hidden").forward_features(x)
    assert torch.allclose(z, model.enc.lin(x[:, -1]))
    with pytest.raises(BackboneContractError, match=r"'hidden': Tensor \[3, 5, 3\], 'aux'"):
        TapFeatures(model, "enc", feature_dim=3).forward_features(x)
    with pytest.raises(BackboneContractError, match="tap_select='missing' is not a tensor"):
        TapFeatures(model, "enc", feature_dim=3, select="missing").forward_features(x)


def test_an_input_of_several_tensors_needs_a_selection_by_position_or_name():
    class Conv(nn.Module):
        def forward(self, h, edge_index):
            return h

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.conv = nn.Linear(1, 2), Conv()

        def forward(self, x, edge_index):
            return self.conv(self.proj(x[:, -1]), edge_index)

    x, graph = _x(), {"edge_index": ring_graph(N)}
    with pytest.raises(BackboneContractError, match="'h': Tensor .*'edge_index': Tensor"):
        TapFeatures(Net(), "conv", feature_dim=2, input=True).forward_features(x, **graph)
    by_name = TapFeatures(Net(), "conv", feature_dim=2, input=True, select="h")
    by_index = TapFeatures(by_name.model, "conv", feature_dim=2, input=True, select=0)
    assert torch.equal(by_name.forward_features(x, **graph), by_index.forward_features(x, **graph))


# --------------------------------------------------------------------------- shape messages
def test_defect_shape_errors_say_what_was_got_and_the_fix():
    """Old: one message ("changed the number of regions ... tap an earlier submodule") for
    all three; it never said which tuple element was taken."""
    flat = TapFeatures(RegionGRU(), "gru", feature_dim=6, select=0)
    with pytest.raises(BackboneContractError) as info:
        flat.forward_features(_x())
    assert "GRU output [0]" in str(info.value)
    assert "tap_rearrange='(b n) t d -> b t n d' and tap_reduce_time='last'" in str(info.value)

    class Steps(nn.Module):
        def forward(self, x):
            return x.repeat(1, 1, 1, 4)  # [b, t, n, 4]

    with pytest.raises(BackboneContractError, match=r"\[b t n d\]: use tap_reduce_time='last'"):
        TapFeatures(Steps(), "", feature_dim=4).forward_features(_x())
    with pytest.raises(BackboneContractError, match=r"use feature_dim=4 \(not 7\)"):
        TapFeatures(StepLoop(), "readout", feature_dim=7, input=True).forward_features(_x())


def test_the_suggested_rearrange_works():
    tap = TapFeatures(RegionGRU(), "gru", feature_dim=6, select=0)
    with pytest.raises(BackboneContractError) as info:
        tap.forward_features(_x())
    pattern = re.search(r"tap_rearrange='([^']+)'", str(info.value)).group(1)
    fixed = TapFeatures(tap.model, "gru", feature_dim=6, select=0, rearrange=pattern,
                        reduce_time="last")
    assert fixed.forward_features(_x()).shape == (B, N, 6)


def test_bad_options_are_refused_at_construction():
    for kwargs, match in [({"calls": "first"}, "tap_calls"), ({"reduce_time": "max"},
                                                             "tap_reduce_time"),
                          ({"rearrange": "b d n -> b d"}, "-> b n d"),
                          ({"rearrange": "b d n -> b n d", "reduce_time": "last"}, "-> b t n d")]:
        with pytest.raises(BackboneContractError, match=match):
            TapFeatures(StepLoop(), "readout", feature_dim=4, **kwargs)
    with pytest.raises(BackboneContractError, match="only apply with tap="):
        resolve_backbone(StepLoop(), tap_input=True, feature_dim=4)


# --------------------------------------------------------------------------- graph arguments
class ForwardX(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(1, 2)

    def forward(self, x):
        return self.enc(x[:, -1])


def test_defect_forward_x_gets_no_graph_arguments():
    """Old: ``TypeError: forward() got an unexpected keyword argument 'edge_index'``."""
    model = BalancedTransfer(ForwardX(), tap="enc", feature_dim=2, **PLAIN)
    out = model(_x(), edge_index=ring_graph(N), edge_weight=torch.ones(4 * N))
    assert out.shape == (B, 1, N, 1)


def test_graph_arguments_follow_the_signature():
    seen: dict[str, Any] = {}

    class Named(ForwardX):
        def forward(self, x, edge_index):
            seen["named"] = {"edge_index"}
            return super().forward(x)

    class Catchall(ForwardX):
        def forward(self, x, **kwargs):
            seen["catchall"] = set(kwargs)
            return super().forward(x)

    graph = {"edge_index": ring_graph(N), "edge_weight": torch.ones(4 * N)}
    for cls in (Named, Catchall):
        TapFeatures(cls(), "enc", feature_dim=2).forward_features(_x(), **graph)
    assert seen == {"named": {"edge_index"}, "catchall": {"edge_index", "edge_weight"}}
    TapFeatures(Catchall(), "enc", feature_dim=2, graph_kwargs=()).forward_features(_x(), **graph)
    assert seen["catchall"] == set()


def test_forward_kwargs_handed_on_to_code_that_refuses_them_suggest_graph_kwargs():
    class HandsOn(ForwardX):
        def forward(self, x, **kwargs):
            return self.inner(x, **kwargs)

        def inner(self, x):
            return self.enc(x[:, -1])

    with pytest.raises(BackboneContractError, match=r"\['edge_index'\].*graph_kwargs=\(\)"):
        TapFeatures(HandsOn(), "enc", feature_dim=2).forward_features(_x(),
                                                                      edge_index=ring_graph(N))


def test_defect_readme_model_with_graph_arguments(capsys):
    """The README's ``MyNet`` (``forward(x)``) inside the pipeline, which passes the graph."""
    from pathlib import Path

    code = re.findall(r"```python\n(.*?)```",
                      (Path(__file__).parents[1] / "README.md").read_text(), flags=re.S)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    model, x, y = namespace["model"], namespace["x"], namespace["y"]
    losses = model.train_iteration(x, y, namespace["optimizers"], edge_index=ring_graph(20),
                                   edge_weight=torch.ones(80))
    assert losses.pred > 0


# --------------------------------------------------------------------------- never modified
class OwnFeatures(nn.Module):
    feature_dim = 99  # means something else in their code

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 2)

    def forward_features(self, x):
        return self.lin(x[:, -1])


def test_defect_feature_dim_never_writes_to_the_users_model():
    model = OwnFeatures()
    net = BalancedTransfer(model, feature_dim=2, **PLAIN)
    assert model.feature_dim == 99 and "feature_dim" not in vars(model)
    assert net(_x(), edge_index=ring_graph(N)).shape == (B, 1, N, 1)


def test_tap_leaves_the_model_as_it_was():
    model = StepLoop()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tap = TapFeatures(model, "readout", feature_dim=4, input=True)
    tap.forward_features(_x()).sum().backward()
    assert not model.readout._forward_pre_hooks and not model.readout._forward_hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model(_x()).shape == (B, 1, N, 1)


def test_defect_region_features_of_the_wrong_n_are_named():
    """Old: "Expected 'weights' of shape [69]", without naming region_features."""
    model = BalancedTransfer(ForwardX(), tap="enc", feature_dim=2, region_features=torch.rand(7, 3),
                             predictor_hidden=8, projector_dim=8)
    with pytest.raises(ValueError, match=r"'region_features' of city 'default'.*n=5 \(got 7 rows"):
        model.train_iteration(_x(), torch.rand(B, 1, N, 1), model.configure_optimizers())
