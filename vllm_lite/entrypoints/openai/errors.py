"""OpenAI-style error JSON (vLLM flavour): {"error": {"message", "type", "param", "code"}} with the HTTP status."""
from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Any

from fastapi.responses import JSONResponse

from vllm_lite.engine.async_client import EngineDeadError, ServerStoppingError

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
          405: "MethodNotAllowed", 408: "RequestTimeout", 413: "RequestTooLarge", 422: "UnprocessableEntityError",
          429: "RateLimitError", 431: "RequestHeaderFieldsTooLarge",
          500: "InternalServerError", 501: "NotImplementedError", 503: "ServiceUnavailableError"}
_PARAM_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_\[\]\.]*)(?:=| is invalid| must|:| is not | is only | of type )")


class APIError(Exception):
    """Raised by the serving code; turned into the error JSON with `status`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


def param_of(message: str) -> str | None:
    """The top-level field a validation message names ("temperature=-1 is invalid: ..." -> "temperature")."""
    m = _PARAM_RE.match(message)
    return re.split(r"[\[.]", m.group(1))[0] if m else None  # the top-level field: "messages[0].role" -> "messages"


def bad_request(exc: Exception) -> APIError:
    message = str(exc)
    return APIError(message, 400, param_of(message))


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, HTTPStatus(status).phrase.replace(" ", "")),
                      "param": param, "code": status}}


def error_response(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=status)


def api_error_response(exc: APIError) -> JSONResponse:
    return error_response(exc.message, exc.status, exc.param)


def engine_dead_message(exc: BaseException) -> str:
    if isinstance(exc, ServerStoppingError):
        return f"the server is shutting down and starts no new requests ({exc})"
    return f"the engine is dead and cannot serve requests: {exc}"


def engine_error_status(exc: BaseException) -> int:
    """503 for a request refused because the server is shutting down (retry elsewhere); 500 for a dead engine."""
    return 503 if isinstance(exc, ServerStoppingError) else 500


def sse_error(message: str, status: int) -> str:
    return f"data: {json.dumps(error_body(message, status))}\n\n"


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A readable message and the first offending field from pydantic's error list."""
    parts, param = [], None
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        if err.get("type") == "json_invalid":
            return f"malformed JSON in the request body: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        field = ".".join(loc)
        if not loc and err.get("type") == "value_error" and "error" in err.get("ctx", {}):
            message = str(err["ctx"]["error"])  # a model validator's ValueError, which names its field itself
            return message, param_of(message)
        if param is None and loc:
            param = loc[0]
        parts.append(f"{field}: {err.get('msg')}" if field else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts), param
