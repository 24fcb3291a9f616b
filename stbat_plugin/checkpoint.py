"""Checkpoints of pre-trained transferable networks: pre-train once, adapt everywhere.

A checkpoint is a ``torch.save`` dict carrying the network's ``state_dict``, the
run config, the library version, the backbone name and a description of the
source data. Writes are atomic: a temporary file in the same folder, then
``os.replace``, so an interrupted save never leaves a half-written file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stbat_plugin._io import atomic_write
from stbat_plugin.config import TransferConfig

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "FORMAT"]

FORMAT = "stbat-plugin/checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked."""


def save_checkpoint(path: str | Path, state_dict: dict[str, Any], *, config: TransferConfig,
                    method: str, data: dict[str, Any]) -> Path:
    """Atomically write a checkpoint; returns its path."""
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
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
    }
    return atomic_write(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(path: str | Path, *, expect_backbone: str | None = None,
                    expect_config: TransferConfig | None = None) -> dict[str, Any]:
    """Read a checkpoint and check it fits the backbone / config asked for."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}; write one with `stbat pretrain --save`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the same user error
        raise CheckpointError(f"{path} is not a readable stbat checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an stbat checkpoint (expected format {FORMAT!r})")
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
