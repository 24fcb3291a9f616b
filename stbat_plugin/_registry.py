"""The plugin manager and the backbone registry built from it.

ONE function builds the plugin manager (:func:`build_plugin_manager`): hook specs,
then entry points of the group ``stbat`` (the built-ins live there too), then
``check_pending``. A :class:`BackboneRegistry` is a plain object made from a
manager at set-up time; nothing here runs per batch.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy
from torch import nn

from stbat_plugin import hookspecs
from stbat_plugin.backbone import LAYOUTS, declared_layout

__all__ = [
    "BackboneSpec",
    "BackboneRegistry",
    "Register",
    "build_plugin_manager",
    "default_registry",
    "create_backbone",
    "list_backbones",
    "load_plugin",
    "registry_with_plugins",
]

@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone: its factory and where it came from."""

    name: str
    factory: Callable[..., nn.Module]
    layout: str
    description: str
    plugin: str
    distribution: str | None = None
    version: str | None = None


class Register:
    """The ``register`` object handed to ``stbat_register_backbones`` of one plugin.

    ``register(name, factory, layout=None, description="")``: the layout is the one the
    factory class declares (its ``layout`` attribute), ``"graph"`` when it declares none; a
    ``layout=`` given as well must agree with it (a function factory's models are checked
    when built, :meth:`BackboneRegistry.create`).
    """

    def __init__(self, registry: BackboneRegistry, plugin: str, dist: tuple[str, str] | None):
        self._registry = registry
        self._plugin = plugin
        self._dist = dist

    def __call__(
        self,
        name: str,
        factory: Callable[..., nn.Module],
        *,
        layout: str | None = None,
        description: str = "",
    ) -> None:
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(
                f"Backbone {name!r} from plugin {self._plugin!r}: layout must be one of "
                f"{LAYOUTS} (got {layout!r})"
            )
        if not callable(factory):
            raise TypeError(f"Backbone {name!r}: factory must be callable (got {factory!r})")
        declared = declared_layout(factory) if isinstance(factory, type) and \
            hasattr(factory, "forward_features") else None
        if layout is not None and declared is not None and layout != declared:
            raise ValueError(
                f"Backbone {name!r} from plugin {self._plugin!r}: register(layout={layout!r}) "
                f"disagrees with {factory.__name__}.layout = {declared!r}; declare it once "
                "(drop layout= and keep the class attribute)")
        layout = layout or declared or "graph"
        dist, version = self._dist if self._dist else (None, None)
        spec = BackboneSpec(name, factory, layout, description, self._plugin, dist, version)
        self._registry._add(spec)


