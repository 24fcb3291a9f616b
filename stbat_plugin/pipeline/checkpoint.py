"""Checkpoints of pre-trained transferable networks: pre-train once, adapt everywhere.

A checkpoint is a ``torch.save`` dict carrying the network's ``state_dict``, the
run config, the library version, the backbone name and a description of the
source data. Writes are atomic: a temporary file in the same folder, then
``os.replace``, so an interrupted save never leaves a half-written file.

This module is the one place where settings meet a checkpoint: which settings a network
read from a checkpoint runs with (:func:`checkpoint_config`), which must agree with the
checkpoint (the model settings, :meth:`TransferConfig.model_signature`), and whether a
checkpoint continues the same pre-training (:func:`check_same_pretraining`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stbat_plugin.pipeline.config import TransferConfig
from stbat_plugin.pipeline.io import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "from_checkpoint", "checkpoint_config",
           "check_same_pretraining", "Pretrained", "CheckpointError", "FORMAT", "READABLE"]

log = logging.getLogger(__name__)

FORMAT = "stbat-plugin/checkpoint-v2"
#: formats this version reads (v1: no resume state; read as complete)
READABLE = ("stbat-plugin/checkpoint-v1", FORMAT)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked."""


@dataclass
class Pretrained:
    """A pre-trained transferable network and where it came from."""

    net: nn.Module  # the transferable network (backbone + predictor, or NLinear)
    method: str
    config: TransferConfig
    data: dict[str, Any]
    epochs: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    path: Path | None = None  # the checkpoint it was read from (None: trained in memory)


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
    if expect_backbone is not None:
        _check_backbone(path, payload, expect_backbone)
    if expect_config is not None:
        _check_model_settings(path, payload, expect_config)
    return payload


def _check_backbone(path: Path, payload: dict[str, Any], backbone: str) -> None:
    if payload["backbone"] != backbone:
        raise CheckpointError(
            f"{path} holds backbone {payload['backbone']!r}, but {backbone!r} was asked "
            f"for; use --backbone {payload['backbone']} or pre-train {backbone}"
        )


def _check_model_settings(path: Path, payload: dict[str, Any], config: TransferConfig) -> None:
    _check_backbone(path, payload, config.backbone)
    saved = TransferConfig.from_saved(payload["config"]).model_signature()
    asked = config.model_signature()
    diff = {k: (saved[k], asked[k]) for k in saved if saved[k] != asked[k]}
    if diff:
        raise CheckpointError(
            f"{path} was trained with other model settings (saved, asked): {diff}; "
            "adapt with the checkpoint's settings or pre-train again"
        )


def checkpoint_config(path: str | Path, payload: dict[str, Any],
                      settings: TransferConfig | Mapping[str, Any] | None = None
                      ) -> TransferConfig:
    """The settings a checkpoint's network runs with (adaptation, evaluation).

    ``settings``:

    - ``None``: the checkpoint's own settings, all of them;
    - a :class:`TransferConfig`: that config, whose model settings
      (:meth:`TransferConfig.model_signature`) must be the checkpoint's;
    - a mapping of some settings (e.g. the flags given to ``stbat adapt``): the checkpoint's
      model settings, with the mapping over them and over the defaults; a model setting in
      the mapping must agree with the checkpoint too.

    A model setting that differs from the checkpoint's is refused with
    :class:`CheckpointError`, naming the saved and the asked values.
    """
    path = Path(path)
    saved = TransferConfig.from_saved(payload["config"])
    if settings is None:
        return saved
    config = (settings if isinstance(settings, TransferConfig)
              else TransferConfig.from_dict({**saved.model_signature(), **settings}))
    _check_model_settings(path, payload, config)
    return config


def from_checkpoint(path: str | Path,
                    config: TransferConfig | Mapping[str, Any] | None = None,
                    registry: Any = None) -> Pretrained:
    """Read a checkpoint once and rebuild its pre-trained network, with the backbones of
    ``registry`` (default: the installed plugins); its settings are
    ``checkpoint_config(path, payload, config)`` (see :func:`checkpoint_config`)."""
    from stbat_plugin.pipeline.method_registry import get_method

    path = Path(path)
    payload = load_checkpoint(path)
    run_config = checkpoint_config(path, payload, config)
    saved = TransferConfig.from_saved(payload["config"])
    net = get_method(payload["method"]).network(saved, registry)
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path}: its weights do not fit the network of its own settings "
                              f"(method {payload['method']!r}, backbone {saved.backbone!r}, "
                              f"{saved.backbone_kwargs}): {first}; the file was edited or comes "
                              "from another library version: pre-train again") from exc
    return Pretrained(net, payload["method"], run_config, payload["data"], path=path)


def check_same_pretraining(save: str | Path, payload: dict[str, Any], method: str,
                           config: TransferConfig, data: dict[str, Any]) -> None:
    """Refuse to resume, into ``save``, a pre-training other than the one it holds: another
    method, other settings (any of them), other source data or another library version."""
    from stbat_plugin import __version__

    if "resume" not in payload:
        raise CheckpointError(f"{save} holds no resume state; use --overwrite to start again")
    diffs = []
    if payload["method"] != method:
        diffs.append(f"method: was {payload['method']!r}, now {method!r}")
    saved = TransferConfig.from_saved(payload["config"]).to_dict()  # a newer setting: as it was
    diffs += [f"{k}: was {saved.get(k)!r}, now {v!r}" for k, v in config.to_dict().items()
              if saved.get(k) != v]
    diffs += [f"{k}: was {payload['data'].get(k)!r}, now {v!r}" for k, v in data.items()
              if payload["data"].get(k) != v]
    if payload.get("library_version") != __version__:
        diffs.append(f"library version: was {payload.get('library_version')}, now {__version__}")
    if diffs:
        raise CheckpointError(f"--resume: {save} is another pre-training ({'; '.join(diffs[:6])});"
                              " give the same command, or --overwrite to start again")
