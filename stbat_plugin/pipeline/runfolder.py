"""The output folder of ``stbat transfer``: rows written as they come, resumable, never clobbered.

``OUT/run.json`` names the run (sources, target, config); ``OUT/results.jsonl`` receives every
batch of rows (one method, train-days and seed) with one write and an fsync as soon as it
exists, so a killed run loses at most the batch in progress. ``OUT/results.json`` and
``OUT/results.md`` are rendered from all rows at the end. A folder holding an earlier run is
refused unless the caller asks to resume it (same run only) or to overwrite it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stbat_plugin.pipeline.config import TransferConfig
from stbat_plugin.pipeline.io import atomic_write_text, exclusive_folder
from stbat_plugin.pipeline.results import append_rows, read_results, write_results

__all__ = ["RunFolder", "check_writable", "RUN_FILE", "ROWS_FILE"]

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
ROWS_FILE = "results.jsonl"
_OURS = (ROWS_FILE, RUN_FILE, "results.json", "results.md")


def check_writable(folder: str | Path, flag: str = "--out") -> None:
    """Refuse, before any work, an output folder that cannot be created or written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{flag} {folder} exists and is not a directory; choose "
                                 "another path")
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"{flag} {folder}: {probe} is a file, so the folder cannot be "
                                 "created; choose another path")
    try:
        fd, name = tempfile.mkstemp(prefix=".stbat-write-probe.", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise PermissionError(f"{flag} {folder} is not writable ({exc.strerror or exc}); choose "
                              "a folder you can write to") from exc


class RunFolder:
    """The output folder of one run (see the module docstring)."""

    def __init__(self, out: str | Path, *, resume: bool = False, overwrite: bool = False) -> None:
        if resume and overwrite:
            raise ValueError("--resume and --overwrite contradict each other: --resume finishes "
                             "the run in --out, --overwrite starts it again; give one")
        self.out = Path(out)
        self.resume, self.overwrite = resume, overwrite
        check_writable(self.out)
        found = [name for name in _OURS if (self.out / name).exists()]
        if found and not (resume or overwrite):
            raise FileExistsError(
                f"--out {self.out} already holds results ({', '.join(found)}); add --resume to "
                "finish that run, --overwrite to replace it, or choose another --out")
        self.rows: list[dict[str, Any]] = []

    @property
    def rows_path(self) -> Path:
        return self.out / ROWS_FILE

    @contextlib.contextmanager
    def open(self, identity: dict[str, Any]) -> Iterator[set[tuple[str, int, int]]]:
        """Lock the folder, check or write ``run.json``; yields the keys
        ``(method, train_days, seed)`` of the batches already done."""
        self.out.mkdir(parents=True, exist_ok=True)
        with exclusive_folder(self.out, "`stbat transfer`"):
            if self.overwrite:
                for name in _OURS:
                    (self.out / name).unlink(missing_ok=True)
            run_file = self.out / RUN_FILE
            if run_file.exists():
                _check_same_run(run_file, identity)
            elif self.rows_path.exists():
                raise ValueError(f"--out {self.out} has a {ROWS_FILE} but no {RUN_FILE}; it was "
                                 "not written by `stbat transfer`: choose another --out")
            else:
                atomic_write_text(run_file, json.dumps(identity, indent=1, sort_keys=True))
            self.rows = read_results(self.rows_path, repair=True)
            if self.rows:
                log.info("%s: %d row(s) of an earlier run kept; running what is missing",
                         self.out, len(self.rows))
            yield {(r["method"], int(r["train_days"]), int(r["seed"])) for r in self.rows}

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Append one batch of rows (ending with its ``channel == "mean"`` row)."""
        append_rows(self.rows_path, rows)
        self.rows.extend(rows)

    def finish(self) -> list[dict[str, Any]]:
        """Render ``results.json`` and ``results.md`` from every row; returns the rows."""
        write_results(self.rows, self.out)
        return self.rows


def _check_same_run(run_file: Path, identity: dict[str, Any]) -> None:
    try:
        saved = json.loads(run_file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{run_file} is not readable ({exc}); delete the folder's results or "
                         "use --overwrite") from exc
    if not isinstance(saved, dict):
        raise ValueError(f"{run_file} is not a run description; use --overwrite or another --out")
    fresh = json.loads(json.dumps(identity, sort_keys=True))
    if isinstance(saved.get("config"), dict):  # settings added since: compared at their default
        try:
            saved["config"] = TransferConfig.from_saved(saved["config"]).to_dict()
        except ValueError:
            pass  # an unknown or invalid setting: the diff below names it
        saved = json.loads(json.dumps(saved, sort_keys=True))
    diff = _diff(saved, fresh)
    if diff:
        raise ValueError(f"--out {run_file.parent} holds another run; it differs in "
                         f"{'; '.join(diff[:6])}. --resume only finishes the same run: give the "
                         "same settings, --overwrite, or another --out")


def _diff(saved: Any, fresh: Any, where: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(fresh, dict):
        out = []
        for key in sorted(set(saved) | set(fresh)):
            name = f"{where}.{key}" if where else str(key)
            out += _diff(saved.get(key, "<missing>"), fresh.get(key, "<missing>"), name)
        return out
    return [] if saved == fresh else [f"{where}: was {saved!r}, now {fresh!r}"]
