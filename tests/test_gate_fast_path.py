"""GateMiddleware's fast path for POST /v1/completions and /v1/chat/completions (deployments/ingress.py),
at the ASGI level: a valid body reaches the ingress's handler without FastAPI; everything else reaches
FastAPI with the body replayed intact. The full HTTP path through Ray Serve (both routes, streaming, every
error) is covered by tests/test_app.py, tests/test_colocated.py and tests/test_local_first.py."""
from __future__ import annotations

import asyncio
import json

import pytest
from starlette.responses import JSONResponse

from deployments import ingress as ing
from deployments.ingress import APIError, ChatCompletionRequest, CompletionRequest, GateMiddleware


class Handler:
    """Stands in for the ingress: records what _respond got; prompt "refuse" raises an APIError."""

    def __init__(self):
        self.calls = []

    async def _respond(self, req, chat, http_in=None, request=None):
        self.calls.append((req, chat, http_in, await request.body()))
        if getattr(req, "prompt", None) == "refuse":
            raise APIError("prompt 'refuse' is refused: send another one", param="prompt")
        return JSONResponse({"served": "fast"})


class FastAPIStandIn:
    """The app behind the middleware (FastAPI in the deployment): records the body it reads."""

    def __init__(self):
        self.bodies = []

    async def __call__(self, scope, receive, send):
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        self.bodies.append(body)
        await JSONResponse({"served": "fastapi"}, status_code=400)(scope, receive, send)


def _call(path: str, body: bytes | list[bytes], content_type: str | None = "application/json",
          method: str = "POST", disconnect_first: bool = False, root_path: str = "", max_bytes: int = 2**20):
    handler, inner = Handler(), FastAPIStandIn()
    ing._GATE.update(ingress=handler, api_key=None, max_bytes=max_bytes)
    parts = body if isinstance(body, list) else [body]
    msgs = [{"type": "http.disconnect"}] if disconnect_first else [
        {"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    headers = [(b"content-type", content_type.encode())] if content_type else []
    scope = {"type": "http", "method": method, "path": path, "headers": headers, "query_string": b"",
             "root_path": root_path}
    sent = []

    async def receive():
        if msgs:
            return msgs.pop(0)
        await asyncio.sleep(3600)   # no disconnect while the response is sent

    async def send(m):
        sent.append(m)

    try:
        asyncio.run(GateMiddleware(inner)(scope, receive, send))
    finally:
        ing._GATE.update(ingress=None, max_bytes=4 * 2**20)
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return handler, inner, status, (json.loads(payload) if payload else None)


def test_valid_completion_skips_fastapi_and_validates_like_it():
    body = json.dumps({"prompt": "hello", "max_tokens": 3, "stream": True}).encode()
    handler, inner, status, out = _call("/v1/completions", [body[:7], body[7:]])   # a body in two messages
    assert (status, out) == (200, {"served": "fast"}) and inner.bodies == []
    (req, chat, http_in, seen_body), = handler.calls
    assert isinstance(req, CompletionRequest) and not chat and isinstance(http_in, float)
    assert (req.prompt, req.max_tokens, req.stream) == ("hello", 3, True)
    assert seen_body == body        # the handler (a local-first forward) can still read the whole body


def test_valid_chat_goes_to_the_chat_handler():
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    handler, inner, status, _ = _call("/v1/chat/completions", body, content_type="application/json; charset=utf-8")
    (req, chat, _, _), = handler.calls
    assert status == 200 and chat and isinstance(req, ChatCompletionRequest) and inner.bodies == []


@pytest.mark.parametrize("body", [
    b'{"prompt": "x", "max_tokens": 0}',        # fails the model (ge=1)
    b'{"prompt": "x", "unknown_field": 1}',     # extra="forbid"
    b'{"prompt": "x", "max_tokens": "3"}',      # strict: no str -> int coercion, as in FastAPI
    b'{"prompt": "x"',                          # not JSON
    b'\xff\xfe{}',                              # not UTF-8
    b'{"prompt": ' + b'[' * 20_000 + b']' * 20_000 + b'}',     # json.loads: RecursionError
])
def test_anything_invalid_reaches_fastapi_with_the_body_intact(body):
    handler, inner, status, out = _call("/v1/completions", body)
    assert handler.calls == [] and inner.bodies == [body] and out == {"served": "fastapi"}


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_a_non_json_content_type_is_left_to_fastapi(content_type):
    handler, inner, _, _ = _call("/v1/completions", b'{"prompt": "x"}', content_type=content_type)
    assert handler.calls == [] and inner.bodies == [b'{"prompt": "x"}']


def test_no_content_type_is_json_as_in_fastapi():
    handler, inner, status, _ = _call("/v1/completions", b'{"prompt": "x"}', content_type=None)
    assert status == 200 and len(handler.calls) == 1 and inner.bodies == []


def test_other_routes_and_methods_reach_fastapi():
    for path, method in (("/v1/models", "GET"), ("/v1/completions", "GET"), ("/v1/embeddings", "POST")):
        handler, inner, _, _ = _call(path, b'{"prompt": "x"}', method=method)
        assert handler.calls == [] and len(inner.bodies) == 1, (path, method)


def test_api_error_is_answered_like_fastapi_does():
    handler, inner, status, out = _call("/v1/completions", b'{"prompt": "refuse"}')
    assert status == 400 and inner.bodies == []
    assert out["error"]["message"] == "prompt 'refuse' is refused: send another one"
    assert out["error"]["param"] == "prompt" and out["error"]["type"] == "invalid_request_error"


def test_a_chunked_body_over_the_limit_is_413():
    # no content-length header: the size is only known while the body arrives
    handler, inner, status, out = _call("/v1/completions", [b"x" * 600, b"x" * 600], max_bytes=1000)
    assert status == 413 and handler.calls == [] and inner.bodies == []
    assert "exceeds the limit of 1000 bytes" in out["error"]["message"]


def test_a_client_gone_before_its_body_gets_nothing():
    handler, inner, status, out = _call("/v1/completions", b"", disconnect_first=True)
    assert status is None and out is None and handler.calls == [] and inner.bodies == []


def test_a_route_prefix_in_the_path_is_matched_without_it():
    # a Serve route_prefix: the server may leave the mount prefix (root_path) in path, as Starlette allows
    handler, inner, status, _ = _call("/llm/v1/completions", b'{"prompt": "x"}', root_path="/llm")
    assert status == 200 and len(handler.calls) == 1 and inner.bodies == []
