"""Checkpoints of pre-trained transferable networks: pre-train once, adapt everywhere.

A checkpoint is a ``torch.save`` dict carrying the network's ``state_dict``, the
run config, the library version, the backbone name and a description of the
source data. Writes are atomic: a temporary file in the same folder, then
``os.replace``, so an interrupted save never leaves a half-written file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from stbat_plugin.pipeline.config import TransferConfig
from stbat_plugin.pipeline.io import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "FORMAT", "READABLE"]

log = logging.getLogger(__name__)

FORMAT = "stbat-plugin/checkpoint-v2"
#: formats this version reads (v1: no resume state; read as complete)
READABLE = ("stbat-plugin/checkpoint-v1", FORMAT)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked."""


def save_checkpoint(path: str | Path, state_dict: dict[str, Any], *, config: TransferConfig,
                    method: str, data: dict[str, Any], complete: bool = True,
                    epoch: int | None = None, resume: dict[str, Any] | None = None) -> Path:
    """Atomically write a checkpoint; returns its path.

    ``state_dict`` is the transferable network's best state so far. ``complete`` says the
    pre-training finished; an incomplete checkpoint (written after each epoch) also holds
    ``resume``, the state that continues the run (``stbat pretrain --resume``).
    """
    from stbat_plugin import __version__

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "library_version": __version__,
        "method": method,
        "backbone": config.backbone,
        "config": config.to_dict(),
        "data": data,
        "complete": bool(complete),
        "epoch": epoch,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
    }
    if resume is not None:
        payload["resume"] = resume
    return atomic_write(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(path: str | Path, *, expect_backbone: str | None = None,
                    expect_config: TransferConfig | None = None,
                    allow_incomplete: bool = False) -> dict[str, Any]:
    """Read a checkpoint and check it fits the backbone / config asked for.

    Refused with :class:`CheckpointError`: a file that is not a checkpoint (or damaged), an
    unknown format, weights that are not finite, an incomplete checkpoint (unless
    ``allow_incomplete``: pre-training was interrupted, ``stbat pretrain --resume`` finishes
    it), another backbone or other model settings. A checkpoint of another library version
    is read with a warning.
    """
    from stbat_plugin import __version__

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file; give the file "
                              "written by `stbat pretrain --save`")
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}; write one with `stbat pretrain --save`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the same user error
        raise CheckpointError(f"{path} is not a readable stbat checkpoint: "
                              f"{' '.join(str(exc).split())[:300]}") from exc
    if not isinstance(payload, dict) or payload.get("format") not in READABLE:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not an stbat checkpoint this version reads (format "
                              f"{found!r}; readable: {list(READABLE)})")
    missing = [k for k in ("method", "backbone", "config", "data", "state_dict") if k not in payload]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; it is damaged: pre-train again")
    version = payload.get("library_version")
    if version != __version__:
        log.warning("%s was written by stbat-plugin %s; this is %s", path, version, __version__)
    if not payload.get("complete", True) and not allow_incomplete:
        raise CheckpointError(
            f"{path} is an interrupted pre-training (epoch {payload.get('epoch')}); finish it "
            "with the same `stbat pretrain ... --save` command plus --resume")
    bad = [k for k, v in payload["state_dict"].items()
           if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path} holds NaN or inf weights in {bad[:5]}"
                              f"{' ...' if len(bad) > 5 else ''}; that pre-training diverged: "
                              "pre-train again (e.g. with a lower --lr)")
    if expect_backbone is not None and payload["backbone"] != expect_backbone:
        raise CheckpointError(
            f"{path} holds backbone {payload['backbone']!r}, but {expect_backbone!r} was asked "
            f"for; use --backbone {payload['backbone']} or pre-train {expect_backbone}"
        )
    if expect_config is not None:
        saved = TransferConfig.from_dict(payload["config"]).model_signature()
        asked = expect_config.model_signature()
        diff = {k: (saved[k], asked[k]) for k in saved if saved[k] != asked[k]}
        if diff:
            raise CheckpointError(
                f"{path} was trained with other model settings (saved, asked): {diff}; "
                "adapt with the checkpoint's settings or pre-train again"
            )
    return payload
