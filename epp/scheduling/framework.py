"""The plugin interfaces of the scheduler, and the per-request state they share.

A scheduling cycle runs one profile: filters narrow the candidates, each scorer
gives every candidate a score in [0, 1], the weighted sum goes to the picker.
Request-lifecycle hooks let a plugin learn what was sent (`PreRequest`) and when it
finished (`ResponseComplete`). A plugin is one file that subclasses one or more of
these, names its GIE `type`, and has one entry in `registry.BUILT_IN`. The hooks a
plugin takes part in are the interfaces it subclasses, never methods looked up by name.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from epp.datastore import Endpoint, EndpointMetrics
from epp.errors import ConfigError
from epp.requests import InferenceRequest
from epp.scheduling.params import Params


class CycleState:
    """Per-request scratch space: the scheduling clock and data plugins pass along."""

    __slots__ = ("data", "now", "staleness")

    def __init__(self, now: float, staleness: float) -> None:
        self.now = now
        self.staleness = staleness
        self.data: dict[str, Any] = {}

    def metrics(self, ep: Endpoint) -> EndpointMetrics | None:
        """Fresh metrics, or None when the endpoint's state is unknown (never scraped or stale)."""
        return ep.fresh_metrics(self.now, self.staleness)


class Plugin:
    """Base of every plugin: a GIE type name and an instance name (defaults to the type)."""

    type_name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()  # older releases' names for the same type

    def __init__(self, name: str = "") -> None:
        self.name = name or self.type_name

    @classmethod
    def from_parameters(cls, name: str, params: dict[str, Any]) -> Plugin:
        """Build from the `parameters:` of an EndpointPickerConfig entry."""
        if params:
            raise ConfigError(f"plugin type {cls.type_name!r} takes no parameters, got {sorted(params)}")
        return cls(name)

    def bind(self, lookup: Callable[[str], Plugin | None]) -> None:
        """Resolve references to other plugins by name, once all are built (see decision-tree-filter)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Filter(Plugin, ABC):
    @abstractmethod
    def filter(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        ...


class Scorer(Plugin, ABC):
    @abstractmethod
    def score(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[float]:
        """One score in [0, 1] per endpoint, in the same order."""
        ...


class Picker(Plugin, ABC):
    @abstractmethod
    def pick(
        self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint], scores: list[float]
    ) -> list[Endpoint]:
        """Endpoints to try, best first (the first is the pick, the rest fallbacks)."""
        ...


class Seeded(ABC):
    """A plugin that draws random numbers: `--seed` reseeds it, so tests and benchmarks repeat."""

    @abstractmethod
    def reseed(self, seed: int) -> None:
        ...


class CountedPicker(Picker, Seeded):
    """A picker that returns up to `maxNumOfEndpoints` endpoints (the pick, then fallbacks), with a seedable rng."""

    def __init__(self, name: str = "", *, max_endpoints: int = 1, seed: int | None = None) -> None:
        super().__init__(name)
        self.max_endpoints = max_endpoints
        self.rng = random.Random(seed)

    def reseed(self, seed: int) -> None:
        self.rng.seed(seed)

    @classmethod
    def from_parameters(cls, name: str, params: dict[str, Any]) -> Plugin:
        p = Params(cls.type_name, params)
        max_endpoints = p.int("maxNumOfEndpoints", 1, minimum=1)
        p.done()
        return cls(name, max_endpoints=max_endpoints)


class PreRequest(ABC):
    """Told what was picked, just before the pick is sent to the proxy."""

    @abstractmethod
    def pre_request(self, state: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        ...


class ResponseStarted(ABC):
    """Told when the first byte of a request's response body arrives (the first token, when streaming).

    Only proxies that send the response body to the EPP report it; `ResponseComplete` always follows.
    """

    @abstractmethod
    def response_started(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        ...


class ResponseComplete(ABC):
    """Told when a request's response finished (or its stream ended early)."""

    @abstractmethod
    def response_complete(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        ...


class EndpointsChanged(ABC):
    """Told when endpoints join or leave the pool (to drop what it remembers about them)."""

    @abstractmethod
    def endpoints_changed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        ...


class PrefixIndexHolder(ABC):
    """Keeps an index of which prefixes each server holds; its size is reported as a metric."""

    @abstractmethod
    def prefix_index_size(self) -> int:
        ...


@dataclass(slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float


@dataclass(slots=True)
class SchedulingResult:
    """The pick, its fallbacks, and why: every candidate's per-scorer and total score."""

    targets: list[Endpoint]
    candidates: list[Endpoint] = field(default_factory=list)
    scores: dict[str, list[float]] = field(default_factory=dict)
    totals: list[float] = field(default_factory=list)
    profile: str = "default"

    @property
    def endpoint(self) -> Endpoint:
        return self.targets[0]
