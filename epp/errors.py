"""epp's two kinds of error: a request's (an HTTP status, never a broken ext_proc stream) and a start-up one.

Each error knows its HTTP status, the GIE error code used in the
`inference_objective_request_error_total{error_code=...}` metric, and renders an
OpenAI-style JSON body so clients see the same shape they get from a model server.
"""

from __future__ import annotations

import orjson

# GIE's canonical error codes (the `error_code` label of its metrics).
BAD_REQUEST = "BadRequest"
NOT_FOUND = "NotFound"
RESOURCE_EXHAUSTED = "ResourceExhausted"
SERVICE_UNAVAILABLE = "ServiceUnavailable"
INTERNAL = "Internal"
MODEL_SERVER_ERROR = "ModelServerError"

_STATUS = {
    BAD_REQUEST: 400,
    NOT_FOUND: 404,
    RESOURCE_EXHAUSTED: 429,
    SERVICE_UNAVAILABLE: 503,
    INTERNAL: 500,
}

_OPENAI_TYPE = {
    400: "invalid_request_error",
    404: "not_found_error",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
    500: "internal_error",
}


class ConfigError(ValueError):
    """A configuration problem found at start-up, before anything is bound; the message names where."""


class EppError(Exception):
    """A request-level failure the client must hear about as an HTTP error."""

    def __init__(self, code: str, message: str, *, param: str | None = None, reason: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        # A short machine-readable reason for the OpenAI `code` field (e.g. "model_not_found").
        self.reason = reason
        # Response headers the client gets with the error (flow control's dropped reason).
        self.headers: dict[str, str] = headers or {}

    @property
    def http_status(self) -> int:
        return _STATUS.get(self.code, 500)

    def body(self) -> bytes:
        status = self.http_status
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": _OPENAI_TYPE.get(status, "error"),
                    "param": self.param,
                    "code": self.reason or status,
                }
            }
        )

    def __repr__(self) -> str:
        return f"EppError({self.code}, {self.message!r})"


def bad_request(message: str, *, param: str | None = None, reason: str = "invalid_request") -> EppError:
    return EppError(BAD_REQUEST, message, param=param, reason=reason)
