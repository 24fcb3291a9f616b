"""Multi-process pre-training on ``torch.distributed`` (gloo on CPU, nccl on CUDA).

``torchrun --nproc-per-node N $(command -v stbat) pretrain ...`` starts N copies of
``stbat pretrain``; each finds the launcher's environment (:func:`launch_env`), joins the
process group (:func:`session`) and trains on its share of the source batches:

- every process builds the same stream of source batches (same seed, same shuffling) and
  batch ``i`` goes to process ``i % N``; a step is one batch per process, and the last
  ``len % N`` batches of an epoch are dropped, so every process makes the same number of
  steps (:func:`shard_batches`);
- the gradients are averaged over the processes before every optimiser step, as
  ``DistributedDataParallel`` does, but explicitly (:meth:`Distributed.sync_gradients`):
  STBaT steps two optimisers per iteration over disjoint parameters with two backward
  passes, through ``forward_with_features``, and a step skipped for a non-finite loss on
  one process must be skipped on all of them (docs/performance.md, "Multi-process
  pre-training");
- after each STBaT step every process refreshes the RIAM state of every city trained in
  that step on any process, so densities and similarities stay identical everywhere;
- validation is split over the processes and summed (:meth:`Distributed.validation_error`):
  the same number on every process, so early stopping agrees;
- rank 0 alone writes checkpoints, progress bars and logs (:meth:`Distributed.on_rank0`).

With one process (no launcher, or ``--nproc-per-node 1``) nothing here runs: no process
group, no collective, the results of before.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["LaunchEnv", "Distributed", "DistributedError", "launch_env", "device_for",
           "backend_for", "session", "active", "on_rank0", "shard_batches", "BUCKET_ELEMENTS"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: gradient entries all-reduced per collective (DDP's default bucket is 25 MB of float32)
BUCKET_ELEMENTS = 25 * 2**20 // 4

_ACTIVE: Distributed | None = None


class DistributedError(ValueError):
    """A launcher environment or setting that multi-process pre-training cannot use."""


@dataclass(frozen=True)
class LaunchEnv:
    """What ``torchrun`` (or another launcher) told this process."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int | None
    master_addr: str
    master_port: int


def _int(environ: Mapping[str, str], key: str, default: int | None = None) -> int | None:
    text = environ.get(key)
    if text is None or text.strip() == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"the environment variable {key}={text!r} is not a whole number; "
                               "start the processes with torchrun, which sets it") from None


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """The launcher environment of this process (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), or ``None`` when neither ``RANK``
    nor ``WORLD_SIZE`` is set (a plain process). A partial or inconsistent environment is a
    :class:`DistributedError` naming the variable."""
    environ = os.environ if environ is None else environ
    if not any(environ.get(k) for k in ("RANK", "WORLD_SIZE")):
        return None
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
    if missing:
        raise DistributedError(f"{'RANK' if environ.get('RANK') else 'WORLD_SIZE'} is set but "
                               f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
                               "start the processes with torchrun (which sets them all), or unset "
                               "RANK and WORLD_SIZE for one process")
    rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
    assert rank is not None and world is not None
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} and WORLD_SIZE={world}: need WORLD_SIZE >= 1 and "
                               "0 <= RANK < WORLD_SIZE; start the processes with torchrun")
    local_world = _int(environ, "LOCAL_WORLD_SIZE")
    local_rank = _int(environ, "LOCAL_RANK", 0)
    assert local_rank is not None
    if local_rank < 0 or (local_world is not None and local_rank >= local_world):
        raise DistributedError(f"LOCAL_RANK={local_rank} with LOCAL_WORLD_SIZE={local_world}: "
                               "need 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE")
    port = _int(environ, "MASTER_PORT")
    assert port is not None
    if not 0 < port < 65536:
        raise DistributedError(f"MASTER_PORT={port} is not a TCP port (1..65535)")
    return LaunchEnv(rank, world, local_rank, local_world, str(environ["MASTER_ADDR"]), port)


def device_for(device: str, env: LaunchEnv) -> str:
    """This process's device: ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per process);
    ``cpu`` stays. ``cuda:K`` is kept with one process per node and refused with several
    (they would all share GPU K)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DistributedError(f"--device {device!r} is not a torch device ({exc})") from exc
    if dev.type == "cpu":
        return str(dev)
    if dev.type != "cuda":
        raise DistributedError(f"--device {device}: multi-process pre-training runs on cpu (gloo) "
                               "or cuda (nccl); use one of those")
    if dev.index is None:
        return f"cuda:{env.local_rank}"
    if env.local_world_size not in (None, 1):
        raise DistributedError(f"--device {device} with {env.local_world_size} processes per node "
                               "would put them all on one GPU; give --device cuda (process "
                               "LOCAL_RANK then takes cuda:LOCAL_RANK)")
    return str(dev)


def backend_for(device: str) -> str:
    """``nccl`` for a CUDA device, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def active() -> Distributed | None:
    """The process group opened by :func:`session`, or ``None`` (one process)."""
    return _ACTIVE


