"""``--precision bf16``: the training forward passes under bfloat16 autocast, losses in float32.

On CPU (torch's CPU autocast supports bfloat16) the forward of a training step runs in
bfloat16 while the losses, the parameters and the RIAM state stay float32; the pipeline runs
end to end with finite metrics. Tests marked ``gpu`` run the same on CUDA where a GPU exists.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _cli_helpers import run_cli

from stbat_plugin._registry import create_backbone
from stbat_plugin.precision import autocast
from stbat_plugin.wrapper import BalancedTransfer

TINY = Path(__file__).parents[1] / "data" / "tiny"
RUN = ["--data-dir", str(TINY), "--source", "nyc_taxi", "--target", "melbourne_pedestrian",
       "--source-span", "2019-03-25:2019-03-31", "--val-days", "3", "--test-days", "4",
       "--max-epochs", "1", "--finetune-epochs", "1", "--max-batches-per-epoch", "2",
       "--batch-size", "8", "--backbone-kwargs", '{"channels": 8, "hidden": 16}', "--quiet",
       "--methods", "stbat,finetune,linear", "--train-days", "3"]


def test_bf16_runs_the_forward_in_bfloat16_and_keeps_losses_and_state_in_float32():
    torch.manual_seed(0)
    n = 6
    model = BalancedTransfer(create_backbone("graph_stnet", in_channels=1, channels=8, hidden=8),
                             region_features={"a": torch.rand(n, 4) + 0.1})
    model.precision = "bf16"
    seen: list[torch.dtype] = []
    model.net.head.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    x, y = torch.rand(4, 6, n, 1), torch.rand(4, 1, n, 1)
    ring = torch.arange(n)
    losses = model.train_iteration(x, y, model.configure_optimizers(),
                                   edge_index=torch.stack([ring, (ring + 1) % n]))
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert all(math.isfinite(v) for v in losses.as_dict().values())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.cities["a"].log_density.dtype == torch.float32


def test_fp32_uses_no_autocast_and_unknown_precision_is_refused():
    with autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="fp32.*bf16"):
        with autocast("cpu", "fp16"):
            pass


def _transfer(tmp_path: Path, *extra: str) -> list[dict]:
    out = tmp_path / "out"
    code, _, err = run_cli(["transfer", *RUN, *extra, "--out", out])
    assert code == 0, err
    return json.loads((out / "results.json").read_text())


def test_bf16_transfer_runs_end_to_end_on_cpu(tmp_path):
    rows = _transfer(tmp_path, "--precision", "bf16")
    assert {r["method"] for r in rows} == {"stbat", "finetune", "linear"}
    assert all(math.isfinite(r["rmse"]) for r in rows)
    assert {r["config"]["precision"] for r in rows} == {"bf16"}


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_transfer_end_to_end(tmp_path, precision):
    rows = _transfer(tmp_path, "--device", "cuda", "--precision", precision)
    assert all(math.isfinite(r["rmse"]) for r in rows)
