"""Typed reads of a plugin's `parameters:` that fail with a message naming the plugin and key."""

from __future__ import annotations

import builtins
from typing import Any

from epp.errors import ConfigError


class Params:
    """Consumes parameters one by one; `done()` rejects any the plugin does not know."""

    def __init__(self, plugin_type: str, params: dict[str, Any]) -> None:
        self.plugin_type = plugin_type
        self._params = dict(params)

    def _fail(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"plugin {self.plugin_type!r}: parameter {key!r} {what}")

    def int(self, key: str, default: int, *, minimum: int | None = None) -> int:
        value = self._params.pop(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self._fail(key, f"must be >= {minimum}, got {value}")
        return value

    def float(self, key: str, default: float, *, minimum: float | None = None,
              maximum: float | None = None) -> float:
        value = self._params.pop(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(key, f"must be a number, got {value!r}")
        if minimum is not None and value < minimum:
            raise self._fail(key, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self._fail(key, f"must be <= {maximum}, got {value}")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self._params.pop(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, f"must be true or false, got {value!r}")
        return value

    def str(self, key: str, default: str) -> str:
        value = self._params.pop(key, default)
        if not isinstance(value, str) or not value:
            raise self._fail(key, f"must be a non-empty string, got {value!r}")
        return value

    def optional_int(self, key: builtins.str) -> builtins.int | None:
        if key not in self._params:
            return None
        return self.int(key, 0)

    def done(self) -> None:
        if self._params:
            raise ConfigError(f"plugin {self.plugin_type!r}: unknown parameter(s) {sorted(self._params)}")
