"""Backend plugins (DeepSpeed, FairScale, Megatron-Core): separate distributions found through the
``moe_lightning.plugins`` entry-point group, each pointing to a :class:`Plugin` record of what it registers.

A plugin's ``pyproject.toml``::

    [project.entry-points."moe_lightning.plugins"]
    deepspeed = "moe_lightning_deepspeed.plugin:PLUGIN"

Strategies become Lightning strategy names (``strategy: deepspeed_moe`` in YAML, ``Trainer(strategy=...)``) when
:mod:`moe_lightning.strategies` is imported; other kinds are looked up with :func:`resolve`. Nothing here imports a
plugin's backend until one of its names is used.
"""

from moe_lightning.plugins.discovery import ENTRY_POINT_GROUP, InstalledPlugin, installed_plugins
from moe_lightning.plugins.known import KNOWN_PLUGINS, KnownPlugin, PluginNotInstalledError, missing_plugin_error
from moe_lightning.plugins.listing import describe_plugins, plugins_main
from moe_lightning.plugins.records import KINDS, Kind, Plugin, Registration
from moe_lightning.plugins.registry import load_target, register_plugin_strategies, registrations, resolve

__all__ = [
    "ENTRY_POINT_GROUP", "InstalledPlugin", "KINDS", "KNOWN_PLUGINS", "Kind", "KnownPlugin", "Plugin",
    "PluginNotInstalledError", "Registration", "describe_plugins", "installed_plugins", "load_target",
    "missing_plugin_error", "plugins_main",
    "register_plugin_strategies", "registrations", "resolve",
]
