"""label-selector-filter (llm-d-router; formerly by-label-selector): keep the servers whose labels
match a Kubernetes label selector.

The parameters are a LabelSelector: `matchLabels` (every pair must match) and `matchExpressions`
(`key`, `operator` In / NotIn / Exists / DoesNotExist, `values`), as in a Deployment's selector.
An empty selector keeps every server.
"""

from __future__ import annotations

import re
from typing import Any

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Filter, Plugin
from epp.scheduling.params import Params

_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_NAME}$")
_VALUE = re.compile(rf"^({_NAME})?$")
_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")

# (key, operator, values): the selector compiled for the hot path.
Requirement = tuple[str, str, frozenset[str]]


def parse_selector(params: Params) -> tuple[Requirement, ...]:
    """A LabelSelector's requirements, validated as Kubernetes validates them."""
    where = f"plugin {params.plugin_type!r}"
    out: list[Requirement] = []
    for label, value in params.mapping("matchLabels").items():
        _check_key(where, label)
        if not isinstance(value, str) or not _VALUE.match(value):
            raise ValueError(f"{where}: matchLabels[{label!r}]: {value!r} is not a valid label value")
        out.append((label, "In", frozenset((value,))))
    for i, expr in enumerate(params.list("matchExpressions")):
        if not isinstance(expr, dict):
            raise ValueError(f"{where}: matchExpressions[{i}] must be a mapping")
        unknown = set(expr) - {"key", "operator", "values"}
        if unknown:
            raise ValueError(f"{where}: matchExpressions[{i}]: unknown field(s) {sorted(unknown)}")
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        _check_key(where, key)
        assert isinstance(key, str)
        if op not in _OPERATORS:
            raise ValueError(f"{where}: matchExpressions[{i}].operator must be one of {', '.join(_OPERATORS)}, "
                             f"got {op!r}")
        if not isinstance(values, list) or not all(isinstance(v, str) and _VALUE.match(v) for v in values):
            raise ValueError(f"{where}: matchExpressions[{i}].values must be a list of label values")
        if op in ("In", "NotIn") and not values:
            raise ValueError(f"{where}: matchExpressions[{i}]: operator {op} needs values")
        if op in ("Exists", "DoesNotExist") and values:
            raise ValueError(f"{where}: matchExpressions[{i}]: operator {op} takes no values")
        out.append((key, op, frozenset(values)))
    return tuple(out)


def _check_key(where: str, key: Any) -> None:
    if not isinstance(key, str) or not _KEY.match(key) or len(key.rpartition("/")[0]) > 253:
        raise ValueError(f"{where}: {key!r} is not a valid label key")


def matches(labels: dict[str, str], requirements: tuple[Requirement, ...]) -> bool:
    for key, op, values in requirements:
        value = labels.get(key)
        if op == "In":
            if value is None or value not in values:
                return False
        elif op == "NotIn":
            if value is not None and value in values:
                return False
        elif op == "Exists":
            if value is None:
                return False
        elif value is not None:  # DoesNotExist
            return False
    return True


class LabelSelectorFilter(Filter):
    type_name = "label-selector-filter"
    aliases = ("by-label-selector",)

    def __init__(self, name: str = "", *, requirements: tuple[Requirement, ...] = ()) -> None:
        super().__init__(name)
        self.requirements = requirements

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        requirements = parse_selector(params)
        params.done()
        return cls(name, requirements=requirements)

    def describe(self) -> dict[str, Any]:
        return {"requirements": [f"{k} {op} {sorted(v)}" for k, op, v in self.requirements]}

    def filter(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        reqs = self.requirements
        if not reqs:
            return endpoints
        return [ep for ep in endpoints if matches(ep.labels, reqs)]