def build_plugin_manager(
    *, load_entrypoints: bool = True, plugins: Iterable[object] = ()
) -> pluggy.PluginManager:
    """Build a plugin manager: specs, entry points of group ``stbat``, extra plugins.

    Args:
        load_entrypoints: load installed plugins, built-ins included (default: ``True``).
        plugins: further plugin objects or modules to register, e.g. in tests.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    if load_entrypoints:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT_NAME)
    for plugin in plugins:
        pm.register(plugin)
    pm.check_pending()
    return pm


class BackboneRegistry:
    """Backbones registered by the plugins of one plugin manager."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self._specs: dict[str, BackboneSpec] = {}
        dists = {id(p): (d.project_name, d.version) for p, d in pm.list_plugin_distinfo()}
        for impl in pm.hook.stbat_register_backbones.get_hookimpls():
            register = Register(self, impl.plugin_name, dists.get(id(impl.plugin)))
            impl.function(register=register)

    def _add(self, spec: BackboneSpec) -> None:
        if spec.name in self._specs:
            other = self._specs[spec.name].plugin
            raise ValueError(
                f"Backbone name {spec.name!r} is registered twice: by plugin {other!r} and by "
                f"plugin {spec.plugin!r}; rename one of them or uninstall one plugin"
            )
        self._specs[spec.name] = spec

    def names(self) -> list[str]:
        return sorted(self._specs)

    def specs(self) -> list[BackboneSpec]:
        return [self._specs[n] for n in self.names()]

    def get(self, name: str) -> BackboneSpec:
        if name not in self._specs:
            close = difflib.get_close_matches(name, self._specs, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(
                f"Unknown backbone {name!r}{hint} Installed: {', '.join(self.names()) or 'none'} "
                "(a plugin adds one through the 'stbat' entry-point group)"
            )
        return self._specs[name]

    def create(self, name: str, **kwargs: Any) -> nn.Module:
        """Build backbone ``name``; a factory that rejects the keyword arguments (unknown
        name, negative width, wrong type) raises :class:`BackboneArgumentError` naming both."""
        factory = self.get(name).factory
        try:
            model = factory(**kwargs)
        except (TypeError, ValueError, RuntimeError) as err:
            raise BackboneArgumentError(
                f"backbone {name!r} cannot be built with {kwargs} ({type(err).__name__}: {err}); "
                "fix --backbone-kwargs (see the backbone's documentation for its arguments)"
            ) from err
        if not isinstance(model, nn.Module):
            raise TypeError(f"Factory of backbone {name!r} returned {type(model).__name__}, not nn.Module")
        built = declared_layout(model) if hasattr(model, "forward_features") else None
        if built is not None and built != self.get(name).layout:
            raise ValueError(
                f"Backbone {name!r} is registered with layout {self.get(name).layout!r}, but the "
                f"{type(model).__name__} its factory built declares layout {built!r}; make "
                "register(layout=...) and the model's layout agree")
        return model

    def adapt(self, model: nn.Module) -> Any:
        """Ask the plugins' ``stbat_adapt_backbone`` hooks (first answer wins)."""
        return self.pm.hook.stbat_adapt_backbone(model=model)


class BackboneArgumentError(ValueError):
    """A backbone factory refused its keyword arguments."""


@functools.lru_cache(maxsize=1)
def default_registry() -> BackboneRegistry:
    """The registry of the installed plugins (built once, on first use)."""
    return BackboneRegistry(build_plugin_manager())


def create_backbone(name: str, *, registry: BackboneRegistry | None = None, **kwargs: Any) -> nn.Module:
    """Create a registered backbone by name, e.g. ``create_backbone("graph_stnet", in_channels=2)``."""
    return (registry or default_registry()).create(name, **kwargs)


def list_backbones(*, registry: BackboneRegistry | None = None) -> list[str]:
    """Names of every registered backbone, sorted."""
    return (registry or default_registry()).names()


def load_plugin(spec: str) -> object:
    """A plugin object from ``"module"``, ``"path/to/file.py"`` or either with ``":name"``.

    ``name`` is an attribute of the module (a class is instantiated with no arguments);
    without it the module itself is the plugin (its ``@hookimpl`` functions).

    Raises:
        ValueError: naming the spec and what could not be found or imported.
    """
    target, sep, attr = spec.rpartition(":")
    if not sep:
        target, attr = spec, ""
    try:
        module = _import_file(Path(target)) if target.endswith(".py") else \
            importlib.import_module(target)
    except Exception as err:  # noqa: BLE001 - any failure to import: name the spec
        raise ValueError(f"plugin {spec!r}: cannot import {target!r} ({type(err).__name__}: "
                         f"{err}); give a module name on the path or a .py file") from err
    if not attr:
        return module
    if not hasattr(module, attr):
        raise ValueError(f"plugin {spec!r}: {target!r} has no attribute {attr!r}")
    obj = getattr(module, attr)
    return obj() if isinstance(obj, type) else obj


def _import_file(path: Path) -> object:
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    name = f"stbat_plugin_file_{path.stem}_{abs(hash(str(path.resolve())))}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def registry_with_plugins(specs: Iterable[str] = ()) -> BackboneRegistry | None:
    """The installed plugins plus those named by :func:`load_plugin` specs (CLI ``--plugin``);
    ``None`` (the default registry) when no spec is given."""
    plugins = [load_plugin(s) for s in specs]
    return BackboneRegistry(build_plugin_manager(plugins=plugins)) if plugins else None
