"""Find the installed plugins: distributions with an entry point in the ``moe_lightning.plugins`` group.

Loading an entry point imports only the module holding its :class:`Plugin` record, never the backend
(DeepSpeed, FairScale, Megatron-Core) it wraps.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from moe_lightning.plugins.records import Plugin

ENTRY_POINT_GROUP = "moe_lightning.plugins"


@dataclass(frozen=True)
class InstalledPlugin:
    """A plugin found through its entry point: its record, or why it could not be loaded."""

    name: str
    distribution: str
    version: str
    plugin: Plugin | None
    """``None`` when loading the entry point failed (see ``error``)."""
    error: str | None = None


def installed_plugins() -> list[InstalledPlugin]:
    """Every plugin installed in this environment, by name. A plugin whose entry point fails to load is
    reported with its error instead of breaking the others (or the core, which lists them at import)."""
    return sorted((_load(entry_point) for entry_point in entry_points(group=ENTRY_POINT_GROUP)), key=lambda p: p.name)


def _load(entry_point: EntryPoint) -> InstalledPlugin:
    dist = entry_point.dist
    distribution, version = (dist.name, dist.version) if dist is not None else ("?", "?")
    where = f"entry point {entry_point.name} = {entry_point.value} of {distribution} {version}"
    try:
        plugin = entry_point.load()
    except Exception as error:  # a broken plugin must not take the core down with it
        return InstalledPlugin(entry_point.name, distribution, version, None, f"{where} failed to load: {error!r}")
    if not isinstance(plugin, Plugin):
        error = f"{where} is not a moe_lightning.plugins.Plugin, got {type(plugin).__name__}"
    elif plugin.name != entry_point.name:
        error = f"{where} names its plugin {plugin.name!r}, not {entry_point.name!r}"
    else:
        return InstalledPlugin(entry_point.name, distribution, version, plugin)
    return InstalledPlugin(entry_point.name, distribution, version, None, error)
