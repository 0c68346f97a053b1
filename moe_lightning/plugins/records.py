"""What a plugin registers: typed records, plain data, so that listing a plugin imports none of its backend."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["strategy", "experts", "router_adapter"]
KINDS: tuple[Kind, ...] = ("strategy", "experts", "router_adapter")


@dataclass(frozen=True)
class Registration:
    """One thing a plugin provides, under a short name configs can use."""

    kind: Kind
    """``"strategy"`` (a Lightning strategy, registered by ``name`` in Lightning's ``StrategyRegistry``),
    ``"experts"`` (an experts backend: a module with :class:`~moe_lightning.MoELayer`'s interface) or
    ``"router_adapter"`` (turns a backend's router outputs into a :class:`~moe_lightning.Routing`)."""
    name: str
    """The short name, e.g. ``"deepspeed_moe"``; unique per kind over all plugins."""
    target: str
    """Where it lives, ``"package.module:Attribute"``; imported only when the name is resolved."""
    description: str = ""
    """One line for ``moe-lightning plugins``."""
    init_params: Mapping[str, Any] = field(default_factory=dict)
    """Strategies only: the constructor arguments the name stands for (as Lightning's ``register`` takes them)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Registration kind must be one of {KINDS}, got kind={self.kind!r} for {self.name!r}")
        module, _, attribute = self.target.partition(":")
        if not module or not attribute:
            raise ValueError(f"Registration target must be 'package.module:Attribute', got target={self.target!r}")
        if self.init_params and self.kind != "strategy":
            raise ValueError(f"only strategies take init_params, got kind={self.kind!r} for {self.name!r}")


@dataclass(frozen=True)
class Plugin:
    """What a plugin's entry point (group ``moe_lightning.plugins``) points to."""

    name: str
    """The plugin's name: ``plugins/<name>`` in this repository, package ``moe_lightning_<name>``."""
    registrations: tuple[Registration, ...]
