"""`make demo`: a real few-shot and zero-shot cross-city transfer on the bundled data.

NYC Citi Bike + NYC yellow taxi (69 Manhattan zones, 2 channels, POI) -> Melbourne
pedestrian sensors (55 sensors, 1 channel), with STBaT, plain fine-tuning,
target-only training and historical average, same backbone and seeds.
Sized to finish in about 10 minutes on 2 CPU cores; see docs/results.md for
full-size runs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from stbat_plugin import api
from stbat_plugin.config import TransferConfig
from stbat_plugin.results import results_table, write_results

ROOT = Path(__file__).resolve().parents[1]


def main(out: Path = ROOT / "runs" / "demo", seeds: int = 2) -> str:
    logging.basicConfig(level=logging.WARNING)
    config = TransferConfig(
        backbone="graph_stnet",
        backbone_kwargs={"channels": 32, "hidden": 64},  # half the paper's widths, for 2 CPUs
        source_span="2019-02-01:2019-03-31",  # two clean winter months of each source
        val_days=14,
        test_days=28,
        max_epochs=5,
        max_batches_per_epoch=30,
        finetune_epochs=20,
        patience=3,
    )
    start = time.perf_counter()
    grid = api.pretrain(ROOT / "data", ["nyc_bike_grid2014"], method="stbat", progress=False,
                        config=TransferConfig(backbone="stnet", max_epochs=4,
                                              backbone_kwargs={"channels": 32, "hidden": 64},
                                              max_batches_per_epoch=30))
    print(_loss_table(grid.history, f"STBaT around stnet on the NYC 2014 grid "
                                    f"(descriptors: {grid.data['descriptors']})"))
    histories: dict = {}
    rows = api.transfer(ROOT / "data", ["nyc_bike", "nyc_taxi"], "melbourne_pedestrian",
                        train_days=[3, 0], methods=["stbat", "finetune", "target-only", "ha"],
                        seeds=seeds, config=config, progress=False, histories=histories)
    write_results(rows, out)
    print(_loss_table(histories[("stbat", 0)], "STBaT around graph_stnet on NYC bike + taxi "
                                               "zones (descriptors: POI), seed 0"))
    table = results_table(rows)
    print(f"\nNYC bike + taxi -> Melbourne pedestrians (graph_stnet, {seeds} seeds; target: "
          f"3 training days, {config.val_days} validation days, last {config.test_days} days "
          "tested; pedestrians per hour)\n")
    print(table)
    print(f"\n{time.perf_counter() - start:.0f}s; rows in {out}/results.json")
    return table


def _loss_table(history: list[dict], title: str) -> str:
    """Every loss term of STBaT pre-training per epoch (means over the epoch)."""
    keys = ["pred", "simdcl", "poi_ce", "kld", "emb", "val"]
    lines = [f"\n{title}: epoch means of each loss term, source validation RMSE (scaled)",
             "epoch " + " ".join(f"{k:>10}" for k in keys)]
    for h in history[1:]:
        lines.append(f"{h['epoch']:>5} " + " ".join(f"{h.get(k, float('nan')):>10.4g}" for k in keys))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
