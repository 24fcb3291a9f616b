"""`make demo`: a real few-shot and zero-shot cross-city transfer on the bundled data.

NYC Citi Bike + NYC yellow taxi (69 Manhattan zones, 2 channels, POI) -> Melbourne
pedestrian sensors (55 sensors, 1 channel): STBaT, plain fine-tuning, NLinear, target-only
training and the classical floor (persistence, seasonal naive, ARIMA), all deep methods with
the same backbone, settings and seeds (the library defaults, chosen on validation; see
docs/results.md). Its measured run time and results are in docs/results.md, "`make demo`";
the full study is `stbat experiment examples/experiments/study.toml`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from stbat_plugin.pipeline import api
from stbat_plugin.pipeline.config import TransferConfig
from stbat_plugin.pipeline.results import results_table, write_results

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["stbat", "finetune", "linear", "target-only", "persistence", "seasonal", "arima"]


def main(out: Path = ROOT / "runs" / "demo", seeds: int = 2) -> str:
    logging.basicConfig(level=logging.WARNING)
    config = TransferConfig(
        backbone="graph_stnet",
        backbone_kwargs={"channels": 16, "hidden": 16},  # CPU-sized, as in the study
        source_span="2019-02-01:2019-02-28",  # one clean winter month of each source
        val_days=14,
        test_days=28,
        max_epochs=10,
        patience=3,
        finetune_epochs=20,
    )
    start = time.perf_counter()
    histories: dict = {}
    rows = api.transfer(ROOT / "data", ["nyc_bike", "nyc_taxi"], "melbourne_pedestrian",
                        train_days=[3, 0], methods=METHODS, seeds=seeds, config=config,
                        progress=False, histories=histories)
    write_results(rows, out)
    print(_loss_table(histories[("stbat", 0)], "STBaT around graph_stnet on NYC bike + taxi "
                                               "zones (descriptors: POI), seed 0"))
    table = results_table(rows)
    print(f"\nNYC bike + taxi -> Melbourne pedestrians (graph_stnet, {seeds} seeds; target: "
          f"3 training days, {config.val_days} validation days, last {config.test_days} days "
          f"tested; window {config.window}, normalize {config.normalize}, linear skip "
          f"{config.linear_skip}, lag days {config.lag_days}; pedestrians per hour)\n")
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
