"""``stbat`` command line: a thin layer over :mod:`stbat_plugin.api`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from stbat_plugin import api
from stbat_plugin._io import atomic_write_text
from stbat_plugin._registry import registry_with_plugins
from stbat_plugin.checkpoint import load_checkpoint
from stbat_plugin.config import TransferConfig
from stbat_plugin.method_registry import METHODS
from stbat_plugin.results import results_table, write_results

__all__ = ["main", "build_parser"]


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _method_list(text: str) -> list[str]:
    names = _csv(text)
    if not names:
        raise argparse.ArgumentTypeError(f"--methods needs at least one method (got {text!r}); "
                                         f"choose from {','.join(METHODS)}")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from "
                                         f"{','.join(METHODS)}")
    return names


def _days(text: str) -> list[int]:
    try:
        values = [int(p) for p in _csv(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"--train-days takes integers like 3 or 3,0 (got {text!r})") from exc
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"--train-days must be >= 0 (got {text!r})")
    return values


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object like '{{\"hidden\": 64}}' (got {text!r})")
    return value


#: model settings a checkpoint fixes; ``stbat adapt`` takes them from the checkpoint
_MODEL_OPTIONS = tuple(TransferConfig().model_signature())


def _flag_type(f: dataclasses.Field) -> Any:
    kind = str(f.type)
    if kind.startswith("dict"):
        return _json_object
    for name, typ in (("int", int), ("float", float), ("str", str)):
        if kind.startswith(name):
            return typ
    raise TypeError(f"TransferConfig.{f.name}: no CLI type for {kind}")  # pragma: no cover


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`TransferConfig` field, with the field's help; unset flags keep
    the dataclass default (``argparse.SUPPRESS``), so defaults live in one place only."""
    g = p.add_argument_group("run settings (TransferConfig fields)")
    for f in dataclasses.fields(TransferConfig):
        meta = f.metadata
        flag = "--" + (meta.get("flag") or f.name).replace("_", "-")
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        help_text = f"{meta['help']} (default: {default!r})"
        if str(f.type) == "bool":
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_text)
        else:
            g.add_argument(flag, dest=f.name, type=_flag_type(f), choices=meta.get("choices"),
                           default=argparse.SUPPRESS, help=help_text)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_plugin_option(p)


def _add_plugin_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE[:NAME]",
                   help="also use this plugin (a module, or a .py file, or NAME in it), next to "
                        "the installed ones; repeatable")


