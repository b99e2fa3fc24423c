"""header-label-affinity-scorer (llm-d-router): 1 where the server's `labelKey` label equals the
request's `headerName` header, else 0 (and 0 everywhere without the header). A soft preference:
nothing is filtered out."""

from __future__ import annotations

from typing import Any

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Plugin, Scorer
from epp.scheduling.params import Params


class HeaderLabelAffinityScorer(Scorer):
    type_name = "header-label-affinity-scorer"

    def __init__(self, name: str = "", *, header: str, label: str) -> None:
        super().__init__(name)
        self.header = header.lower()
        self.label = label

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        header = params.str("headerName", "", empty=True)
        label = params.str("labelKey", "", empty=True)
        params.done()
        if not header or not label:
            raise ValueError(f"plugin {params.plugin_type!r}: headerName and labelKey are required")
        return cls(name, header=header, label=label)

    def describe(self) -> dict[str, Any]:
        return {"headerName": self.header, "labelKey": self.label}

    def score(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[float]:
        wanted = request.headers.get(self.header, "")
        if not wanted:
            return [0.0] * len(endpoints)
        label = self.label
        return [1.0 if ep.labels.get(label) == wanted else 0.0 for ep in endpoints]
