"""``stbat`` command line: a thin layer over :mod:`stbat_plugin.pipeline.api`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

from stbat_plugin._registry import registry_with_plugins
from stbat_plugin.pipeline import api, distributed
from stbat_plugin.pipeline.checkpoint import from_checkpoint
from stbat_plugin.pipeline.config import STBAT_FIELDS, TransferConfig, setting_fields
from stbat_plugin.pipeline.io import atomic_write_text
from stbat_plugin.pipeline.method_registry import METHODS
from stbat_plugin.pipeline.paper import given_options
from stbat_plugin.pipeline.results import results_table
from stbat_plugin.pipeline.runfolder import check_writable

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


def _flag_type(f: dataclasses.Field) -> Any:
    if f.metadata.get("parse") is not None:  # e.g. a comma-separated list
        return f.metadata["parse"]
    kind = str(f.type)
    if kind.startswith("dict"):
        return _json_object
    for name, typ in (("int", int), ("float", float), ("str", str)):
        if kind.startswith(name):
            return typ
    raise TypeError(f"TransferConfig.{f.name}: no CLI type for {kind}")  # pragma: no cover


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """One flag per setting (:func:`~stbat_plugin.pipeline.config.setting_fields`: the
    :class:`TransferConfig` fields and the STBaT ones of ``TransferConfig.stbat``), with the
    field's help; unset flags keep the dataclass default (``argparse.SUPPRESS``), so
    defaults live in one place only."""
    groups = {False: p.add_argument_group("run settings (TransferConfig fields)"),
              True: p.add_argument_group("STBaT settings (TransferConfig.stbat, STBaTOptions "
                                         "fields)")}
    defaults = TransferConfig().to_dict()
    for f in setting_fields():
        meta, g = f.metadata, groups[f.name in STBAT_FIELDS]
        flag = "--" + (meta.get("flag") or f.name).replace("_", "-")
        help_text = f"{meta['help']} (default: {defaults[f.name]!r})"
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


def _config(args: argparse.Namespace) -> TransferConfig:
    """The given flags over the defaults."""
    return TransferConfig.from_dict(given_options(args))


class _Parser(argparse.ArgumentParser):
    """argparse under the CLI's error contract: a usage error is one line on stderr, exit 2
    (the usage itself is in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="stbat", description="STBaT cross-city transfer: pre-train on source cities, "
        "adapt to a target city, compare methods. Exit codes: 0 done, 2 a usage or input "
        "error (one line on stderr), 1 an internal error (the traceback with --debug).")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of any error")
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
    t.add_argument("--out", required=True, help="folder for results.jsonl (rows as they come), "
                   "results.json and results.md")
    t.add_argument("--resume", action="store_true",
                   help="finish the run in --out: only the missing (method, train-days, seed) "
                        "rows run; the settings must be those of that run")
    t.add_argument("--overwrite", action="store_true", help="replace the results in --out")
    t.add_argument("--allow-leakage", action="store_true",
                   help="allow a target that is also a source (its test days are then seen in "
                        "pre-training: not a transfer result)")
    _add_run_options(t)

    p = sub.add_parser("pretrain", help="pre-train on source cities and save a checkpoint")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--source", type=_csv, required=True)
    p.add_argument("--method", choices=[m.name for m in METHODS.values() if m.pretrains],
                   default="stbat")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", required=True, help="checkpoint path, e.g. model.ckpt; written "
                   "after every epoch (best model so far + what --resume needs)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted pre-training saved in --save (same command)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save file")
    _add_run_options(p)

    a = sub.add_parser("adapt", help="adapt a checkpoint to a target city and test it")
    a.add_argument("--checkpoint", required=True)
    a.add_argument("--data-dir", required=True)
    a.add_argument("--target", required=True)
    a.add_argument("--train-days", type=int, required=True, help="0 = zero-shot, 3 = few-shot")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", default=None, help="optional folder for metrics.json")
    a.add_argument("--allow-leakage", action="store_true",
                   help="allow a target the checkpoint was pre-trained on over the same days "
                        "(not a transfer result)")
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

    from stbat_plugin.pipeline import paper

    for kind, text in (("ablation", "Fig. 3: STBaT without each component, and fine-tuning"),
                       ("sensitivity", "Fig. 4: STBaT against D, beta, h and tau"),
                       ("scarcity", "Fig. 5: the error as the target's training days grow"),
                       ("efficiency", "Table 3: peak memory and training time per method")):
        x = sub.add_parser(kind, help=f"{text}; resumable, writes OUT/{kind}.md and .png")
        x.add_argument("--out", required=True, help="folder for results.jsonl, the table, the "
                       "figure and the cache; rerun the same command to resume")
        x.add_argument("--data-dir", default=None, help="default: the bundled data/ folder")
        x.add_argument("--seeds", type=int, default=None,
                       help=f"number of seeds (default {paper.BUDGETS[kind]['seeds']})")
        if kind == "scarcity":
            x.add_argument("--tasks", type=_csv, default=None, help="bundled tasks, from "
                           f"{','.join(paper.TASKS)} (default {','.join(paper.BUDGETS[kind]['tasks'])})")
            x.add_argument("--days", type=_days, default=None, help="target training days "
                           f"(default {','.join(map(str, paper.BUDGETS[kind]['train_days']))})")
        else:
            x.add_argument("--task", choices=list(paper.TASKS), default=paper.BUDGETS[kind]["tasks"][0],
                           help=f"bundled task (default {paper.BUDGETS[kind]['tasks'][0]})")
        if kind == "sensitivity":
            x.add_argument("--sweep", type=paper.parse_sweep, action="append", default=None,
                           metavar="FIELD=V1,V2", help="sweep only these values (repeatable); "
                           f"default: {'; '.join(f'{k}={v}' for k, (_, v) in paper.SWEEPS.items())}")
        if kind in ("scarcity", "efficiency"):
            default = paper.SCARCITY_METHODS if kind == "scarcity" else paper.EFFICIENCY_METHODS
            x.add_argument("--methods", type=_method_list, default=list(default),
                           help=f"comma-separated (default {','.join(default)})")
        _add_run_options(x)

    g = sub.add_parser("diagnose", help="a city's regional imbalance: RIAM density and weights "
                       "as a map, similar regions, flow volume; error by bin with results")
    g.add_argument("--data-dir", default=None, help="default: the bundled data/ folder")
    g.add_argument("--city", required=True)
    g.add_argument("--out", required=True, help="folder for diagnose.md, the PNGs and a CSV")
    g.add_argument("--checkpoint", default=None, help="also score this checkpoint per region")
    g.add_argument("--results", action="append", default=None, help="also bin the per-region "
                   "errors of every method of this results file or folder (whose target is "
                   "--city); repeatable")
    g.add_argument("--methods", type=_csv, default=None, help="only these methods of --results "
                   "(comma-separated names or labels; default: all)")
    g.add_argument("--train-days", type=int, default=0, help="fine-tune the checkpoint on this "
                   "many target days first (default 0: score it as it is)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--top-pairs", type=int, default=10, help="most similar pairs listed")
    _add_run_options(g)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; the error contract:

    - 0: done;
    - 2: a usage or input error (bad flag, file, data, settings, a run that diverged): one
      line on stderr that names the problem and the fix;
    - 1: an internal error (a bug): a short message, the traceback only with ``--debug``;
    - 130: interrupted (Ctrl-C); what was written is kept and ``--resume`` finishes it.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print(f"stbat {args.command}: interrupted; what was written is kept (rerun with "
              "--resume where the command has it)", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns errors into exit codes
        if getattr(exc, "from_rank0", False):
            return 2 if user_error_message(exc) is not None else 1  # rank 0 printed it
        if args.debug:
            traceback.print_exc()
        message = user_error_message(exc)
        where = args.command + _rank_note()
        if message is not None:
            print(f"stbat {where}: error: {message}", file=sys.stderr)
            return 2
        print(f"stbat {where}: internal error: {type(exc).__name__}: {_short(exc)}"
              + ("" if args.debug else " (rerun with --debug for the traceback; please report "
                 "it)"), file=sys.stderr)
        return 1


def _rank_note() -> str:
    """`` (rank R)`` in a process of a torchrun launch other than rank 0, else nothing."""
    try:
        env = distributed.launch_env()
    except ValueError:
        return ""
    return f" (rank {env.rank})" if env is not None and env.rank > 0 else ""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _short(exc: BaseException, limit: int = 300) -> str:
    """An internal error's message on one line, cut at ``limit`` characters (the whole
    message and the traceback are shown with ``--debug``)."""
    text = _one_line(str(exc))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message of an error caused by the user's input, or None for a bug.

    Input errors are the library's own (``ValueError`` and its subclasses, ``KeyError`` of
    an unknown name, ``OSError`` of a file), plus what torch and numpy raise on bad files,
    data or hardware, each mapped to its cause and fix.
    """
    import pickle
    import zipfile

    import torch

    if isinstance(exc, KeyError):
        return _one_line(str(exc.args[0]) if exc.args else str(exc))
    if isinstance(exc, torch.OutOfMemoryError):
        return ("out of memory on the device; lower --batch-size or --window, or use a "
                "smaller --backbone-kwargs width")
    if isinstance(exc, MemoryError):
        return ("out of memory; lower --batch-size or --window, cut the series with "
                "--source-span / --target-span, or use a machine with more memory")
    if isinstance(exc, FloatingPointError):
        return _one_line(str(exc))
    if isinstance(exc, zipfile.BadZipFile | EOFError | pickle.UnpicklingError):
        return _one_line(f"a file is damaged or not in the expected format ({exc}); check the "
                         "paths given")
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        return _one_line(f"{exc.strerror or exc}{where}" if exc.strerror else str(exc))
    if isinstance(exc, ValueError):
        return _one_line(str(exc))
    return None


def _dispatch(args: argparse.Namespace) -> int:
    env = distributed.launch_env()
    if env is not None and env.world_size > 1 and args.command != "pretrain":
        error = distributed.DistributedError(
            f"only `stbat pretrain` runs on several processes (torchrun); run `stbat "
            f"{args.command}` as one process")
        error.from_rank0 = env.rank != 0  # type: ignore[attr-defined]  # printed once
        raise error
    if args.command == "datasets":
        print(api.datasets(args.data_dir))
    elif args.command == "backbones":
        print(f"{'name':<16} {'layout':<6} {'plugin':<14} {'distribution':<26} description")
        for b in api.backbones(registry_with_plugins(args.plugin)):
            dist = f"{b['distribution']} {b['version']}" if b["distribution"] else "(not installed)"
            print(f"{b['name']:<16} {b['layout']:<6} {b['plugin']:<14} {dist:<26} {b['description']}")
    elif args.command == "transfer":
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1 (got {args.seeds}): it is the number of seeds")
        rows = api.transfer(args.data_dir, args.source, args.target, train_days=args.train_days,
                            methods=args.methods, seeds=args.seeds, config=_config(args),
                            progress=not args.quiet,
                            registry=registry_with_plugins(args.plugin), out=args.out,
                            resume=args.resume, overwrite=args.overwrite,
                            allow_leakage=args.allow_leakage)
        print(results_table(rows))
        out = Path(args.out)
        print(f"\nwrote {out / 'results.jsonl'}, {out / 'results.json'} and {out / 'results.md'}")
    elif args.command == "pretrain":
        config = _config(args)
        with distributed.session(config.device) as ctx:  # under torchrun: this process's part
            if ctx is not None:
                config = dataclasses.replace(config, device=ctx.device)
            pre = api.pretrain(args.data_dir, args.source, method=args.method, config=config,
                               seed=args.seed, save=args.save, progress=not args.quiet,
                               registry=registry_with_plugins(args.plugin), resume=args.resume,
                               overwrite=args.overwrite)
            if ctx is None or ctx.is_main:
                on = f" with {ctx.world_size} processes" if ctx is not None else ""
                print(f"pre-trained {pre.method} on {','.join(args.source)}{on} in {pre.epochs} "
                      f"epochs ({pre.seconds:.1f}s); saved {args.save}")
    elif args.command == "adapt":
        # read once: the checkpoint's model settings, the given flags over the defaults for
        # the rest (a given model setting must agree with the checkpoint)
        if args.out:  # checked before the fine-tuning, not after it
            check_writable(args.out)
        pre = from_checkpoint(args.checkpoint, given_options(args),
                              registry_with_plugins(args.plugin))
        result = api.adapt(pre, args.data_dir, args.target, args.train_days, seed=args.seed,
                           progress=not args.quiet, allow_leakage=args.allow_leakage)
        text = json.dumps(result, indent=1)
        print(text)
        if args.out:
            atomic_write_text(Path(args.out) / "metrics.json", text)
    elif args.command == "experiment":
        from stbat_plugin.pipeline.experiment import run_experiment

        summary = run_experiment(args.spec, args.out, data_dir=args.data_dir,
                                 progress=not args.quiet, tasks=args.tasks, seeds=args.seeds,
                                 registry=registry_with_plugins(args.plugin))
        print(summary.report_path.read_text())
        print(f"ran {summary.units_run} of {summary.units} unit(s) ({summary.units_skipped} "
              f"already done) in {summary.seconds:.1f} s; wrote {summary.results_path} and "
              f"{summary.report_path}")
    elif args.command == "report":
        from stbat_plugin.pipeline.report import write_report

        path = write_report(args.out[0], more=args.out[1:])
        print(path.read_text())
        print(f"wrote {path}")
    elif args.command in ("ablation", "sensitivity", "scarcity", "efficiency"):
        from stbat_plugin.pipeline.paper import run_command

        paper_result = run_command(args)
        print(paper_result.markdown)
        print(f"wrote {paper_result.table_path}"
              + (f" and {paper_result.png_path}" if paper_result.png_path else ""))
    elif args.command == "diagnose":
        from stbat_plugin.pipeline.diagnose import run_command as run_diagnose

        done = run_diagnose(args)
        print(done.markdown)
        print(f"wrote {done.report_path} and {', '.join(str(p) for p in done.png_paths)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
