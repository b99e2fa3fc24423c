"""Typed reads of a plugin's `parameters:` that fail with a message naming the plugin and key.

A parameter epp does not know is an error, unless upstream itself would ignore it: GIE's
factories decode leniently (unknown keys dropped) and some upstream types take no parameters
at all. Then it is a warning, collected for the start-up log and `epp check-config`, never
silently dropped.
"""

from __future__ import annotations

import builtins
import math
from typing import Any

from epp.durations import parse_duration
from epp.errors import ConfigError


class Params:
    """Consumes parameters one by one; `done()` refuses (or warns about) any the plugin does not know.

    `strict=False` means upstream ignores unknown keys for this file (a GIE apiVersion):
    they become warnings in `warnings` instead of errors.
    """

    def __init__(self, plugin_type: builtins.str, params: dict[builtins.str, Any] | None = None, *,
                 strict: builtins.bool = True, warnings: builtins.list[builtins.str] | None = None) -> None:
        self.plugin_type = plugin_type
        self._params = dict(params or {})
        self.strict = strict
        self.warnings = warnings if warnings is not None else []

    def _fail(self, key: builtins.str, what: builtins.str) -> ConfigError:
        return ConfigError(f"plugin {self.plugin_type!r}: parameter {key!r} {what}")

    def has(self, key: builtins.str) -> bool:
        return key in self._params

    def given(self) -> builtins.list[builtins.str]:
        """The keys not consumed yet."""
        return sorted(self._params)

    def raw(self, key: builtins.str, default: Any = None) -> Any:
        return self._params.pop(key, default)

    def int(self, key: builtins.str, default: builtins.int, *, minimum: builtins.int | None = None,
            maximum: builtins.int | None = None) -> builtins.int:
        value = self._params.pop(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self._fail(key, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self._fail(key, f"must be <= {maximum}, got {value}")
        return value

    def float(self, key: builtins.str, default: builtins.float, *, minimum: builtins.float | None = None,
              maximum: builtins.float | None = None, above: builtins.float | None = None) -> float:
        value = self._params.pop(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self._fail(key, f"must be a number, got {value!r}")
        if minimum is not None and value < minimum:
            raise self._fail(key, f"must be >= {minimum}, got {value}")
        if above is not None and value <= above:
            raise self._fail(key, f"must be > {above}, got {value}")
        if maximum is not None and value > maximum:
            raise self._fail(key, f"must be <= {maximum}, got {value}")
        return float(value)

    def bool(self, key: builtins.str, default: builtins.bool) -> bool:
        value = self._params.pop(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, f"must be true or false, got {value!r}")
        return value

    def str(self, key: builtins.str, default: builtins.str, *, empty: builtins.bool = False,
            choices: tuple[builtins.str, ...] | None = None, peek: builtins.bool = False) -> str:
        value = self._params.get(key, default) if peek else self._params.pop(key, default)
        if not isinstance(value, str) or (not value and not empty):
            raise self._fail(key, f"must be a non-empty string, got {value!r}")
        if choices is not None and value not in choices:
            raise self._fail(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    def duration(self, key: builtins.str, default: builtins.float) -> builtins.float:
        """A Go duration ("200ms", "1m30s") in seconds."""
        if key not in self._params:
            return default
        value = self._params.pop(key)
        try:
            return parse_duration(value)
        except (TypeError, ValueError) as e:
            raise self._fail(key, f"must be a duration like '200ms': {e}") from None

    def list(self, key: builtins.str) -> builtins.list[Any]:
        value = self._params.pop(key, [])
        if value is None:
            return []
        if not isinstance(value, builtins.list):
            raise self._fail(key, f"must be a list, got {value!r}")
        return value

    def mapping(self, key: builtins.str) -> dict[builtins.str, Any]:
        value = self._params.pop(key, {})
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self._fail(key, f"must be a mapping, got {value!r}")
        return value

    def optional_int(self, key: builtins.str, *, minimum: builtins.int | None = None) -> builtins.int | None:
        if key not in self._params:
            return None
        return self.int(key, 0, minimum=minimum)

    def optional_float(self, key: builtins.str, *, minimum: builtins.float | None = None,
                       maximum: builtins.float | None = None) -> builtins.float | None:
        if key not in self._params:
            return None
        return self.float(key, 0.0, minimum=minimum, maximum=maximum)

    def deprecated(self, *keys: builtins.str, why: builtins.str) -> None:
        """Keys upstream accepts and ignores: a warning if given."""
        for key in keys:
            if key in self._params:
                self._params.pop(key)
                self.warnings.append(f"plugin {self.plugin_type!r}: parameter {key!r} has no effect ({why})")

    def rest(self) -> dict[builtins.str, Any]:
        """Every parameter not consumed yet, handed to a reader of its own (flow control's policies)."""
        left, self._params = self._params, {}
        return left

    def sub(self, key: builtins.str, mapping: dict[builtins.str, Any]) -> Params:
        """Read a nested object with the same strictness; its errors name `parent.child`."""
        return Params(f"{self.plugin_type}' parameter '{key}", mapping, strict=self.strict, warnings=self.warnings)

    def done(self, *, ignored_upstream: builtins.bool = False) -> None:
        """Refuse what is left, or warn about it where upstream ignores it (lenient decoding, or a
        type whose upstream factory takes no parameters)."""
        if not self._params:
            return
        left = sorted(self._params)
        self._params.clear()
        if ignored_upstream or not self.strict:
            self.warnings.append(f"plugin {self.plugin_type!r}: parameter(s) {left} ignored, as upstream ignores them")
            return
        raise ConfigError(f"plugin {self.plugin_type!r}: unknown parameter(s) {left}")