def on_rank0(fn: Callable[[], T]) -> T:
    """``fn()`` in rank 0 only, its result (or error) on every rank; just ``fn()`` in one
    process."""
    ctx = _ACTIVE
    return fn() if ctx is None else ctx.on_rank0(fn)


@contextlib.contextmanager
def session(device: str = "cpu", *, timeout: timedelta | None = None
            ) -> Iterator[Distributed | None]:
    """Join the process group of a ``torchrun`` launch for the duration of the block.

    Yields ``None`` outside a launcher or with one process (nothing is initialised), else a
    :class:`Distributed` whose ``device`` is this process's (:func:`device_for`). The group
    is joined with ``init_method="env://"`` (so torchrun's own store is used) and destroyed
    at the end unless it existed before. Other ranks than 0 log only errors meanwhile.
    """
    global _ACTIVE
    env = launch_env()
    if env is None or env.world_size == 1:
        yield None
        return
    if _ACTIVE is not None:
        raise DistributedError("a multi-process session is already open in this process")
    dev = device_for(device, env)
    backend = backend_for(dev)
    if backend == "nccl":
        if not torch.cuda.is_available() or not dist.is_nccl_available():
            raise DistributedError(f"--device {device}: CUDA with NCCL is not available here; "
                                   "use --device cpu (gloo)")
        if torch.device(dev).index >= torch.cuda.device_count():  # type: ignore[operator]
            raise DistributedError(f"process LOCAL_RANK={env.local_rank} needs {dev}, but only "
                                   f"{torch.cuda.device_count()} GPU(s) are visible; start at "
                                   "most that many processes per node")
        torch.cuda.set_device(torch.device(dev))
    owns = not dist.is_initialized()
    if owns:
        kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group(backend, init_method="env://", rank=env.rank,
                                world_size=env.world_size, **kwargs)
    elif (dist.get_rank(), dist.get_world_size()) != (env.rank, env.world_size):
        raise DistributedError(f"the process group already open is rank {dist.get_rank()} of "
                               f"{dist.get_world_size()}, the environment says {env.rank} of "
                               f"{env.world_size}")
    ctx = Distributed(env.rank, env.world_size, dev, dist.get_backend())
    logger = logging.getLogger("stbat_plugin")
    level = logger.level
    if env.rank != 0:
        logger.setLevel(logging.ERROR)
    _ACTIVE = ctx
    try:
        yield ctx
    finally:
        _ACTIVE = None
        logger.setLevel(level)
        if owns and dist.is_initialized():
            dist.destroy_process_group()


def shard_batches(items: Iterable[tuple[str, T]], rank: int, world_size: int
                  ) -> Iterator[tuple[str, T, tuple[str, ...]]]:
    """This rank's share of a stream of ``(city, batch)``: ``(city, batch, cities of the
    step)`` for every complete group of ``world_size`` consecutive items (item ``i`` goes to
    rank ``i % world_size``); the incomplete last group is dropped, so every rank yields as
    many items. A stream shorter than ``world_size`` is an error (no rank could step)."""
    names: list[str] = []
    mine: tuple[str, T] | None = None
    steps = 0
    for item in items:
        if len(names) == rank:
            mine = item
        names.append(str(item[0]))
        if len(names) == world_size:
            assert mine is not None
            yield mine[0], mine[1], tuple(names)
            names, mine, steps = [], None, steps + 1
    if steps == 0:
        error = DistributedError(
            f"an epoch holds {len(names)} source batch(es), fewer than the {world_size} "
            "processes: each step takes one batch per process; use fewer processes, a larger "
            "--max-batches-per-epoch or a smaller --batch-size")
        error.from_rank0 = rank != 0  # type: ignore[attr-defined]  # every rank raises it
        raise error
    if names:
        log.debug("dropped the last %d batch(es) of the epoch (not a multiple of %d processes)",
                  len(names), world_size)