def _config(args: argparse.Namespace, base: dict[str, Any] | None = None) -> TransferConfig:
    """The given flags over ``base`` (e.g. a checkpoint's settings) over the defaults."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TransferConfig)
             if hasattr(args, f.name)}
    return TransferConfig(**{**(base or {}), **given})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stbat", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("transfer", help="compare methods on one cross-city task")
    t.add_argument("--data-dir", required=True)
    t.add_argument("--source", type=_csv, required=True, help="comma-separated source cities")
    t.add_argument("--target", required=True)
    t.add_argument("--train-days", type=_days, default=[3], help="e.g. 3, or 3,0 for both")
    t.add_argument("--methods", type=_method_list, default=list(api.DEFAULT_METHODS),
                   help="comma-separated, from: " + "; ".join(
                       f"{m.name} ({m.summary})" for m in METHODS.values()))
    t.add_argument("--seeds", type=int, default=1)
    t.add_argument("--out", required=True, help="folder for results.json and results.md")
    _add_run_options(t)

    p = sub.add_parser("pretrain", help="pre-train on source cities and save a checkpoint")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--source", type=_csv, required=True)
    p.add_argument("--method", choices=[m.name for m in METHODS.values() if m.pretrains],
                   default="stbat")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", required=True, help="checkpoint path, e.g. model.ckpt")
    _add_run_options(p)

    a = sub.add_parser("adapt", help="adapt a checkpoint to a target city and test it")
    a.add_argument("--checkpoint", required=True)
    a.add_argument("--data-dir", required=True)
    a.add_argument("--target", required=True)
    a.add_argument("--train-days", type=int, required=True, help="0 = zero-shot, 3 = few-shot")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", default=None, help="optional folder for metrics.json")
    _add_run_options(a)  # model settings default to the checkpoint's (given ones are checked)

    d = sub.add_parser("datasets", help="list the cities of a data folder")
    d.add_argument("--data-dir", required=True)
    _add_plugin_option(sub.add_parser("backbones", help="list installed backbones and their "
                                      "plugins"))

    e = sub.add_parser("experiment", help="run (or resume) the experiment of a TOML spec")
    e.add_argument("spec", help="the TOML spec: tasks, methods, seeds, settings, grid")
    e.add_argument("--out", required=True, help="folder for results.jsonl, report.md and the "
                   "cache; rerun the same command to resume")
    e.add_argument("--data-dir", default=None, help="overrides the spec's data_dir")
    e.add_argument("--tasks", type=_csv, default=None,
                   help="run only these tasks of the spec (comma-separated names), e.g. to "
                        "split a spec over processes with one --out each")
    e.add_argument("--seeds", type=lambda t: [int(v) for v in _csv(t)], default=None,
                   help="run only these of the spec's seeds (comma-separated), e.g. 0,1")
    e.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    _add_plugin_option(e)

    r = sub.add_parser("report", help="the markdown report of experiment folders")
    r.add_argument("out", nargs="+", help="the --out folder(s) of `stbat experiment`; several "
                   "are merged and the report is written into the first")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except (ValueError, KeyError, OSError, TypeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"stbat {args.command}: error: {msg}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "datasets":
        print(api.datasets(args.data_dir))
    elif args.command == "backbones":
        print(f"{'name':<16} {'layout':<6} {'plugin':<14} {'distribution':<26} description")
        for b in api.backbones(registry_with_plugins(args.plugin)):
            dist = f"{b['distribution']} {b['version']}" if b["distribution"] else "(not installed)"
            print(f"{b['name']:<16} {b['layout']:<6} {b['plugin']:<14} {dist:<26} {b['description']}")
    elif args.command == "transfer":
        out = Path(args.out)
        if out.exists() and not out.is_dir():  # fail before the run, not after it
            raise NotADirectoryError(f"--out {out} exists and is not a directory; choose another path")
        rows = api.transfer(args.data_dir, args.source, args.target, train_days=args.train_days,
                            methods=args.methods, seeds=args.seeds, config=_config(args),
                            progress=not args.quiet,
                            registry=registry_with_plugins(args.plugin))
        json_path, md_path = write_results(rows, args.out)
        print(results_table(rows))
        print(f"\nwrote {json_path} and {md_path}")
    elif args.command == "pretrain":
        pre = api.pretrain(args.data_dir, args.source, method=args.method, config=_config(args),
                           seed=args.seed, save=args.save, progress=not args.quiet,
                           registry=registry_with_plugins(args.plugin))
        print(f"pre-trained {pre.method} on {','.join(args.source)} in {pre.epochs} epochs "
              f"({pre.seconds:.1f}s); saved {args.save}")
    elif args.command == "adapt":
        saved = load_checkpoint(args.checkpoint)["config"]
        base = {key: saved[key] for key in _MODEL_OPTIONS if key in saved}
        result = api.adapt(args.checkpoint, args.data_dir, args.target, args.train_days,
                           config=_config(args, base), seed=args.seed, progress=not args.quiet,
                           registry=registry_with_plugins(args.plugin))
        text = json.dumps(result, indent=1)
        print(text)
        if args.out:
            atomic_write_text(Path(args.out) / "metrics.json", text)
    elif args.command == "experiment":
        from stbat_plugin.experiment import run_experiment

        summary = run_experiment(args.spec, args.out, data_dir=args.data_dir,
                                 progress=not args.quiet, tasks=args.tasks, seeds=args.seeds,
                                 registry=registry_with_plugins(args.plugin))
        print(summary.report_path.read_text())
        print(f"ran {summary.units_run} of {summary.units} unit(s) ({summary.units_skipped} "
              f"already done) in {summary.seconds:.1f} s; wrote {summary.results_path} and "
              f"{summary.report_path}")
    elif args.command == "report":
        from stbat_plugin.report import write_report

        path = write_report(args.out[0], more=args.out[1:])
        print(path.read_text())
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
