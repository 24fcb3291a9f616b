"""Running the ``stbat`` CLI in-process, shared by the CLI and checkpoint tests."""

from __future__ import annotations

import contextlib
import io

from stbat_plugin.pipeline.cli import main


def run_cli(args: list) -> tuple[int, str, str]:
    """``stbat ARGS`` in-process: (exit code, stdout, stderr); argparse exits count as codes."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()
