"""Turning a user's model into a feature extractor: forward_features, tap=, plugins, grids."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from stbat_plugin import BackboneContractError, BalancedTransfer, TapFeatures
from stbat_plugin.adapters import grid_to_regions, regions_to_grid, resolve_backbone

PLAIN = {"use_simdcl": False, "use_weighted_loss": False, "predictor_hidden": 8}


class Head(nn.Module):
    """The model's own head, after the features: it runs (the whole forward runs), unused."""

    def __init__(self, d: int):
        super().__init__()
        self.lin, self.calls = nn.Linear(d, 1), 0

    def forward(self, h):
        self.calls += 1
        return self.lin(h)


class Encoded(nn.Module):
    """A user's model: a per-region encoder, then its own head."""

    def __init__(self, c: int = 2, d: int = 6):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(c, d), nn.Tanh())
        self.head = Head(d)

    def forward(self, x, **_: Any):
        h = self.encoder(x.mean(1))  # [b, n, d]
        return self.head(h)


class ChannelsFirst(nn.Module):
    """Its per-region representation is [b, d, n]."""

    def __init__(self, c: int = 2, d: int = 3):
        super().__init__()
        self.proj = nn.Conv1d(c, d, 1)

    def forward(self, x, **_: Any):
        return self.proj(x[:, -1].transpose(1, 2)).sum(-1)


class RegionGRU(nn.Module):
    def __init__(self, c: int = 2, d: int = 4):
        super().__init__()
        self.gru = nn.GRU(c, d, batch_first=True)

    def forward(self, x, **_: Any):
        b, t, n, c = x.shape
        out, _ = self.gru(x.permute(0, 2, 1, 3).reshape(b * n, t, c))
        return out


