"""The two floors: the core (``stbat_plugin`` and the built-in backbones) never imports the
pipeline (``stbat_plugin.pipeline``), and a plain ``import stbat_plugin`` pulls in none of
the pipeline's heavy dependencies."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted(p for p in (ROOT / "stbat_plugin").rglob("*.py") if "pipeline" not in p.parts)
BACKBONES = sorted((ROOT / "backbones").glob("*.py"))


def imported_modules(path: Path) -> list[str]:
    """Every module an ``import`` or ``from ... import`` names in ``path``, at any depth
    (imports inside functions count: they run too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_the_walk_sees_imports_inside_functions(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from stbat_plugin.pipeline import api\n")
    assert "stbat_plugin.pipeline.api" in imported_modules(probe)


@pytest.mark.parametrize("path", CORE + BACKBONES, ids=lambda p: str(p.relative_to(ROOT)))
def test_core_never_imports_the_pipeline(path: Path) -> None:
    bad = [m for m in imported_modules(path) if m.startswith("stbat_plugin.pipeline")
           or m in {f"stbat_plugin.{name}" for name in _moved()}]
    assert not bad, f"{path.relative_to(ROOT)} imports the pipeline: {bad}"


def _moved() -> frozenset[str]:
    from stbat_plugin._compat import MOVED

    return MOVED


def test_pipeline_modules_are_the_moved_ones() -> None:
    """The deprecation aliases cover exactly the modules that now live in the pipeline."""
    here = {p.stem for p in (ROOT / "stbat_plugin" / "pipeline").glob("*.py")} - {"__init__", "io"}
    assert here == set(_moved())


def test_plain_import_pulls_no_pipeline_dependency() -> None:
    code = ("import sys, stbat_plugin, stbat_plugin.testing, stbat_plugin.data, "
            "stbat_plugin.functional\n"
            "heavy = {'scipy', 'statsmodels', 'matplotlib', 'threadpoolctl', 'stbat_plugin.pipeline'}\n"
            "print(sorted(m for m in sys.modules if m in heavy or m.split('.')[0] in heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_old_paths_warn_and_alias_the_new_module() -> None:
    code = ("import warnings\nwarnings.simplefilter('error')\n"
            "try:\n    from stbat_plugin import api\nexcept DeprecationWarning as w:\n    print(w)\n"
            "warnings.simplefilter('ignore')\n"
            "from stbat_plugin import config\nimport stbat_plugin.pipeline.config as new\n"
            "print(config is new)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, second = out.stdout.strip().splitlines()
    assert "stbat_plugin.api moved to stbat_plugin.pipeline.api" in first
    assert second == "True"
