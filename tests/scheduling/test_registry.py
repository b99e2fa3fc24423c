"""The plugin registry (epp.scheduling.registry): the explicit list of built-in plugins, by GIE type name."""

from __future__ import annotations

import pkgutil

import pytest

from epp.errors import ConfigError
from epp.scheduling import plugins, registry


def test_every_plugin_module_is_registered() -> None:
    """A plugin file left out of BUILT_IN could never be named in a config."""
    modules = {m.name for m in pkgutil.iter_modules(plugins.__path__)}
    registered = {cls.__module__.rsplit(".", 1)[1] for cls in registry.BUILT_IN}
    assert modules == registered


def test_older_names_find_the_same_plugin() -> None:
    types = registry.plugin_types()
    assert types["kv-cache-scorer"] is types["kv-cache-utilization-scorer"]


def test_an_unknown_type_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown plugin type 'nope'; known types: .*queue-scorer"):
        registry.create("nope")


def test_create_names_the_instance() -> None:
    assert registry.create("queue-scorer").name == "queue-scorer"
    assert registry.create("queue-scorer", "q").name == "q"
