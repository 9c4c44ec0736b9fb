"""Errors in OpenAI's format, and the map from what went wrong to an HTTP status.

| what                                         | status | type                  |
|----------------------------------------------|--------|-----------------------|
| invalid body, prompt too long, bad parameter | 400    | invalid_request_error |
| output that could not follow its constraint  | 400    | invalid_request_error (code ``constraint_failed``) |
| missing or wrong API key                     | 401    | authentication_error  |
| unknown model                                | 404    | invalid_request_error |
| body larger than http.max_body_bytes         | 413    | invalid_request_error |
| admission full, Serve queue full             | 429    | rate_limit_error      |
| no live replica, replica or engine died      | 503    | service_unavailable   |
| anything else (a bug)                        | 500    | internal_error        |
"""

from __future__ import annotations

import math

from fastapi.responses import JSONResponse

from worker.core.errors import EngineDeadError, InvalidRequestError


class APIError(Exception):
    """An error the client sees; ``to_response`` renders OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.retry_after_s = param, code, retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def to_response(self) -> JSONResponse:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def constraint_failed(reason: str | None) -> APIError:
    """A generation whose grammar refused every continuation (finish "error" from the
    engine): the output so far is valid, but it could not be completed. Never a 200
    "stop" with output that breaks the constraint."""
    return APIError(400, f"{reason or 'the output could not follow its constraint'}; the "
                    "constraint (response_format, guided_*, structured_outputs or a required "
                    "tool call) cannot be satisfied by this model's output: simplify it",
                    code="constraint_failed")


def overloaded(message: str, retry_after_s: float) -> APIError:
    return APIError(429, message, type="rate_limit_error", code="overloaded",
                    retry_after_s=retry_after_s)


def unavailable(message: str, retry_after_s: float | None = 1) -> APIError:
    return APIError(503, message, type="service_unavailable", retry_after_s=retry_after_s)


def root_cause(exc: BaseException) -> BaseException:
    """The error a replica raised, under Ray's ``RayTaskError`` wrappers."""
    seen = 0
    while getattr(exc, "cause", None) is not None and seen < 8:
        exc, seen = exc.cause, seen + 1
    return exc


def from_exception(exc: BaseException) -> APIError:
    """Map an error from admission, routing or a replica to what the client sees."""
    from ray import exceptions as ray_exc
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    cause = root_cause(exc)
    if isinstance(cause, APIError):
        return cause
    if isinstance(cause, InvalidRequestError):
        return bad_request(str(cause), param=getattr(cause, "setting", None))
    if isinstance(cause, BackPressureError):
        return overloaded(f"the model's request queue is full: {cause}",
                          retry_after_s=cause.retry_after_s or 1)
    if isinstance(cause, EngineDeadError):
        return unavailable(f"the replica's engine stopped ({cause}); it is being replaced, "
                           "retry the request")
    if isinstance(cause, (ray_exc.RayActorError, ray_exc.ActorUnavailableError,
                          DeploymentUnavailableError, ray_exc.NodeDiedError)):
        return unavailable(f"the replica serving this request failed ({type(cause).__name__});"
                           " retry the request")
    return APIError(500, f"internal error: {type(cause).__name__}: {cause}",
                    type="internal_error")
