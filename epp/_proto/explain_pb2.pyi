from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExplainRequest(_message.Message):
    __slots__ = ("path", "headers", "body", "subset")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PATH_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    SUBSET_FIELD_NUMBER: _ClassVar[int]
    path: str
    headers: _containers.ScalarMap[str, str]
    body: bytes
    subset: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, path: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ..., body: _Optional[bytes] = ..., subset: _Optional[_Iterable[str]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("http_status", "code", "message", "reason")
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    http_status: int
    code: str
    message: str
    reason: str
    def __init__(self, http_status: _Optional[int] = ..., code: _Optional[str] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class EndpointMetrics(_message.Message):
    __slots__ = ("fresh", "waiting", "running", "kv_usage", "active_adapters", "waiting_adapters", "max_lora", "inflight")
    FRESH_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    WAITING_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    fresh: bool
    waiting: int
    running: int
    kv_usage: float
    active_adapters: _containers.RepeatedScalarFieldContainer[str]
    waiting_adapters: _containers.RepeatedScalarFieldContainer[str]
    max_lora: int
    inflight: int
    def __init__(self, fresh: _Optional[bool] = ..., waiting: _Optional[int] = ..., running: _Optional[int] = ..., kv_usage: _Optional[float] = ..., active_adapters: _Optional[_Iterable[str]] = ..., waiting_adapters: _Optional[_Iterable[str]] = ..., max_lora: _Optional[int] = ..., inflight: _Optional[int] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("name", "address", "passed_filters", "total", "scores", "rank", "metrics")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PASSED_FILTERS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    passed_filters: bool
    total: float
    scores: _containers.ScalarMap[str, float]
    rank: int
    metrics: EndpointMetrics
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., passed_filters: _Optional[bool] = ..., total: _Optional[float] = ..., scores: _Optional[_Mapping[str, float]] = ..., rank: _Optional[int] = ..., metrics: _Optional[_Union[EndpointMetrics, _Mapping]] = ...) -> None: ...

class ScorerWeight(_message.Message):
    __slots__ = ("name", "weight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("model", "target_model", "model_rewrite", "objective", "priority", "pool_saturated", "profile", "scorers", "candidates", "targets", "error")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_REWRITE_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    POOL_SATURATED_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    SCORERS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    model: str
    target_model: str
    model_rewrite: str
    objective: str
    priority: int
    pool_saturated: bool
    profile: str
    scorers: _containers.RepeatedCompositeFieldContainer[ScorerWeight]
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    targets: _containers.RepeatedScalarFieldContainer[str]
    error: Error
    def __init__(self, model: _Optional[str] = ..., target_model: _Optional[str] = ..., model_rewrite: _Optional[str] = ..., objective: _Optional[str] = ..., priority: _Optional[int] = ..., pool_saturated: _Optional[bool] = ..., profile: _Optional[str] = ..., scorers: _Optional[_Iterable[_Union[ScorerWeight, _Mapping]]] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., targets: _Optional[_Iterable[str]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...
