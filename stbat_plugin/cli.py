"""``stbat`` command line: a thin layer over :mod:`stbat_plugin.api`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from stbat_plugin import api
from stbat_plugin.checkpoint import load_checkpoint
from stbat_plugin.config import METHODS, TransferConfig
from stbat_plugin.results import atomic_write_text, results_table, write_results

__all__ = ["main", "build_parser"]


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


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
_MODEL_OPTIONS = ("backbone", "backbone_kwargs", "window", "horizon", "scaler")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run size and protocol")
    g.add_argument("--backbone", default="graph_stnet", help="registered backbone name")
    g.add_argument("--backbone-kwargs", type=_json_object, default={},
                   help='JSON keyword arguments of the backbone, e.g. \'{"hidden": 64}\'')
    g.add_argument("--max-epochs", type=int, default=50, help="pre-training epochs (upper bound)")
    g.add_argument("--finetune-epochs", type=int, default=50, help="target fine-tuning epochs")
    g.add_argument("--patience", type=int, default=5, help="early-stopping patience (epochs)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--max-batches-per-epoch", type=int, default=None)
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    g.add_argument("--source-span", default=None, help="cut source series, e.g. 2019-01-01:2019-06-30")
    g.add_argument("--target-span", default=None, help="cut the target series")
    g.add_argument("--window", type=int, default=6)
    g.add_argument("--horizon", type=int, default=1)
    g.add_argument("--val-days", type=int, default=60)
    g.add_argument("--test-days", type=int, default=60)
    g.add_argument("--scaler", choices=["minmax", "zscore"], default="minmax")
    g.add_argument("--descriptors", choices=["auto", "poi", "temporal_profile"], default="auto")
    s = p.add_argument_group("STBaT ablations (paper Fig. 3)")
    for flag in ("poi", "fdp", "simdcl", "wloss"):
        s.add_argument(f"--no-{flag}", action="store_true", help=f"STBaT w/o {flag}")
    s.add_argument("--simdcl-weight", type=float, default=0.01,
                   help="weight of SimDCL next to the prediction loss")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace) -> TransferConfig:
    return TransferConfig(
        backbone=args.backbone, backbone_kwargs=args.backbone_kwargs, max_epochs=args.max_epochs,
        finetune_epochs=args.finetune_epochs,
        patience=args.patience, batch_size=args.batch_size, lr=args.lr, finetune_lr=args.lr,
        max_batches_per_epoch=args.max_batches_per_epoch, device=args.device,
        source_span=args.source_span, target_span=args.target_span, window=args.window,
        horizon=args.horizon, val_days=args.val_days, test_days=args.test_days,
        scaler=args.scaler, descriptors=args.descriptors, use_poi=not args.no_poi,
        use_fdp=not args.no_fdp, use_simdcl=not args.no_simdcl,
        use_weighted_loss=not args.no_wloss, simdcl_weight=args.simdcl_weight,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stbat", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("transfer", help="compare methods on one cross-city task")
    t.add_argument("--data-dir", required=True)
    t.add_argument("--source", type=_csv, required=True, help="comma-separated source cities")
    t.add_argument("--target", required=True)
    t.add_argument("--train-days", type=_days, default=[3], help="e.g. 3, or 3,0 for both")
    t.add_argument("--methods", type=_csv, default=["stbat", "finetune", "target-only", "ha"],
                   help=f"comma-separated, from {','.join(METHODS)}")
    t.add_argument("--seeds", type=int, default=1)
    t.add_argument("--out", required=True, help="folder for results.json and results.md")
    _add_run_options(t)

    p = sub.add_parser("pretrain", help="pre-train on source cities and save a checkpoint")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--source", type=_csv, required=True)
    p.add_argument("--method", choices=["stbat", "finetune", "maml"], default="stbat")
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
    _add_run_options(a)
    # default: the checkpoint's own model settings (given ones are checked against it)
    a.set_defaults(**{key: None for key in _MODEL_OPTIONS})

    d = sub.add_parser("datasets", help="list the cities of a data folder")
    d.add_argument("--data-dir", required=True)
    sub.add_parser("backbones", help="list installed backbones and their plugins")
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
        for b in api.backbones():
            dist = f"{b['distribution']} {b['version']}" if b["distribution"] else "(not installed)"
            print(f"{b['name']:<16} {b['layout']:<6} {b['plugin']:<14} {dist:<26} {b['description']}")
    elif args.command == "transfer":
        out = Path(args.out)
        if out.exists() and not out.is_dir():  # fail before the run, not after it
            raise NotADirectoryError(f"--out {out} exists and is not a directory; choose another path")
        rows = api.transfer(args.data_dir, args.source, args.target, train_days=args.train_days,
                            methods=args.methods, seeds=args.seeds, config=_config(args),
                            progress=not args.quiet)
        json_path, md_path = write_results(rows, args.out)
        print(results_table(rows))
        print(f"\nwrote {json_path} and {md_path}")
    elif args.command == "pretrain":
        pre = api.pretrain(args.data_dir, args.source, method=args.method, config=_config(args),
                           seed=args.seed, save=args.save, progress=not args.quiet)
        print(f"pre-trained {pre.method} on {','.join(args.source)} in {pre.epochs} epochs "
              f"({pre.seconds:.1f}s); saved {args.save}")
    elif args.command == "adapt":
        saved = load_checkpoint(args.checkpoint)["config"]
        for key in _MODEL_OPTIONS:
            if getattr(args, key) is None:
                setattr(args, key, saved[key])
        result = api.adapt(args.checkpoint, args.data_dir, args.target, args.train_days,
                           config=_config(args), seed=args.seed, progress=not args.quiet)
        text = json.dumps(result, indent=1)
        print(text)
        if args.out:
            atomic_write_text(Path(args.out) / "metrics.json", text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