@dataclass(frozen=True)
class Distributed:
    """This process's place in an open process group, and the collectives pre-training uses."""

    rank: int
    world_size: int
    device: str
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_device(self, device: str) -> None:
        """Refuse a training device the backend cannot communicate from."""
        if (self.backend == "nccl") != (torch.device(device).type == "cuda"):
            raise DistributedError(f"the process group uses {self.backend}, but the training "
                                   f"device is {device}: nccl needs --device cuda, gloo cpu")

    # ------------------------------------------------------------------ batches
    def shard(self, items: Iterable[tuple[str, T]]) -> Iterator[tuple[str, T, tuple[str, ...]]]:
        """This rank's share of the source batches (:func:`shard_batches`)."""
        return shard_batches(items, self.rank, self.world_size)

    # ------------------------------------------------------------------ gradients
    def sync_gradients(self, params: Iterable[Tensor], ok: bool = True, *,
                       bucket_elements: int = BUCKET_ELEMENTS) -> bool:
        """Average the gradients of ``params`` over the processes, if every one can step.

        Every rank calls this at the same point, with the same parameters in the same
        order, after its backward pass (``ok=True``) or instead of it when its loss was not
        finite (``ok=False``). Returns True when every rank passed ``ok=True``: each
        ``.grad`` then holds the mean over ranks (a rank without a gradient for a parameter
        counts as zero; a parameter no rank has a gradient for keeps ``None``), identical
        on every rank. Otherwise every ``.grad`` is set to ``None`` and False is returned:
        no rank steps. Gradients travel in flat buckets of at most ``bucket_elements``.
        """
        params = list(params)
        flags = torch.tensor([float(p.grad is not None) for p in params] + [float(ok)],
                             dtype=torch.float32, device=self.device)
        dist.all_reduce(flags)
        if int(flags[-1]) != self.world_size:
            for p in params:
                p.grad = None
            return False
        present = [p for p, f in zip(params, flags[:-1].tolist(), strict=True) if f > 0]
        for p in present:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets(present, bucket_elements):
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])  # type: ignore[union-attr]
            dist.all_reduce(flat)
            flat.div_(self.world_size)
            for p, g in zip(bucket, flat.split([p.numel() for p in bucket]), strict=True):
                p.grad.copy_(g.view_as(p))  # type: ignore[union-attr]
        return True

    def sync_optimizer(self, optimizer: torch.optim.Optimizer, ok: bool = True) -> bool:
        """:meth:`sync_gradients` of every parameter an optimiser steps."""
        return self.sync_gradients([p for g in optimizer.param_groups for p in g["params"]], ok)

    # ------------------------------------------------------------------ state
    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers into every rank's ``module`` (identical start)."""
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)

    def check_in_sync(self, module: nn.Module, what: str = "model") -> None:
        """Raise when a rank's parameters or buffers drifted from rank 0's: per-tensor sums
        are compared (``rtol=1e-5``; exact on identical hardware)."""
        state = module.state_dict()
        names = list(state)
        sums = torch.stack([state[k].detach().double().sum() for k in names]).to(self.device)
        gathered = [torch.empty_like(sums) for _ in range(self.world_size)]
        dist.all_gather(gathered, sums)
        for r, other in enumerate(gathered):
            close = torch.isclose(other, gathered[0], rtol=1e-5, atol=1e-8)
            if not bool(close.all()):
                k = names[int((~close).nonzero()[0])]
                raise RuntimeError(f"the {what} of rank {r} drifted from rank 0's ({k}); a step "
                                   "ran on one process only, or the backbone is not "
                                   "deterministic across processes")

    def gather_rng(self) -> list[dict[str, Any]]:
        """Every rank's torch (and CUDA) generator state, in rank order (for resuming)."""
        mine = {"torch": torch.get_rng_state(),
                "cuda": [torch.cuda.get_rng_state()] if self.device.startswith("cuda") else []}
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, mine)
        return out

    def on_rank0(self, fn: Callable[[], T]) -> T:
        """``fn()`` run by rank 0, its result (or its error) returned (raised) on every rank;
        also a barrier. An error raised on another rank than 0 is marked ``from_rank0``."""
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                box[0] = ("error", exc)
            try:
                pickle.dumps(box[0])
            except Exception as exc:  # noqa: BLE001 - an unpicklable result or error
                box[0] = ("error", RuntimeError(f"rank 0: {box[0][1]!r} ({exc})"))
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            if not self.is_main:
                value.from_rank0 = True
            raise value
        return value

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validation_error(self, net: nn.Module, tasks: Sequence[Any], device: str,
                         batch_size: int = 64) -> float:
        """:func:`stbat_plugin.pipeline.methods.validation_error` with the windows split over the
        ranks: each sums its squared errors and counts, the sums are all-reduced (float64),
        and every rank returns the same mean over cities of the masked RMSE."""
        from torch.utils.data import DataLoader, Subset

        from stbat_plugin.pipeline.tasks import fold_channels

        net.eval()
        sums = torch.zeros(len(tasks), 2, dtype=torch.float64, device=device)
        for i, task in enumerate(tasks):
            ds = task.dataset("val")
            share = Subset(ds, range(self.rank, len(ds), self.world_size))
            graph = task.graph_kwargs(net, device)
            for batch in DataLoader(share, batch_size=batch_size, shuffle=False):
                x, y, m = fold_channels(batch, device)
                keep = m != 0
                err = torch.where(keep, net(x, **graph) - y, torch.zeros((), device=y.device))
                sums[i, 0] += err.double().pow(2).sum()
                sums[i, 1] += keep.sum()
        sums = sums.to(self.device)
        dist.all_reduce(sums)
        errors = []
        for task, (total, count) in zip(tasks, sums.tolist(), strict=True):
            if count == 0:
                raise ValueError(f"City {task.name!r} has no val windows with an observed cell")
            errors.append(math.sqrt(total / count))
        return float(sum(errors) / len(errors))


def _buckets(params: list[Tensor], size: int) -> Iterator[list[Tensor]]:
    """Consecutive parameters of one device and dtype, at most ``size`` entries per bucket
    (a larger parameter is a bucket of its own)."""
    bucket: list[Tensor] = []
    count = 0
    for p in params:
        if bucket and (count + p.numel() > size or (p.device, p.dtype) !=
                       (bucket[0].device, bucket[0].dtype)):
            yield bucket
            bucket, count = [], 0
        bucket.append(p)
        count += p.numel()
    if bucket:
        yield bucket
