"""Resolve the short names plugins register, and put their strategies into Lightning's ``StrategyRegistry``.

Strategy names are registered lazily: the name maps to a factory that imports the plugin's strategy class only when
a Trainer asks for it, so ``import moe_lightning.strategies`` never imports a backend. A shipped plugin that is not
installed gets its strategy names registered too, as factories that raise :class:`PluginNotInstalledError`: a config
saying ``strategy: deepspeed_moe`` then fails at Trainer construction with the pip command to run.
"""

from __future__ import annotations

import importlib
from functools import partial
from typing import Any

from moe_lightning.plugins.discovery import InstalledPlugin, installed_plugins
from moe_lightning.plugins.known import (
    KNOWN_PLUGINS, KnownPlugin, PluginNotInstalledError, known_provider, missing_plugin_error,
)
from moe_lightning.plugins.records import Kind, Registration


def registrations(kind: Kind, plugins: list[InstalledPlugin] | None = None) -> dict[str, tuple[str, Registration]]:
    """``name -> (plugin name, registration)`` of one kind over the installed plugins; a name two plugins
    register raises ``ValueError`` naming both."""
    found: dict[str, tuple[str, Registration]] = {}
    for installed in installed_plugins() if plugins is None else plugins:
        for registration in installed.plugin.registrations if installed.plugin is not None else ():
            if registration.kind != kind:
                continue
            if registration.name in found:
                raise ValueError(
                    f"{kind} {registration.name!r} is registered by two plugins: {found[registration.name][0]!r} "
                    f"and {installed.name!r}; uninstall one of them"
                )
            found[registration.name] = (installed.name, registration)
    return found


def resolve(kind: Kind, name: str) -> Any:
    """The object a plugin registered as ``name`` (imported now). Raises :class:`PluginNotInstalledError` for a name
    of a shipped plugin that is not installed, ``ValueError`` listing the known names otherwise."""
    plugins = installed_plugins()
    found = registrations(kind, plugins)
    if name in found:
        return load_target(found[name][1].target)
    provider = known_provider(kind, name)
    if provider is not None:
        broken = next((p for p in plugins if p.name == provider.name and p.error), None)
        if broken is not None:
            raise ValueError(
                f"{kind} {name!r} comes from the {provider.name!r} plugin, which is broken: {broken.error}"
            )
        raise PluginNotInstalledError(f"{kind} {name!r}", provider)
    raise ValueError(f"unknown {kind} {name!r}: installed plugins register {sorted(found) or 'none'}")


def load_target(target: str) -> Any:
    """Import ``"package.module:Attribute"``; a shipped plugin's package that is missing raises
    :class:`PluginNotInstalledError`."""
    module_name, _, attribute = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise missing_plugin_error(error) or error
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


def register_plugin_strategies() -> None:
    """Register every installed plugin's strategies by name (lazily), then the names of shipped plugins that are
    not installed, as factories raising :class:`PluginNotInstalledError`. Names already registered are kept."""
    from lightning.pytorch.strategies import StrategyRegistry

    for name, (plugin, registration) in registrations("strategy").items():
        if name not in StrategyRegistry:
            StrategyRegistry.register(
                name, partial(_construct, registration.target), description=f"{registration.description} "
                f"(plugin {plugin})", **registration.init_params,
            )
    for known in KNOWN_PLUGINS:
        for name in known.provides.get("strategy", ()):
            if name not in StrategyRegistry:
                StrategyRegistry.register(
                    name, partial(_refuse, name, known), description=f"needs `{known.install_command}`"
                )


def _construct(target: str, **init_params: Any) -> Any:
    return load_target(target)(**init_params)


def _refuse(name: str, plugin: KnownPlugin, **_: Any) -> Any:
    raise PluginNotInstalledError(f"strategy {name!r}", plugin)
