"""by-label (llm-d-router, deprecated for label-selector-filter): keep the servers whose `label`
has one of `validValues`, and, with `allowsNoLabel`, those without the label."""

from __future__ import annotations

from typing import Any

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Filter, Plugin
from epp.scheduling.params import Params


class ByLabelFilter(Filter):
    type_name = "by-label"

    def __init__(self, name: str = "", *, label: str, values: frozenset[str], allows_no_label: bool = False) -> None:
        super().__init__(name)
        self.label = label
        self.values = values
        self.allows_no_label = allows_no_label

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        params.warnings.append("plugin type 'by-label' is deprecated upstream; use label-selector-filter")
        label = params.str("label", "", empty=True)
        values = params.list("validValues")
        allows = params.bool("allowsNoLabel", False)
        params.done()
        if not label:
            raise ValueError("plugin 'by-label': 'label' must be specified")
        if not all(isinstance(v, str) for v in values):
            raise ValueError("plugin 'by-label': 'validValues' must be a list of strings")
        if not values and not allows:
            raise ValueError("plugin 'by-label': give 'validValues', or set 'allowsNoLabel'")
        return cls(name, label=label, values=frozenset(values), allows_no_label=allows)

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "validValues": sorted(self.values), "allowsNoLabel": self.allows_no_label}

    def filter(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        label, values, allows = self.label, self.values, self.allows_no_label
        out = []
        for ep in endpoints:
            value = ep.labels.get(label)
            if (value is None and allows) or (value is not None and value in values):
                out.append(ep)
        return out
