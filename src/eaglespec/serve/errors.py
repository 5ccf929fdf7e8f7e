"""Errors as OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class ApiError(Exception):
    """An error the client gets as OpenAI's error object with this HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error",
             504: "timeout_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = self.TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers={**self.headers, **(headers or {})})


def timeout_error(timeout_s: float) -> ApiError:
    return ApiError(504, f"the request took longer than the server's --request-timeout ({timeout_s:g} s)",
                    code="timeout")


#: what pydantic puts in an error's location to name the union member it tried
UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def validation_error(exc: RequestValidationError) -> ApiError:
    """The first pydantic error as a 400 naming its field, e.g. `messages.0.role`."""
    errors = exc.errors()
    if not errors:
        return ApiError(400, "invalid request")
    e = errors[0]
    kind = e.get("type", "")
    loc = []
    for part in e.get("loc", ())[1:]:  # after "body"
        if isinstance(part, str) and (part in UNION_TAGS or not part.isidentifier()):
            break  # ("stop", "list[str]", 0) is the field stop
        loc.append(str(part))
    param = ".".join(loc) or None
    if kind == "json_invalid":
        return ApiError(400, f"malformed JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", code="invalid_json")
    if kind == "missing" and not loc:
        return ApiError(400, "the request needs a JSON body")
    if not loc and kind.endswith("_type"):
        return ApiError(400, "the request body must be a JSON object")
    return ApiError(400, f"{param}: {e.get('msg', 'invalid value')}", param=param)
