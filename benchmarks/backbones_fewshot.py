"""One measured few-shot result per built-in backbone, from the `stbat transfer` pipeline.

Graph backbones: NYC bike + taxi -> Melbourne pedestrians (the demo task, bundled data).
Grid backbones (and graph_stnet, for comparison): NYC Citi Bike 2014 grid, Aug 8 - Sep 5 as
source and Sep 6 - 30 as target (the only grid city available). Prints a markdown table.

Usage: python benchmarks/backbones_fewshot.py [--seeds 1] [--out runs/backbones]

With ``--out DIR`` each run also writes its result files (``results.jsonl``, ``.json``, ``.md``,
every row with its per-region errors) to ``DIR/<backbone>-<task>/``, and the table goes to
``DIR/backbones.md``; a ``DIR`` that already holds these runs is refused (choose a new one).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from stbat_plugin import create_backbone, default_registry
from stbat_plugin.pipeline import api
from stbat_plugin.pipeline.config import TransferConfig
from stbat_plugin.pipeline.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"graph_stnet": {"channels": 32, "hidden": 64}, "stnet": {"channels": 32, "hidden": 64}}


def run(backbone: str, task: str, seeds: int, out: Path | None = None
        ) -> tuple[list[dict], float]:
    """Rows of STBaT and fine-tuning on ``task`` (written to ``out`` when given) and seconds."""
    # the paper's input pipeline, as when docs/backbones.md was measured
    common = dict(backbone=backbone, backbone_kwargs=SMALL.get(backbone, {}), max_epochs=5,
                  max_batches_per_epoch=30, finetune_epochs=20, patience=3, window=6,
                  normalize="none", linear_skip=False, lag_days=[])
    if task == "grid":
        config = TransferConfig(source_span="2014-08-08:2014-09-05",
                                target_span="2014-09-06:2014-09-30", val_days=7, test_days=14,
                                **common)
        args = (["nyc_bike_grid2014"], "nyc_bike_grid2014")
    else:
        config = TransferConfig(source_span="2019-02-01:2019-03-31", val_days=14, test_days=28,
                                **common)
        args = (["nyc_bike", "nyc_taxi"], "melbourne_pedestrian")
    start = time.perf_counter()
    rows = api.transfer(ROOT / "data", *args, train_days=[3], methods=["stbat", "finetune"],
                        seeds=seeds, config=config, progress=False, out=out)
    return rows, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description="One measured few-shot result per built-in "
                                     "backbone (docs/backbones.md).")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per run (default: 1)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for each run's result files and the table (backbones.md)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    lines = ["| backbone | layout | task | params | stbat RMSE | stbat MAE | finetune RMSE | "
             "finetune MAE | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for spec in default_registry().specs():
        tasks = ["grid"] if spec.layout == "grid" else ["nyc2mel"]
        if spec.name == "graph_stnet":
            tasks.append("grid")
        for task in tasks:
            folder = None if args.out is None else args.out / f"{spec.name}-{task}"
            rows, seconds = run(spec.name, task, args.seeds, folder)
            mean = {r["method"]: r for r in rows if r["channel"] == "mean" and r["seed"] == 0}
            params = sum(p.numel() for p in create_backbone(
                spec.name, in_channels=1, **SMALL.get(spec.name, {})).parameters())
            lines.append(f"| {spec.name} | {spec.layout} | {task} | {params:,} | "
                         f"{mean['stbat']['rmse']:.2f} | {mean['stbat']['mae']:.2f} | "
                         f"{mean['finetune']['rmse']:.2f} | {mean['finetune']['mae']:.2f} | "
                         f"{seconds:.0f} |")
            print(lines[-1], flush=True)
    if args.out is not None:
        path = atomic_write_text(args.out / "backbones.md", "\n".join(lines) + "\n")
        print(f"\nwrote {path} and the result files of each run under {args.out}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