def _x(b=3, t=4, n=5, c=2, seed=0):
    return torch.randn(b, t, n, c, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- contract errors
def test_model_without_features_lists_three_fixes(empty_registry):
    with pytest.raises(BackboneContractError) as info:
        BalancedTransfer(nn.Linear(2, 2), registry=empty_registry, **PLAIN)
    message = str(info.value)
    assert isinstance(info.value, TypeError)
    assert "Linear" in message
    for fix in ("(1)", "forward_features", "feature_dim", "(2)", "tap=", "(3)",
                "stbat_adapt_backbone"):
        assert fix in message, fix


def test_forward_features_without_feature_dim(empty_registry):
    class NoDim(nn.Module):
        def forward_features(self, x, **_):
            return x[:, -1]

    with pytest.raises(BackboneContractError, match="no int 'feature_dim'"):
        resolve_backbone(NoDim(), registry=empty_registry)
    extractor = resolve_backbone(NoDim(), feature_dim=2, registry=empty_registry)
    assert extractor.feature_dim == 2


# --------------------------------------------------------------------------- tap
def test_tap_uses_the_named_submodule(empty_registry):
    """The whole forward runs (so that a module called twice is noticed); the features are
    the tapped output, and the gradient reaches the encoder, not the head."""
    torch.manual_seed(0)
    user = Encoded()
    model = BalancedTransfer(user, tap="encoder", feature_dim=6, registry=empty_registry, **PLAIN)
    x = _x()
    z = model.net.forward_features(x)
    assert z.shape == (3, 5, 6) and user.head.calls == 1
    assert torch.allclose(z, user.encoder(x.mean(1)))
    out = model(x)
    assert out.shape == (3, 1, 5, 1)
    out.sum().backward()
    assert user.encoder[0].weight.grad is not None and user.encoder[0].weight.grad.abs().sum() > 0
    assert user.head.lin.weight.grad is None
    assert not user.encoder._forward_hooks  # the hook is gone after the tap


def test_tap_of_nested_submodule_and_tuple_output():
    with pytest.raises(BackboneContractError, match="tap_select"):  # GRU returns (output, h)
        TapFeatures(RegionGRU(), "gru", feature_dim=4).forward_features(_x())
    tap = TapFeatures(RegionGRU(), "gru", feature_dim=4, select=0, reduce_time="mean",
                      rearrange="(b n) t d -> b t n d")
    assert tap.forward_features(_x()).shape == (3, 5, 4)
    nested = TapFeatures(Encoded(), "encoder.0", feature_dim=6)
    assert nested.forward_features(_x()).shape == (3, 5, 6)


def test_tap_rearrange(empty_registry):
    model = BalancedTransfer(ChannelsFirst(), tap="proj", feature_dim=3,
                             tap_rearrange="b d n -> b n d", registry=empty_registry, **PLAIN)
    assert model(_x()).shape == (3, 1, 5, 1)


def test_tap_of_unknown_submodule_lists_the_available_ones():
    with pytest.raises(BackboneContractError) as info:
        TapFeatures(Encoded(), "decoder", feature_dim=6)
    message = str(info.value)
    assert "'decoder'" in message
    for name in ("encoder", "encoder.0", "head"):
        assert name in message


def test_tap_needs_feature_dim():
    with pytest.raises(BackboneContractError, match="needs feature_dim"):
        resolve_backbone(Encoded(), tap="encoder")


def test_tap_never_reached():
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(2, 2)

        def forward(self, x, **_):
            return x

    with pytest.raises(BackboneContractError, match="never called"):
        TapFeatures(Skips(), "unused", feature_dim=2).forward_features(_x())


# --------------------------------------------------------------------------- shapes
class DropsARegion(nn.Module):
    feature_dim = 4

    def forward_features(self, x, **_):
        return x[:, -1, 1:].repeat(1, 1, 2)  # [b, n - 1, 4]


class WrongWidth(nn.Module):
    feature_dim = 4

    def forward_features(self, x, **_):
        return x[:, -1]  # [b, n, 2]


def test_backbone_changing_n_names_both_shapes(empty_registry):
    model = BalancedTransfer(DropsARegion(), registry=empty_registry, **PLAIN)
    with pytest.raises(ValueError, match="changed the number of regions") as info:
        model(_x(b=2, n=5))
    assert "[2, 5, 4]" in str(info.value) and "[2, 4, 4]" in str(info.value)


def test_backbone_with_wrong_feature_size(empty_registry):
    model = BalancedTransfer(WrongWidth(), registry=empty_registry, **PLAIN)
    with pytest.raises(ValueError, match="wrong shape") as info:
        model(_x(b=2, n=5))
    assert "[2, 5, 4]" in str(info.value) and "[2, 5, 2]" in str(info.value)


def test_integer_input_rejected(empty_registry):
    model = BalancedTransfer(WrongWidth(), feature_dim=2, registry=empty_registry, **PLAIN)
    with pytest.raises(ValueError, match="floating point"):
        model(torch.ones(2, 3, 5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[b, t, n, c\]"):
        model(torch.ones(2, 3, 5))


# --------------------------------------------------------------------------- grids
def test_grid_layout_helpers_are_row_major():
    x = torch.arange(2 * 1 * 6 * 3, dtype=torch.float32).reshape(2, 1, 6, 3)
    grid = regions_to_grid(x, (2, 3))
    assert grid.shape == (2, 1, 3, 2, 3)
    for row in range(2):
        for col in range(3):
            assert torch.equal(grid[:, :, :, row, col], x[:, :, row * 3 + col])
    assert torch.equal(grid_to_regions(grid), x)
    with pytest.raises(ValueError, match="does not match n=6"):
        regions_to_grid(x, (4, 2))


@pytest.fixture(scope="module")
def grid_city(tiny_data_dir):
    with np.load(tiny_data_dir / "nyc_bike_grid2014.npz") as d:
        flow = torch.from_numpy(d["flow"].astype(np.float32))
        grid_shape = tuple(int(v) for v in d["grid_shape"])
    return flow / flow.max(), grid_shape


def test_grid_backbone_through_the_wrapper(registry, grid_city):
    flow, (h, w) = grid_city
    n = h * w
    days = flow[: 24 * 7].reshape(7, 24, n, 2)
    profile = days.sum(-1).mean(0).t()  # [n, 24] temporal-profile descriptors
    torch.manual_seed(0)
    backbone = registry.create("stnet", in_channels=2, channels=4, hidden=8)
    model = BalancedTransfer(backbone, region_features=profile, out_channels=2,
                             predictor_hidden=16, projector_dim=16, registry=registry)
    x = torch.stack([flow[i:i + 6] for i in range(4)])  # [b, t, n, c]
    y = torch.stack([flow[i + 6:i + 7] for i in range(4)])
    out_regions = model(x, grid_shape=(h, w))
    out_grid = model(x.reshape(4, 6, h, w, 2).permute(0, 1, 4, 2, 3))  # [b, t, c, h, w]
    assert out_regions.shape == out_grid.shape == (4, 1, n, 2)
    assert torch.allclose(out_regions, out_grid)
    losses = model.train_iteration(x, y, model.configure_optimizers(), grid_shape=(h, w),
                                   edge_index=torch.zeros(2, 0, dtype=torch.long))
    assert losses.pred > 0 and losses.simdcl > 0 and losses.poi_ce > 0
    with pytest.raises(ValueError, match="grid_shape"):
        model(x)
    with pytest.raises(ValueError, match="does not match"):
        model(x, grid_shape=(h, w + 1))
