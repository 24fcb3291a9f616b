"""The README's code runs as written, and its quick start is what the Makefile provides."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_wrap_example_runs_and_trains(capsys):
    blocks = _python_blocks()
    assert blocks, "README has no python example"
    code = blocks[0]
    assert len(code.strip().splitlines()) <= 20
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    losses = namespace["model"].train_iteration(
        namespace["x"], namespace["y"], namespace["optimizers"])
    assert losses.simdcl > 0 and losses.poi_ce > 0 and losses.pred > 0
    assert "Losses(" in capsys.readouterr().out


def test_quick_start_commands_exist():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "make demo" in readme and "make test" in readme
    assert re.search(r"^demo:", makefile, flags=re.M) and re.search(r"^test:", makefile, flags=re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
