"""Shared fixtures of the test suite.

* ``registry``: a fresh plugin manager and :class:`BackboneRegistry` with the installed
  (entry-point) backbones; tests that need their own plugins build one the same way.
* ``tiny_data_dir``: the real bundled sample data (``data/tiny``).
* ``nyc_taxi``: the tiny NYC taxi city as tensors, with a ``batch`` helper that cuts
  real input/target windows out of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from stbat_plugin import BackboneRegistry, build_plugin_manager

TINY_DATA_DIR = Path(__file__).parents[1] / "data" / "tiny"

# The tests use tiny tensors, which gain nothing from intra-op threads; on a busy 2-core
# machine two OpenMP threads per process stall each other (measured: 70 s vs 8 s for
# test_functional + test_riam_wrapper + test_registry + test_adapters + test_conformance).
torch.set_num_threads(1)


# --------------------------------------------------------------------------- registries
@pytest.fixture
def registry() -> BackboneRegistry:
    """A fresh registry of the installed plugins (built-ins come through entry points)."""
    return BackboneRegistry(build_plugin_manager(load_entrypoints=True))


@pytest.fixture
def empty_registry() -> BackboneRegistry:
    """A fresh registry with no plugin at all (no entry points, no adapters)."""
    return BackboneRegistry(build_plugin_manager(load_entrypoints=False))


# --------------------------------------------------------------------------- real data
@pytest.fixture(scope="session")
def tiny_data_dir() -> Path:
    assert TINY_DATA_DIR.is_dir(), f"bundled sample data missing: {TINY_DATA_DIR}"
    return TINY_DATA_DIR


@dataclass(frozen=True)
class TinyCity:
    """A real city as tensors: flow scaled to [0, 1], POI counts and its graph."""

    flow: torch.Tensor  # [T, n, c] float32, min-max scaled
    poi: torch.Tensor  # [n, k] raw counts
    adjacency: torch.Tensor  # [n, n] 0/1
    edge_index: torch.Tensor  # [2, E] int64

    @property
    def n(self) -> int:
        return self.flow.shape[1]

    def batch(self, start: int = 0, size: int = 32, window: int = 6, horizon: int = 1,
              regions: torch.Tensor | None = None):
        """Windows ``x [size, window, n, c]`` and next-step targets ``y [size, horizon, n, c]``."""
        flow = self.flow if regions is None else self.flow[:, regions]
        idx = torch.arange(start, start + size)
        x = torch.stack([flow[i:i + window] for i in idx])
        y = torch.stack([flow[i + window:i + window + horizon] for i in idx])
        return x, y

    def subgraph(self, regions: torch.Tensor) -> torch.Tensor:
        """``edge_index`` of the subgraph induced by ``regions`` (relabelled 0..len-1)."""
        return _edge_index(self.adjacency[regions][:, regions])


def _edge_index(adjacency: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(adjacency > 0).t().contiguous().to(torch.long)


@pytest.fixture(scope="session")
def nyc_taxi(tiny_data_dir: Path) -> TinyCity:
    with np.load(tiny_data_dir / "nyc_taxi.npz") as d:
        flow = torch.from_numpy(d["flow"].astype(np.float32))
        poi = torch.from_numpy(d["poi"].astype(np.float32))
        adjacency = torch.from_numpy(d["adjacency"].astype(np.float32))
    flow = flow / flow.max()
    return TinyCity(flow, poi, adjacency, _edge_index(adjacency))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run where a CUDA device exists and are skipped elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """The fuzz cases this session ran, by suite and outcome (``tests/_fuzz_tally.py``);
    also written as JSON to ``$STBAT_FUZZ_TALLY`` when set."""
    import os

    from _fuzz_tally import lines, write

    text = lines()
    if text:
        terminalreporter.section("fuzz cases")
        for line in text:
            terminalreporter.write_line(line)
    if os.environ.get("STBAT_FUZZ_TALLY"):
        write(os.environ["STBAT_FUZZ_TALLY"])
