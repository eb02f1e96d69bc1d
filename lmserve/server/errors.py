"""Every error leaves the server in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmserve.sampling_params import SamplingParamsError
from lmserve.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "invalid_request_error", 405: "invalid_request_error", 408: "invalid_request_error",
    409: "invalid_request_error", 413: "invalid_request_error",
    429: "rate_limit_error", 503: "service_unavailable_error",
}


class APIError(Exception):
    """Raised anywhere in the serving layer; turned into an OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def not_supported(param: str, what: str | None = None) -> APIError:
    return APIError(400, f"{what or param} is not supported yet", param=param, code="not_supported")


def _printable(text: str | None) -> str | None:
    # NOTE: messages may quote client text; a lone surrogate in it would make the error itself unencodable
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(text, str) else text


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    message, param = _printable(message), _printable(param)
    err = ErrorInfo(message=message, type=_TYPES.get(status, "server_error" if status >= 500 else "api_error"),
                    param=param, code=code if code is not None else HTTPStatus(status).phrase.lower().replace(" ", "_"))
    return ErrorResponse(error=err).model_dump(exclude_none=True)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _loc_to_param(loc: tuple) -> str | None:
    # ("body", "messages", 0, "content") -> "messages[0].content"; the leading "body"/"query" is dropped
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not out:
            out = str(p)
        elif "[" in str(p) or "|" in str(p) or str(p).startswith(("function-", "list[", "str", "int")):
            continue    # pydantic's union-branch tags, not field names
        else:
            out += f".{p}"
    return out or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(SamplingParamsError)
    async def _params_error(request: Request, exc: SamplingParamsError):
        return error_response(400, str(exc), exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {first.get('ctx', {}).get('error', 'invalid JSON')}",
                                  code="invalid_json")
        param = _loc_to_param(tuple(first.get("loc", ())))
        msgs = []
        for e in errors[:5]:
            where = _loc_to_param(tuple(e.get("loc", ()))) or "body"
            msgs.append(f"{where}: {e.get('msg')}")
        return error_response(400, "; ".join(msgs), param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}: {exc}")
