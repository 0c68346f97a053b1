"""The plugins this repository ships under ``plugins/``, and what each provides, so that a config naming one that is
not installed gets told what to install (an absent plugin cannot describe itself)."""

from __future__ import annotations

from dataclasses import dataclass

from moe_lightning.plugins.records import Kind


@dataclass(frozen=True)
class KnownPlugin:
    name: str
    provides: dict[Kind, tuple[str, ...]]
    """The short names per kind; a test checks they match the installed plugin's own records."""

    @property
    def package(self) -> str:
        return f"moe_lightning_{self.name}"

    @property
    def install_command(self) -> str:
        return f"pip install -e plugins/{self.name}"


KNOWN_PLUGINS: tuple[KnownPlugin, ...] = (
    KnownPlugin("deepspeed", {
        "strategy": ("deepspeed_moe", "deepspeed_moe_stage_1", "deepspeed_moe_stage_2", "deepspeed_moe_stage_3"),
        "experts": ("deepspeed_moe",),
        "router_adapter": ("deepspeed_top_k_gate",),
    }),
)


class PluginNotInstalledError(ValueError):
    """A config names something a plugin provides, and the plugin is not installed."""

    def __init__(self, what: str, plugin: KnownPlugin) -> None:
        self.plugin = plugin
        super().__init__(
            f"{what} is provided by the {plugin.name!r} plugin (package {plugin.package}), which is not "
            f"installed: run `{plugin.install_command}` from the moe_lightning repository root (with "
            f"`torch==2.13.0` in the same pip command on a CPU machine, so pip keeps the installed torch)"
        )


def known_provider(kind: Kind, name: str) -> KnownPlugin | None:
    return next((plugin for plugin in KNOWN_PLUGINS if name in plugin.provides.get(kind, ())), None)


def missing_plugin_error(error: BaseException) -> PluginNotInstalledError | None:
    """For an error raised while importing a shipped plugin's package that is not installed (a YAML ``class_path``
    such as ``moe_lightning_deepspeed.DeepSpeedExpertParallelStrategy``), the error saying what to install."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ModuleNotFoundError) and cause.name:
            package = cause.name.split(".")[0]
            plugin = next((known for known in KNOWN_PLUGINS if known.package == package), None)
            if plugin is not None:
                return PluginNotInstalledError(f"module {cause.name!r}", plugin)
        cause = cause.__cause__ or cause.__context__
    return None
