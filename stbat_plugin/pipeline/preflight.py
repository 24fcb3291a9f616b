"""Pre-flight: one forward pass at every city's region count and graph, before any training.

A network is pre-trained on the source cities and then run on a target city with another
number of regions ``n``. A backbone that cannot run there (per-node parameters sized to the
source city, a graph it cannot read, a window it was not built for) is found out here in
seconds, with the city, the backbone and the reason, instead of after the pre-training.

:func:`stbat_plugin._shapes.region_sized` (the parameters whose shape follows ``n``) is shared
with :func:`stbat_plugin.testing.check_backbone`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import default_collate

from stbat_plugin._shapes import (
    changed_shapes,
    find_region_count,
    per_node_advice,
    region_sized,
    shape_snapshot,
    user_model,
)

if TYPE_CHECKING:
    from stbat_plugin.pipeline.config import TransferConfig
    from stbat_plugin.pipeline.tasks import CityTask

__all__ = ["PreflightError", "preflight", "preflight_methods"]


class PreflightError(ValueError):
    """The network cannot run on a city of the task; raised before any training."""


# ----------------------------------------------------------------------------- the pipeline
def _probe_input(task: CityTask, windows: int, device: str) -> Tensor:
    """``windows`` real windows of the city, channels folded as in training."""
    from stbat_plugin.pipeline.tasks import fold_channels

    for part in ("val", "train", "test"):
        if getattr(task.split, part) is None:
            continue
        data = task.dataset(part)
        if len(data) > 0:
            batch = default_collate([data[i] for i in range(min(windows, len(data)))])
            return fold_channels(batch, device)[0]
    raise PreflightError(f"{task.role} city {task.name!r} has no window of its own to run")


def _run_city(net: nn.Module, task: CityTask, windows: int, device: str) -> None:
    x = _probe_input(task, windows, device)
    graph = task.graph_kwargs(net, device)
    out = net(x, **graph)
    if not torch.isfinite(out).all():
        raise ValueError("the output has NaN or inf values")


def _run_synthetic(net: nn.Module, task: CityTask, n: int, windows: int, device: str) -> None:
    """A copy of the city's first windows with ``n`` regions on a ring graph (graph layouts)."""
    from stbat_plugin.testing import ring_graph

    x = _probe_input(task, windows, device)
    idx = torch.arange(n, device=x.device) % x.shape[2]
    net(x[:, :, idx], edge_index=ring_graph(n).to(x.device))


def preflight(net: nn.Module, tasks: Sequence[CityTask], *, backbone: str, device: str = "cpu",
              windows: int = 2) -> None:
    """Run ``net`` once on ``windows`` windows of every city (its n, graph and grid).

    When every city has the same n, a copy of the first city with one region more (on a
    ring graph) is also run, so that per-node parameters are found without a target city.

    Raises:
        PreflightError: naming the city, the backbone and the reason (and the per-node
            parameters, when their shape follows the region count).
    """
    cities = list({t.name: t for t in tasks}.values())
    net = net.to(device).eval()
    ran: dict[int, str] = {}
    with torch.no_grad():
        for task in cities:
            before = shape_snapshot(user_model(net))
            error = _attempt(functools.partial(_run_city, net, task, windows, device))
            n = task.city.num_regions
            changed = changed_shapes(before, shape_snapshot(user_model(net)))
            if error is None and ran and changed:
                error = ValueError(f"parameters change shape with the city: {', '.join(changed)}")
            if error is not None:
                if not ran and getattr(net, "layout", "graph") == "graph":
                    ran = _synthetic_count(net, task, n, windows, device)
                raise PreflightError(_message(net, backbone, f"{task.role} city {task.name!r}",
                                              n, error, ran))
            ran[n] = f"{task.role} city {task.name!r}"
        if len(ran) == 1 and cities and getattr(net, "layout", "graph") == "graph":
            n = next(iter(ran)) + 1
            error = _attempt(functools.partial(_run_synthetic, net, cities[0], n, windows, device))
            if error is not None:
                raise PreflightError(_message(net, backbone, f"a copy of {ran[n - 1]} with one "
                                              "region more (ring graph)", n, error, ran))


def _synthetic_count(net: nn.Module, task: CityTask, n: int, windows: int, device: str
                     ) -> dict[int, str]:
    """When the first city fails: a region count (one of the parameters' sizes) where a copy
    of it runs, to name the per-node parameters of a model built for another city."""
    size = find_region_count(lambda k: _run_synthetic(net, task, k, windows, device),
                             user_model(net), skip={n})
    return {} if size is None else {size: f"a copy of it with {size} regions (ring graph)"}


def _attempt(fn: Callable[[], object]) -> Exception | None:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - every failure is reported with its city
        return err
    return None


def _message(net: nn.Module, backbone: str, where: str, n: int, error: Exception,
             ran: dict[int, str]) -> str:
    text = (f"Pre-flight: backbone {backbone!r} does not run on {where} (n={n} regions): "
            f"{type(error).__name__}: {error}")
    for n_ok, city in ran.items():
        names = region_sized(user_model(net), n_ok, n)
        text += f". It ran on {city} (n={n_ok})"
        if names:
            return text + "; " + per_node_advice(names, n_ok)
    return text


def preflight_methods(methods: Iterable[str], tasks: Sequence[CityTask], config: TransferConfig,
                      registry: Any = None) -> None:
    """:func:`preflight` of the network of every method that pre-trains (each kind once)."""
    from stbat_plugin.network import PredictionNetwork
    from stbat_plugin.pipeline.method_registry import get_method

    built: set[Any] = set()
    for name in methods:
        spec = get_method(name)
        if not spec.pretrains or spec.network in built:
            continue
        built.add(spec.network)
        net = spec.network(config, registry)
        label = config.backbone if isinstance(net, PredictionNetwork) else type(net).__name__
        preflight(net, tasks, backbone=label, device=config.device)
