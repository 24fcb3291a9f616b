"""How many fuzz cases one pytest session ran, by suite and outcome (issue 10).

Every generated case of ``test_loader_fuzz.py`` and ``test_functional_fuzz.py`` calls
:func:`record` exactly once, with what became of it: ``accepted and ran`` (the loader),
``accepted`` (a finite result of the functional layer), or ``refused: <ErrorType>``.
``conftest.py`` prints the tally at the end of the session (``make test`` shows it) and,
when ``STBAT_FUZZ_TALLY`` names a file, writes it there as JSON.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

__all__ = ["TALLY", "record", "refused", "lines", "write"]

#: (suite, outcome) -> number of cases
TALLY: Counter[tuple[str, str]] = Counter()


def record(suite: str, outcome: str) -> str:
    """Count one case of ``suite``; returns ``outcome``."""
    TALLY[(suite, outcome)] += 1
    return outcome


def refused(err: BaseException, stage: str = "") -> str:
    """The outcome of a case refused with ``err``, e.g. ``refused at load: CityDataError``."""
    return f"refused{' ' + stage if stage else ''}: {type(err).__name__}"


def _by(key: int) -> Counter[str]:
    out: Counter[str] = Counter()
    for parts, count in TALLY.items():
        out[parts[key]] += count
    return out


def lines() -> list[str]:
    """The tally as text: the total, then one line per suite with its count by outcome."""
    if not TALLY:
        return []
    out = [f"{sum(TALLY.values())} fuzz cases"]
    for suite, total in sorted(_by(0).items()):
        parts = [f"{outcome} {count}" for (s, outcome), count in sorted(TALLY.items())
                 if s == suite]
        out.append(f"  {suite}: {total} = {'; '.join(parts)}")
    return out


def write(path: str | Path) -> None:
    """Write the tally as JSON: ``{"total": N, "suites": {suite: {outcome: count}}}``."""
    suites: dict[str, dict[str, int]] = {}
    for (suite, outcome), count in sorted(TALLY.items()):
        suites.setdefault(suite, {})[outcome] = count
    Path(path).write_text(json.dumps({"total": sum(TALLY.values()), "suites": suites}, indent=1))
