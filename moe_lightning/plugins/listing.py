"""``moe-lightning plugins``: what is installed, what each plugin registers, and what could be installed."""

from __future__ import annotations

from moe_lightning.plugins.discovery import InstalledPlugin, installed_plugins
from moe_lightning.plugins.known import KNOWN_PLUGINS


def describe_plugins(plugins: list[InstalledPlugin] | None = None) -> str:
    """A plain-text listing: per installed plugin its distribution, version and registrations; then the shipped
    plugins that are not installed, with the command that installs each."""
    plugins = installed_plugins() if plugins is None else plugins
    lines = []
    for installed in plugins:
        lines.append(f"{installed.name}  ({installed.distribution} {installed.version})")
        if installed.plugin is None:
            lines.append(f"  broken: {installed.error}")
            continue
        for registration in installed.plugin.registrations:
            lines.append(f"  {registration.kind:<15} {registration.name:<24} {registration.target}")
            if registration.description:
                lines.append(f"  {'':<15} {'':<24} {registration.description}")
    names = {installed.name for installed in plugins}
    missing = [known for known in KNOWN_PLUGINS if known.name not in names]
    if not plugins:
        lines.append("no plugins installed")
    if missing:
        lines.append("not installed:")
        lines += [f"  {known.name:<15} {known.install_command}" for known in missing]
    return "\n".join(lines)


def plugins_main(args: list[str]) -> None:
    """``moe-lightning plugins``: print :func:`describe_plugins`."""
    if args:
        raise SystemExit(f"moe-lightning plugins takes no arguments, got {args}")
    print(describe_plugins())
