"""Real third-party models (installed from the package registry, dev extra), wrapped with
keyword arguments only: ``check_backbone`` judges each, and each example trains.

Packages: torch-geometric (GCN, GAT), x-transformers (ContinuousTransformerWrapper),
pytorch-tcn (TCN), axial-attention (AxialImageTransformer).
"""

from __future__ import annotations

import math
from types import ModuleType

import pytest
from _examples import load_example
from torch import nn
from x_transformers import ContinuousTransformerWrapper, Encoder

from stbat_plugin.testing import check_backbone


@pytest.fixture(scope="module")
def examples() -> dict[str, ModuleType]:
    return {name: load_example(name) for name in ("wrap_pyg_models", "wrap_x_transformers",
                                           "wrap_tcn_axial")}


#: how check_backbone judges each: the parameters it reports as unreached (the model's head)
JUDGED = {
    "pyg_gcn_gru": ("readout.weight", "readout.bias"),
    "pyg_gat_gru": ("head.weight", "head.bias"),
    "x_transformers_temporal": (),
    "x_transformers_spatial": (),
    "pytorch_tcn": (),
    "axial_attention": (),
}


def test_every_wrapped_model_passes_check_backbone(examples):
    wrapped = {k: v for m in examples.values() for k, v in m.wrapped().items()}
    assert set(wrapped) == set(JUDGED)
    for name, (model, glue) in wrapped.items():
        report = check_backbone(model, window=6, **glue)
        assert not report.strict and report.unreached == JUDGED[name], name
        assert report.region_counts[0] != report.region_counts[1]


@pytest.mark.parametrize("name", ["wrap_pyg_models", "wrap_x_transformers", "wrap_tcn_axial"])
def test_example_trains_on_real_data(examples, name, tiny_data_dir):
    totals = examples[name].main(root=tiny_data_dir, steps=1)
    assert totals and all(math.isfinite(v) for run in totals.values() for v in run)


def test_tapping_pyg_gcn_that_runs_once_per_step_is_refused(examples):
    model, _ = examples["wrap_pyg_models"].wrapped()["pyg_gcn_gru"]
    with pytest.raises(AssertionError, match=r"tap='gcn' \(GCN output\) was called 6 times"):
        check_backbone(model, window=6, tap="gcn", feature_dim=32)
    report = check_backbone(model, window=6, tap="gcn", feature_dim=32, tap_calls="stack",
                            tap_reduce_time="mean")  # an explicit reduction is accepted
    assert "gru.weight_ih_l0" in report.unreached


def test_transformer_over_regions_with_positions_is_not_equivariant():
    """The default absolute positional embedding makes region order matter: judged unfit."""
    model = ContinuousTransformerWrapper(dim_in=6, max_seq_len=64,
                                         attn_layers=Encoder(dim=16, depth=1, heads=2))
    with pytest.raises(AssertionError, match="'permutation'.*not node-permutation equivariant"):
        check_backbone(model, window=6, tap="project_out", tap_input=True, feature_dim=16,
                       input_rearrange="b t n c -> b n (t c)", graph_kwargs=())


def test_x_transformers_without_graph_kwargs_says_how_to_fix(examples):
    model, glue = examples["wrap_x_transformers"].wrapped()["x_transformers_spatial"]
    glue = {k: v for k, v in glue.items() if k != "graph_kwargs"}
    with pytest.raises(AssertionError, match=r"\['edge_index'\].*graph_kwargs=\(\)"):
        check_backbone(model, window=6, **glue)


def test_axial_attention_on_a_graph_is_judged_not_equivariant(examples):
    """Its 3x3 convolutions mix neighbouring cells: right on a grid, wrong on a graph."""
    tap, _ = examples["wrap_tcn_axial"].wrapped()["axial_attention"]
    graph_model = nn.Sequential(*[m for m in tap.model][1:])  # [(b t), c, h, w] without regrouping
    with pytest.raises(AssertionError, match="not node-permutation equivariant"):
        check_backbone(graph_model, window=6, tap="", feature_dim=16,
                       input_rearrange="b t n c -> (b t) c 1 n",
                       tap_rearrange="(b t) d 1 n -> b t n d", tap_reduce_time="mean")
