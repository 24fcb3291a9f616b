"""Parameters whose shape follows the region count ``n``: shared by ``check_backbone`` and
the pipeline's pre-flight, so a per-node parameter is named the same way by both."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

__all__ = ["shape_snapshot", "changed_shapes", "region_sized", "find_region_count",
           "per_node_advice", "user_model"]


def shape_snapshot(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of every parameter and buffer, by name."""
    return {name: tuple(t.shape) for name, t in (*module.named_parameters(), *module.named_buffers())}


def changed_shapes(before: dict[str, tuple[int, ...]], after: dict[str, tuple[int, ...]]
                   ) -> list[str]:
    """``"name [old] -> [new]"`` for parameters created, removed or resized in between."""
    names = sorted(set(before) | set(after))
    return [f"{k!r} {list(before.get(k, ()))} -> {list(after.get(k, ()))}" for k in names
            if before.get(k) != after.get(k)]


def region_sized(module: nn.Module, n_ok: int, n_bad: int) -> list[str]:
    """``"'name' [shape]"`` of parameters and buffers with a dimension of ``n_ok`` (a region
    count where the module runs) and none of ``n_bad`` (one where it fails)."""
    return [f"{name!r} {list(shape)}" for name, shape in shape_snapshot(module).items()
            if n_ok in shape and n_bad not in shape]


def find_region_count(run: Callable[[int], object], module: nn.Module, *, skip: Iterable[int],
                      limit: int = 6) -> int | None:
    """A region count where ``run(n)`` works, tried among the parameters' dimensions (the
    size a per-node parameter was built for); None when none of them works."""
    tried = set(skip)
    sizes = sorted({s for shape in shape_snapshot(module).values() for s in shape
                    if 2 <= s <= 4096 and s not in tried})
    for size in sizes[:limit]:
        try:
            run(size)
        except Exception:  # noqa: BLE001 - any failure means: not this size
            continue
        return size
    return None


def per_node_advice(names: list[str], n_ok: int) -> str:
    return (f"per-node parameters {', '.join(names)} are sized to {n_ok} regions; a network "
            "pre-trained on the sources must run at the n of every city: compute such "
            "embeddings from the input (or drop them)")


def user_model(net: nn.Module) -> nn.Module:
    """The user's own model inside a network (parameter names as the user knows them)."""
    from stbat_plugin.adapters import TapFeatures, WithFeatureDim

    extractor = getattr(net, "extractor", net)
    return extractor.model if isinstance(extractor, TapFeatures | WithFeatureDim) else extractor
