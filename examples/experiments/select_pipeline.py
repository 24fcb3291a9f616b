"""The selection runs behind the pipeline defaults (docs/results.md), on VALIDATION data.

Two tasks, seed 0, fine-tuning and NLinear, 3-day few-shot and zero-shot; each variant of the
input pipeline is one `api.transfer` call with the same budget. (These runs predate the lag
inputs: every variant pins ``lag_days=[]``; the later selection of the scaler, lag inputs,
calibration and fine-tuning learning rate is ``examples/experiments/select_adaptation.toml``.)
The defaults were chosen by the target-validation RMSE in the rows' ``info.val_rmse``; test
numbers are printed but were not used.

    python examples/experiments/select_pipeline.py OUT.jsonl [TASK]   # TASK: nyc2mel or bike
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from stbat_plugin.pipeline import api
from stbat_plugin.pipeline.config import TransferConfig

ROOT = Path(__file__).resolve().parents[2]
TASKS = {
    "nyc2mel": (["nyc_bike", "nyc_taxi"], "melbourne_pedestrian",
                {"source_span": "2019-02-01:2019-02-28"}),
    "bike": (["melbourne_pedestrian", "nyc_taxi"], "nyc_bike",
             {"source_span": "nyc_taxi=2019-02-01:2019-02-28,melbourne_pedestrian=2022-02-01:2022-02-28",
              "target_span": "2019-01-01:2019-12-31"}),
}
PAPER = {"window": 6, "normalize": "none", "linear_skip": False, "lag_days": []}
VARIANTS = [
    PAPER,
    {**PAPER, "window": 24},
    {**PAPER, "window": 24, "normalize": "last"},
    {**PAPER, "window": 24, "normalize": "revin-last"},
    {"window": 24, "normalize": "revin-last", "linear_skip": True, "lag_days": []},
    {"window": 24, "normalize": "revin-last", "linear_skip": True, "time_features": True,
     "lag_days": []},
    {"window": 48, "normalize": "revin-last", "linear_skip": True, "lag_days": []},
]
BUDGET = dict(backbone="graph_stnet", backbone_kwargs={"channels": 16, "hidden": 16},
              max_epochs=20, patience=3, finetune_epochs=30)


def main(out: str, tasks: list[str]) -> None:
    torch.set_num_threads(1)
    for name in tasks:
        sources, target, extra = TASKS[name]
        for variant in VARIANTS:
            config = TransferConfig(**{**BUDGET, **extra, **variant})
            rows = api.transfer(ROOT / "data", sources, target, train_days=[3, 0],
                                methods=["finetune", "linear"], seeds=[0], config=config,
                                progress=False)
            with open(out, "a") as fh:
                for r in rows:
                    if r["channel"] == "mean":
                        keep = {k: r[k] for k in ("method", "train_days", "seed", "rmse", "mae")}
                        fh.write(json.dumps({"task": name, "variant": variant, **keep,
                                             "val_rmse": r["info"]["val_rmse"]}) + "\n")
            print(name, variant, "done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(TASKS))
