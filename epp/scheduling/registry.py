"""Plugin types by GIE `type` name. A plugin module registers itself on import."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, TypeVar

from epp.scheduling.framework import ConfigError, Plugin

P = TypeVar("P", bound=type[Plugin])

_TYPES: dict[str, type[Plugin]] = {}


def register(*type_names: str) -> Callable[[P], P]:
    """Class decorator: the first name is canonical, later ones are accepted aliases (older releases)."""

    def wrap(cls: P) -> P:
        cls.type_name = type_names[0]
        for name in type_names:
            if name in _TYPES:
                raise RuntimeError(f"plugin type {name!r} registered twice")
            _TYPES[name] = cls
        return cls

    return wrap


_loaded = False


def plugin_types() -> dict[str, type[Plugin]]:
    """Every registered type; the built-in plugin modules are imported on first use."""
    global _loaded
    if not _loaded:
        from epp.scheduling import plugins

        for mod in pkgutil.iter_modules(plugins.__path__):
            importlib.import_module(f"{plugins.__name__}.{mod.name}")
        _loaded = True
    return dict(_TYPES)


def create(type_name: str, name: str = "", params: dict[str, Any] | None = None) -> Plugin:
    types = plugin_types()
    cls = types.get(type_name)
    if cls is None:
        known = ", ".join(sorted(types))
        raise ConfigError(f"unknown plugin type {type_name!r}; known types: {known}")
    return cls.from_parameters(name or cls.type_name, dict(params or {}))
