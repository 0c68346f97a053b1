"""Router specs: a router factory written down as data (``class_path`` + ``init_args``), and built back from it.

A spec is what LightningCLI YAML says under ``router:``; it lets a model's architecture travel as JSON beside its
weights, so loading a model never unpickles code.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Any

from moe_lightning.routing import Router


def router_spec(factory: Callable[..., Router]) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` of a factory that is a :class:`Router` class or a ``functools.partial`` of one
    (jsonargparse builds ``partial(<instantiator>, RouterClass, **init_args)``); None for anything else. Dataclass
    arguments (a :class:`RouterNumerics`) are written as mappings of their fields, which routers accept back."""
    init_args: dict[str, Any] = {}
    while isinstance(factory, functools.partial):
        init_args = {**factory.keywords, **init_args}
        classes = [arg for arg in factory.args if _is_router_class(arg)]
        if len(classes) == 1 and factory.args[-1] is classes[0]:
            factory = classes[0]
        elif factory.args:
            return None
        else:
            factory = factory.func
    if not _is_router_class(factory):
        return None
    init_args = {name: _as_data(value) for name, value in init_args.items()}
    return {"class_path": f"{factory.__module__}.{factory.__qualname__}", "init_args": init_args}


def router_factory_from_spec(spec: dict[str, Any]) -> Callable[[int, int], Router]:
    """The factory a spec describes. Only :class:`Router` subclasses are accepted as ``class_path``."""
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        raise ValueError(f"a router spec needs a string class_path, got {spec!r}")
    class_path, init_args = spec["class_path"], spec.get("init_args") or {}
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name) if module_name else None
    except (ImportError, AttributeError) as error:
        raise ValueError(f"router class_path={class_path!r} cannot be imported: {error}") from error
    if not _is_router_class(cls):
        raise ValueError(f"router class_path={class_path!r} is not a moe_lightning Router subclass")
    if not isinstance(init_args, dict):
        raise ValueError(f"router init_args must be a mapping, got init_args={init_args!r}")
    return functools.partial(cls, **init_args)


def _as_data(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value


def _is_router_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, Router)
