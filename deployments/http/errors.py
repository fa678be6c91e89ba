"""Errors in OpenAI's shape (``{"error": {message, type, param, code}}``) and the FastAPI handlers
that produce them: 400 for bad input (FastAPI's 422 included), a generic 500 with a request id
(the detail goes to the log only)."""
from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import EngineClosedError, EngineInputError, PromptTooLongError
from engine.request import CONTEXT_LENGTH_CODE

logger = logging.getLogger("ray.serve")

BACKPRESSURE = "backpressure"
REPLICA_GONE = "replica_failed"


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type_
        self.headers = headers or {}


def from_engine(e: EngineInputError, param: str | None = None) -> APIError:
    """An engine input error as the client's 400 (a prompt over the context: OpenAI's code)."""
    if isinstance(e, PromptTooLongError):
        return APIError(str(e), param=param or ("max_tokens" if "exceeds the context" in str(e) else "prompt"),
                        code=CONTEXT_LENGTH_CODE)
    return APIError(str(e), param=param)


class SafeJSONResponse(JSONResponse):
    """JSON that always encodes: ASCII escapes (a lone surrogate echoed in an error message cannot
    break UTF-8 encoding) and no bare NaN/Infinity."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, default=str,
                          separators=(",", ":")).encode("ascii")


def short(v: Any, limit: int = 80) -> str:
    """repr of a bad input value for an error message, cut (a 1 MB prompt is not echoed back)."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + f"... ({len(r)} chars)"


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def ray_failure(e: BaseException) -> str | None:
    """Classify a failed model-deployment call: back-pressure, a replica that died or became
    unreachable (retryable when nothing was streamed yet), or None (anything else)."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    cause = e.cause if isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None else e
    if isinstance(cause, BackPressureError) or isinstance(e, BackPressureError):
        return BACKPRESSURE
    if isinstance(cause, (RayActorError, DeploymentUnavailableError, EngineClosedError)) or isinstance(
            e, (RayActorError, EngineClosedError)):   # a replica shutting down drops its queue: retry
        return REPLICA_GONE
    return None


def internal_error(exc: BaseException, where: str) -> tuple[dict, str]:
    """A bug, not bad input: a generic body with a request id; the detail goes to the log under it."""
    rid = "err-" + uuid.uuid4().hex[:16]
    logger.error("internal error %s in %s", rid, where, exc_info=exc)
    return error_body(f"The server had an error while processing your request (request id {rid}); "
                      "retry it, and if it persists report that id.", "server_error", code="internal_error"), rid


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "TextPart"}
_UNION_HINTS = {
    "prompt": "expected a string or an array of token ids (integers)",
    "stop": "expected a string or an array of strings",
    "content": "expected a string or an array of {\"type\": \"text\", \"text\": ...} parts",
}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One readable message (naming the field and the fix) for pydantic/FastAPI errors."""
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [p for p in e.get("loc", ()) if p != "body"]
    # drop union-branch tags (e.g. 'str', 'list[int]') pydantic appends to the location
    field_path = [p for p in loc if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_TAGS)]
    param = ".".join(str(p) for p in field_path) or None
    typ = e.get("type", "")
    if typ == "json_invalid":
        return ("We could not parse the JSON body of your request: "
                f"{e.get('ctx', {}).get('error', e.get('msg'))}. Send a JSON object with "
                "Content-Type: application/json."), None
    if typ == "extra_forbidden":
        return (f"Unrecognized request argument supplied: {short(param)}. Remove it (see the OpenAI "
                "API reference for the supported arguments)."), param
    if typ == "missing":
        if not param:
            return ("The request body is missing: send a JSON object (with 'prompt' or 'messages') "
                    "and Content-Type: application/json."), None
        return f"Missing required parameter: '{param}'.", param
    if not param and typ in ("model_type", "dict_type", "model_attributes_type"):
        return "The request body must be a JSON object (Content-Type: application/json).", None
    same = [x for x in errors if [p for p in x.get("loc", ()) if p != "body"][:len(field_path)] == field_path]
    # a list over its bound: the message of the union branch its first item's type picks
    longs = [x for x in same if x.get("type") == "too_long"]
    inp = longs[0].get("input") if longs else None
    kind = f"list[{type(inp[0]).__name__}" if isinstance(inp, list) and inp else None
    too_long = next((x for x in longs if kind and any(str(p).startswith(kind) for p in x["loc"])),
                    longs[0] if longs else None)
    if too_long is not None:
        return f"Invalid value for '{param}': {too_long.get('msg')}.", param
    last = str(field_path[-1]) if field_path else ""
    if len(same) > 1 and last in _UNION_HINTS:
        return f"Invalid type for '{param}': {_UNION_HINTS[last]} (got {short(e.get('input'))}).", param
    return f"Invalid value for '{param}': {e.get('msg')} (got {short(e.get('input'))}).", param


def install_handlers(app: FastAPI) -> None:
    """The app's error handlers: every error body in OpenAI's shape."""

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = validation_message(list(exc.errors()))
        return SafeJSONResponse(error_body(msg, param=param), status_code=400)

    @app.exception_handler(APIError)
    async def _on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return api_error_response(exc)

    @app.exception_handler(EngineInputError)
    async def _on_engine_input(_: Request, exc: EngineInputError) -> JSONResponse:
        return api_error_response(from_engine(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        detail = str(exc.detail)
        if detail == "There was an error parsing the body":   # FastAPI: e.g. a body that is not UTF-8
            detail = ("We could not parse the body of your request: it must be UTF-8 encoded JSON "
                      "(Content-Type: application/json).")
        return SafeJSONResponse(error_body(detail, type_), status_code=exc.status_code,
                                headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        body, _ = internal_error(exc, f"{request.method} {request.url.path}")
        return SafeJSONResponse(body, status_code=500)


def api_error_response(exc: APIError) -> SafeJSONResponse:
    return SafeJSONResponse(error_body(exc.message, exc.type, exc.param, exc.code),
                            status_code=exc.status, headers=exc.headers)
