"""decision-tree-filter: run a filter, then another chosen by whether it kept anything.

Expresses GIE's older default ("low-latency" tree: low queue -> LoRA affinity ->
least queue -> least KV cache) in config. Parameters, as GIE: `current` and
optionally `nextOnSuccess`, `nextOnFailure`, `nextOnSuccessOrFailure`; each entry
is either `pluginRef: <filter name>` or a nested `decisionTree:`. On success the next
filter sees the survivors; on failure it sees the original candidates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from epp.datastore import Endpoint
from epp.errors import ConfigError
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Filter, Plugin
from epp.scheduling.params import Params

_BRANCHES = ("nextOnSuccess", "nextOnFailure", "nextOnSuccessOrFailure")


class _Node:
    __slots__ = ("current", "on_failure", "on_success", "spec")

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.current: Filter | _Node | None = None
        self.on_success: Filter | _Node | None = None
        self.on_failure: Filter | _Node | None = None


def _check(tree: Any, path: str) -> None:
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must be a mapping")
    unknown = set(tree) - {"current", *_BRANCHES}
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {sorted(unknown)}")
    if "current" not in tree:
        raise ConfigError(f"{path}: a 'current' filter must be given")
    for key in ("current", *_BRANCHES):
        if key not in tree:
            continue
        entry = tree[key]
        where = f"{path}.{key}"
        if not isinstance(entry, dict) or len(set(entry) & {"pluginRef", "decisionTree"}) != 1 or len(entry) != 1:
            raise ConfigError(f"{where} needs exactly one of 'pluginRef' or 'decisionTree'")
        if "decisionTree" in entry:
            _check(entry["decisionTree"], f"{where}.decisionTree")
        elif not isinstance(entry["pluginRef"], str):
            raise ConfigError(f"{where}.pluginRef must be a plugin name")


class DecisionTreeFilter(Filter):
    type_name = "decision-tree-filter"

    def __init__(self, name: str = "", *, tree: dict[str, Any]) -> None:
        super().__init__(name)
        _check(tree, f"plugin {name!r} parameters")
        self.root = _Node(tree)

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        tree = {key: params.raw(key) for key in params.given()}
        return cls(name, tree=tree)

    def bind(self, lookup: Callable[[str], Plugin | None]) -> None:
        def resolve(entry: dict[str, Any]) -> Filter | _Node:
            if "decisionTree" in entry:
                return build(entry["decisionTree"])
            ref = entry["pluginRef"]
            plugin = lookup(ref)
            if plugin is None:
                raise ConfigError(f"decision tree {self.name!r}: pluginRef {ref!r} names no plugin")
            if plugin is self or not isinstance(plugin, Filter):
                raise ConfigError(f"decision tree {self.name!r}: {ref!r} is not a filter it can use")
            return plugin

        def build(tree: dict[str, Any]) -> _Node:
            node = _Node(tree)
            node.current = resolve(tree["current"])
            both = tree.get("nextOnSuccessOrFailure")
            success = tree.get("nextOnSuccess", both)
            failure = tree.get("nextOnFailure", both)
            node.on_success = resolve(success) if success else None
            node.on_failure = resolve(failure) if failure else None
            return node

        self.root = build(self.root.spec)

    def filter(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        return _run(self.root, state, request, endpoints)


def _run(
    node: Filter | _Node, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]
) -> list[Endpoint]:
    if isinstance(node, Filter):
        return node.filter(state, request, endpoints)
    if node.current is None:
        raise RuntimeError("decision tree used before bind()")
    kept = _run(node.current, state, request, endpoints)
    if kept:
        return _run(node.on_success, state, request, kept) if node.on_success else kept
    return _run(node.on_failure, state, request, endpoints) if node.on_failure else kept
