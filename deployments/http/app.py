"""The FastAPI app of one ingress: routes, error handlers, and one gate middleware (API key, body
size) configured through ``app.state.gate``."""
from __future__ import annotations

import hmac
import os
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import SafeJSONResponse, error_body, install_handlers, short
from .schemas import ChatCompletionRequest, CompletionRequest


@dataclass(frozen=True)
class Gate:
    api_key: str | None          # None: no key required
    max_bytes: int


class BodyTooLarge(StarletteHTTPException):
    """Raised from the counted ``receive`` (FastAPI passes HTTPExceptions through its body parsing)."""

    def __init__(self, limit: int):
        super().__init__(413, f"The request body exceeds the limit of {limit} bytes; shorten the prompt.")


def _too_large(detail: str) -> SafeJSONResponse:
    return SafeJSONResponse(error_body(detail, param="prompt", code="request_too_large"), status_code=413)


class GateMiddleware:
    """Before any route: the API key (401) on /v1/*, compared in constant time; the body size (413),
    from Content-Length up front and by counting the bytes of every body as it is read, whatever its
    route or content type. Plain ASGI: Starlette's BaseHTTPMiddleware would relay every SSE chunk
    through an extra task."""

    def __init__(self, app_: Any):
        self.app = app_

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope["hs_http_in"] = time.time()   # the request's timeline starts here (before body parsing)
        gate: Gate = scope["app"].state.gate
        headers = Request(scope).headers
        if _route_path(scope).startswith("/v1/") and gate.api_key is not None:
            got = headers.get("authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(got, b"Bearer " + gate.api_key.encode()):
                await SafeJSONResponse(
                    error_body("Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                               code="invalid_api_key"), status_code=401,
                    headers={"www-authenticate": "Bearer"})(scope, receive, send)
                return
        cl = headers.get("content-length")
        if cl is not None:
            try:
                size = int(cl)
            except ValueError:
                await SafeJSONResponse(error_body(f"Invalid Content-Length header {short(cl)}."),
                                       status_code=400)(scope, receive, send)
                return
            if size > gate.max_bytes:
                await _too_large(f"Request body of {size} bytes exceeds the limit of {gate.max_bytes} "
                                 "bytes; shorten the prompt.")(scope, receive, send)
                return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > gate.max_bytes:
                    raise BodyTooLarge(gate.max_bytes)
            return msg

        await self.app(scope, counted, send)


def _route_path(scope: dict) -> str:
    """The path the routes match: without the mount prefix (``root_path``) when the server left it in."""
    path, root = scope["path"], scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


def build_http_app(ingress: Any) -> FastAPI:
    """The OpenAI routes of ``ingress`` (an OpenAIIngress); /docs and /openapi.json only when
    ``http_docs`` is set in the config."""
    cfg = ingress.cfg
    docs = cfg.http_docs
    app = FastAPI(title="hybridserve", description="OpenAI-compatible LLM serving on Ray Serve",
                  version="0.1.0", default_response_class=SafeJSONResponse,
                  docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
    app.state.gate = Gate(api_key=key or None, max_bytes=cfg.max_request_bytes)
    app.add_middleware(GateMiddleware)
    install_handlers(app)

    @app.exception_handler(BodyTooLarge)
    async def _on_too_large(_: Request, exc: BodyTooLarge) -> SafeJSONResponse:
        return _too_large(str(exc.detail))

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "model": ingress.model_name}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": ingress.model_name, "object": "model",
                                            "created": ingress.created, "owned_by": "hybridserve"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await ingress.respond(body, chat=False, http_in=request.scope.get("hs_http_in"), request=request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await ingress.respond(body, chat=True, http_in=request.scope.get("hs_http_in"), request=request)

    return app
