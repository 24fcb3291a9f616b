"""A separately installed plugin distribution (examples/third_party_plugin) is found and used.

The plugin is built from a copy of its folder (so no ``build/`` lands in the repository) and
installed with ``pip --target`` into a temporary directory, without network or build
isolation. A subprocess with that directory on ``PYTHONPATH`` builds a fresh registry.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN_DIR = Path(__file__).parents[1] / "examples" / "third_party_plugin"

CHILD = textwrap.dedent("""
    import json, math, sys
    import numpy as np, torch
    from stbat_plugin import BackboneRegistry, BalancedTransfer, build_plugin_manager
    from stbat_plugin.testing import check_backbone

    registry = BackboneRegistry(build_plugin_manager())
    spec = registry.get("gru")
    backbone = registry.create("gru", in_channels=2, hidden=16)
    check_backbone(backbone, in_channels=2)
    with np.load(sys.argv[1]) as d:
        flow, poi = torch.from_numpy(d["flow"]), torch.from_numpy(d["poi"])
    flow = flow / flow[:336].amax(dim=(0, 1))
    model = BalancedTransfer(backbone, region_features=poi, out_channels=2, registry=registry)
    optimizers = model.configure_optimizers()
    totals = []
    for step in range(3):
        idx = torch.arange(8) + 8 * step
        x, y = torch.stack([flow[i:i + 6] for i in idx]), flow[idx + 6].unsqueeze(1)
        totals.append(model.train_iteration(x, y, optimizers).total)
    print(json.dumps({"names": registry.names(), "distribution": spec.distribution,
                      "version": spec.version, "plugin": spec.plugin,
                      "module": type(backbone).__module__, "totals": totals}))
""")


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("third_party")
    source, site = tmp / "src", tmp / "site"
    shutil.copytree(PLUGIN_DIR, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
           "--no-index", "--disable-pip-version-check", "--quiet", "--target", str(site),
           str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    return site


def test_plugin_is_not_installed_in_this_environment(registry):
    assert "gru" not in registry.names()  # the subprocess test below is not vacuous


def test_installed_plugin_is_registered_and_trains(plugin_site, tiny_data_dir):
    paths = [str(plugin_site), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(tiny_data_dir / "nyc_taxi.npz")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "gru" in report["names"] and "graph_stnet" in report["names"]
    assert (report["distribution"], report["version"]) == ("stbat-plugin-gru", "0.1.0")
    assert report["plugin"] == "gru" and report["module"] == "stbat_gru"
    assert len(report["totals"]) == 3 and all(map(math.isfinite, report["totals"]))


def test_plugin_dist_info_declares_the_entry_point(plugin_site):
    (dist_info,) = plugin_site.glob("stbat_plugin_gru-*.dist-info")
    assert "[stbat]\ngru = stbat_gru" in (dist_info / "entry_points.txt").read_text()
