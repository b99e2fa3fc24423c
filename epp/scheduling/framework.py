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
from typing import Any, ClassVar, TypeVar

from epp.datastore import Endpoint, EndpointMetrics
from epp.errors import ConfigError
from epp.requests import InferenceRequest
from epp.scheduling.params import Params


class CycleState:
    """Per-request scratch space: the scheduling clock and data plugins pass along."""

    __slots__ = ("_fresh", "_fresh_of", "data", "now", "staleness")

    def __init__(self, now: float, staleness: float) -> None:
        self.now = now
        self.staleness = staleness
        self.data: dict[Any, Any] = {}
        self._fresh_of: list[Endpoint] | None = None
        self._fresh: list[EndpointMetrics | None] = []

    def metrics(self, ep: Endpoint) -> EndpointMetrics | None:
        """Fresh metrics, or None when the endpoint's state is unknown (never scraped or stale)."""
        return ep.fresh_metrics(self.now, self.staleness)

    def metrics_of(self, endpoints: list[Endpoint]) -> list[EndpointMetrics | None]:
        """`metrics` of each endpoint, in order: worked out once per candidate list, since every
        scorer of a cycle asks about the same list (a list a filter returned is another one). One
        snapshot for the whole cycle, shared: read it, never change it."""
        if self._fresh_of is not endpoints:
            now, staleness = self.now, self.staleness
            self._fresh = [ep.fresh_metrics(now, staleness) for ep in endpoints]
            self._fresh_of = endpoints
        return self._fresh


Lookup = Callable[[str], "Plugin | None"]


class Plugin:
    """Base of every plugin: a GIE type name and an instance name (defaults to the type)."""

    type_name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()  # older releases' names for the same type
    # Upstream's factory for this type takes no parameters and ignores any given: a warning, not an error.
    ignores_parameters: ClassVar[bool] = False
    # Lower runs first among the request-lifecycle hooks: a producer others read from runs last.
    hook_order: ClassVar[int] = 0

    def __init__(self, name: str = "") -> None:
        self.name = name or self.type_name

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        """Build from the `parameters:` of an EndpointPickerConfig entry."""
        params.done(ignored_upstream=cls.ignores_parameters)
        return cls(name)

    def bind(self, lookup: Lookup) -> None:
        """Resolve references to other plugins by name, once all are built (see decision-tree-filter).

        `lookup` is a `Binder` when the config loader binds; tests may pass a plain `dict.get`.
        """

    def describe(self) -> dict[str, Any]:
        """The effective parameters, defaults filled in (for `epp check-config`)."""
        return {}

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
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        max_endpoints = params.int("maxNumOfEndpoints", 1)
        if max_endpoints < 1:  # upstream falls back to 1
            params.warnings.append(f"plugin {cls.type_name!r}: maxNumOfEndpoints {max_endpoints} < 1, using 1")
            max_endpoints = 1
        params.done()
        return cls(name, max_endpoints=max_endpoints)

    def describe(self) -> dict[str, Any]:
        return {"maxNumOfEndpoints": self.max_endpoints}


class PrepareRequestData(ABC):
    """Gathers per-request data that takes I/O (a tokenizer's HTTP call) before the scheduling cycle.

    The cycle itself is synchronous, so what needs the network is awaited first, by
    `Scheduler.prepare`, within `prepare_timeout` seconds. `prepare` stores what it found for the
    cycle's plugins to read, and never raises for a failure: a request whose data is missing is
    scheduled without it, as upstream's director logs a data producer's error and goes on.
    """

    prepare_timeout: float = 5.0

    @abstractmethod
    async def prepare(self, request: InferenceRequest) -> None:
        ...


class Closes(ABC):
    """Holds something to let go of when epp stops (a socket thread, an HTTP session)."""

    @abstractmethod
    async def aclose(self) -> None:
        ...


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


class ResponseHeaders(ABC):
    """Adds headers to the response sent to the client (session tokens, conformance results).

    Called once per picked request when the model server's response headers arrive; returns
    (name, value) pairs, or an empty tuple.
    """

    @abstractmethod
    def response_headers(self, request: InferenceRequest, endpoint: Endpoint) -> tuple[tuple[str, str], ...]:
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


P = TypeVar("P", bound=Plugin)


class Binder:
    """What `bind` gets from the config loader: plugins by name, and shared producers.

    A producer (the in-flight load, the prefix index) is found by name, or the one of its type
    the config defines, or created with its defaults and added to the scheduler, as upstream
    creates the data producers a consumer needs.
    """

    def __init__(self, plugins: dict[str, Plugin], adopt: Callable[[Plugin], None]) -> None:
        self._plugins = plugins
        self._adopt = adopt
        self.looked_up: set[str] = set()  # names resolved: those plugins are in use

    def __call__(self, name: str) -> Plugin | None:
        found = self._plugins.get(name)
        if found is not None:
            self.looked_up.add(name)
        return found

    def find(self, cls: type[P]) -> P | None:
        """The config's producer of this type, if it has one (none is created)."""
        same = [p for p in self._plugins.values() if isinstance(p, cls)]
        if len(same) == 1:
            self.looked_up.add(same[0].name)
            return same[0]
        by_type = self._plugins.get(cls.type_name)
        if isinstance(by_type, cls):
            self.looked_up.add(by_type.name)
            return by_type
        return None

    def producer(self, cls: type[P], name: str = "", *, param: str = "") -> P:
        if name:
            found = self._plugins.get(name)
            if not isinstance(found, cls):
                where = f"{param} " if param else ""
                raise ConfigError(f"{where}{name!r} names no {cls.type_name} plugin")
            self.looked_up.add(name)
            return found
        existing = self.find(cls)
        if existing is not None:
            return existing
        same = [p for p in self._plugins.values() if isinstance(p, cls)]
        by_type = self._plugins.get(cls.type_name)
        if same:
            raise ConfigError(f"several {cls.type_name} plugins are defined: name one with {param or 'a parameter'}")
        if by_type is not None:
            raise ConfigError(f"plugin {cls.type_name!r} is not a {cls.type_name}")
        made = cls(cls.type_name)
        self._plugins[made.name] = made
        self._adopt(made)
        return made


def producer(lookup: Lookup, cls: type[P], name: str = "", *, param: str = "") -> P:
    """The producer a plugin reads from: through the loader's `Binder`, or (a plugin used on its own)
    the named one, else a private default."""
    if isinstance(lookup, Binder):
        return lookup.producer(cls, name, param=param)
    found = lookup(name or cls.type_name)
    if isinstance(found, cls):
        return found
    if name:
        raise ConfigError(f"{param + ' ' if param else ''}{name!r} names no {cls.type_name} plugin")
    return cls(cls.type_name)


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
