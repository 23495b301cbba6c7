"""Errors as the API reports them: OpenAI's `{"error": {...}}` shape, one place for all.

Handlers raise `APIError`; `error_response` turns it into a response. The `x-should-retry`
header tells the official OpenAI clients (which retry 408/409/429/5xx by default) whether a
retry can help, and `retry-after` tells them when.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import ValidationError
from starlette.responses import JSONResponse

from deployments.ingress.protocol import ErrorDetail, ErrorResponse


class APIError(Exception):
    """An error to send to the client. Its message must be safe to show: no internals."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str,
        param: str | None = None,
        code: str | None = None,
        retryable: bool = False,
        retry_after_s: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.headers = dict(headers or {})


def invalid_request(message: str, *, param: str | None = None, code: str | None = None):
    return APIError(400, message, type="invalid_request_error", param=param, code=code)


def internal_error() -> APIError:
    return APIError(
        500,
        "The server had an error while processing your request. The error is logged with "
        "this request's id (x-request-id).",
        type="server_error",
        code="internal_error",
        retryable=True,
    )


def service_unavailable(message: str, *, retry_after_s: int = 1) -> APIError:
    return APIError(
        503,
        message,
        type="server_error",
        code="service_unavailable",
        retryable=True,
        retry_after_s=retry_after_s,
    )


def model_not_found(model_id: str) -> APIError:
    return APIError(
        404,
        f"The model '{model_id}' does not exist.",
        type="invalid_request_error",
        param="model",
        code="model_not_found",
    )


def unauthorized(message: str, *, code: str) -> APIError:
    return APIError(401, message, type="invalid_request_error", code=code)


def body_too_large(max_bytes: int) -> APIError:
    return APIError(
        413,
        f"The request body is larger than this service accepts ({max_bytes} bytes).",
        type="invalid_request_error",
        code="request_too_large",
    )


def timed_out(timeout_s: float) -> APIError:
    # Not retryable by default: the same request would likely time out again, and a retry
    # doubles the load that made it slow. A client that knows better may still retry.
    return APIError(
        504,
        f"The images were not ready within {timeout_s:g} seconds, so the request was stopped. "
        "Ask for fewer or smaller images or fewer steps, or try again later.",
        type="server_error",
        code="timeout",
    )


def error_body(error: APIError) -> dict:
    """The JSON body of an error answer; also the data of a stream's `error` event."""
    detail = ErrorDetail(message=error.message, type=error.type, param=error.param, code=error.code)
    return ErrorResponse(error=detail).model_dump()


def error_response(error: APIError) -> JSONResponse:
    headers = {**error.headers, "x-should-retry": "true" if error.retryable else "false"}
    if error.retry_after_s is not None:
        headers["retry-after"] = str(error.retry_after_s)
    if error.status_code == 401:
        headers["www-authenticate"] = "Bearer"
    return JSONResponse(error_body(error), status_code=error.status_code, headers=headers)


def from_validation_error(exc: ValidationError) -> APIError:
    """The first problem of a failed request validation, as a 400 that names the parameter."""
    first = exc.errors(include_url=False, include_input=False)[0]
    location = [str(part) for part in first["loc"]]
    param = ".".join(location) if location else None
    kind = first["type"]
    if kind == "extra_forbidden":
        return invalid_request(
            f"Unknown parameter: '{param}'.", param=param, code="unknown_parameter"
        )
    if kind == "missing":
        return invalid_request(
            f"Missing required parameter: '{param}'.",
            param=param,
            code="missing_required_parameter",
        )
    if kind == "model_type" and not location:
        return invalid_request("The request body must be a JSON object.", code="invalid_body")
    # pydantic prefixes messages raised in validators with "Value error, ".
    reason = first["msg"].removeprefix("Value error, ")
    return invalid_request(
        f"Invalid value for '{param}': {reason}.", param=param, code="invalid_value"
    )


def storage_unavailable(
    *, retry_after_s: int = 1, reading: bool = False, lasting: bool = False
) -> APIError:
    # The images were made, but a `url` needs them stored. A bucket out of reach or a
    # passing write error is the service's trouble and passing, so a retry can help; a
    # full or read-only volume (`lasting`) is not mended in seconds, and a client told to
    # retry would regenerate its images into it. `reading`: fetching a stored image.
    if reading:
        message = "The image store cannot be reached. Try again shortly."
    elif lasting:
        message = (
            "The images could not be stored for their URLs: the image store is full or "
            "read-only. Ask "
            "for 'response_format': 'b64_json', or try again later."
        )
    else:
        message = (
            "The images could not be stored for their URLs. Try again shortly, or ask for "
            "'response_format': 'b64_json'."
        )
    return APIError(
        503,
        message,
        type="server_error",
        code="storage_unavailable",
        retryable=not lasting,
        retry_after_s=None if lasting else retry_after_s,
    )


def rate_limited(
    message: str, *, kind: str, code: str, retry_after_s: int | None, headers: Mapping[str, str]
) -> APIError:
    """429 of a key over one of its limits. `kind` is the limit's, as OpenAI types its own
    429s (`requests`, `tokens`); retryable when waiting `retry_after_s` can help."""
    return APIError(
        429,
        message,
        type=kind,
        code=code,
        retryable=retry_after_s is not None,
        retry_after_s=retry_after_s,
        headers=headers,
    )


def quota_store_unavailable() -> APIError:
    # `on_store_error: closed`: without its counts the service cannot tell whether the key is
    # within its limits, and says so; Redis is usually back within seconds.
    return APIError(
        503,
        "The service cannot check this key's rate limits right now. Retry shortly.",
        type="server_error",
        code="quota_store_unavailable",
        retryable=True,
        retry_after_s=1,
    )
