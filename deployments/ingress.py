"""OpenAI-compatible ingress (FastAPI on Ray Serve) + the Python handle entry point.

HTTP:  POST /v1/completions, POST /v1/chat/completions (``stream: true`` -> SSE), GET /v1/models,
       GET /healthz. Errors: ``{"error": {"message", "type", "param", "code"}}``; 400 for invalid
       requests (FastAPI's 422 included) and engine input errors.
Python (``serve.get_app_handle("hybridserve")``):
       ``handle.remote("prompt")`` / ``handle.remote({"prompt": ..., "max_tokens": 8})`` /
       ``handle.remote({"messages": [...]})`` -> ``{"text", "finish_reason", "usage", "hybridserve"}``
       ``handle.options(stream=True).remote("prompt", stream=True)`` (or a body with
       ``"stream": True``) -> chunks ``{"text", "index"}`` then ``{"text": "", "finish_reason", "usage", ...}``
       Invalid input raises ``engine.EngineInputError`` (Ray re-raises it in the caller).

The ingress tokenizes (tokenizer only, no weights) to count the prompt's tokens and passes the count
as ``n_tokens=`` to the model deployment, where the warm-bucket router reads it; the replica gets the
token ids, so a prompt is tokenized once per request.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from dataclasses import replace
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.api import MAX_LOGPROBS, SamplingParams
from engine.errors import EngineClosedError, EngineInputError

from .config import AppConfig
from .router import TOKENS_KWARG
from .tokenize import load_tokenizer, prompt_ids

logger = logging.getLogger("ray.serve")


# --------------------------------------------------------------------------- request models
MAX_CHOICES = 16           # n / best_of: each choice is one engine call, run in parallel
MAX_CALLS = 64             # engine calls one request may fan out to (batched prompts x choices)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="extension: 0 = off")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices, generated in parallel (one engine call each)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    ignore_eos: bool = Field(False, description="extension: keep generating past EOS")


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="logprob of each token and of the N likeliest alternatives")
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES,
                                description="generate this many, return the n with the highest total logprob")
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text"]


def chat_prompt_ids(tok: Any, messages: list[ChatMessage]) -> list[int]:
    """The chat prompt's token ids (the tokenizer's chat template over each message's text)."""
    return tok.chat_prompt([{"role": m.role, "content": m.content if isinstance(m.content, str)
                             else "".join(p.text for p in m.content)} for m in messages])


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type_
        self.headers = headers or {}


class SSEResponse(StreamingResponse):
    """Starlette's StreamingResponse without its anyio task group per response. Below ASGI spec 2.4
    (uvicorn, hence Ray's replica HTTP server, says 2.3) Starlette streams the body from a second task
    beside a disconnect listener, which costs ~35 us before the first byte on a 2-core CPU host
    (bench/asgi_first.py). Here the body is sent from the request's own task; a plain asyncio task waits
    for http.disconnect and cancels it, so a client that goes away still stops the stream (and with it
    the engine request) at once. A cancellation from anyone else (Ray's own disconnect handling, a
    shut-down) propagates as usual."""

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        gone = False

        async def watch() -> None:
            nonlocal gone
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            except Exception:       # no disconnect to wait for (the server's receive failed): stream on
                return
            gone = True
            task.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not gone or task.cancelling() > 1:
                raise
            task.uncancel()         # only our own cancel: the client left, the response ends here
        finally:
            watcher.cancel()
        if self.background is not None:
            await self.background()


class SafeJSONResponse(JSONResponse):
    """JSON that always encodes: ASCII escapes (a lone surrogate from the request echoed in an error
    message cannot break UTF-8 encoding) and no bare NaN/Infinity."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, default=str,
                          separators=(",", ":")).encode("ascii")


def _short(v: Any, limit: int = 80) -> str:
    """repr of a bad input value for an error message, cut (a 1 MB prompt is not echoed back)."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + f"... ({len(r)} chars)"


_BACKPRESSURE = "backpressure"
_REPLICA_GONE = "replica_failed"


def _ray_failure(e: BaseException) -> str | None:
    """Classify an exception of a model-deployment call: back-pressure, a replica that died or
    became unreachable (retryable when nothing was streamed yet), or None (anything else)."""
    cause = e.cause if isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None else e
    if isinstance(cause, BackPressureError) or isinstance(e, BackPressureError):
        return _BACKPRESSURE
    if isinstance(cause, (RayActorError, DeploymentUnavailableError, EngineClosedError)) or isinstance(
            e, (RayActorError, EngineClosedError)):   # a replica shutting down drops its queue: retry
        return _REPLICA_GONE
    return None


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


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
    field_path = [p for p in loc if isinstance(p, int)
                  or (p.isidentifier() and p not in _TYPE_TAGS)]
    param = ".".join(str(p) for p in field_path) or None
    typ = e.get("type", "")
    if typ == "json_invalid":
        return ("We could not parse the JSON body of your request: "
                f"{e.get('ctx', {}).get('error', e.get('msg'))}. Send a JSON object with "
                "Content-Type: application/json."), None
    if typ == "extra_forbidden":
        return (f"Unrecognized request argument supplied: {_short(param)}. Remove it (see the OpenAI "
                "API reference for the supported arguments)."), param
    if typ == "missing":
        if not param:
            return ("The request body is missing: send a JSON object (with 'prompt' or 'messages') "
                    "and Content-Type: application/json."), None
        return f"Missing required parameter: '{param}'.", param
    if typ in ("model_type", "dict_type") and not param:
        return "The request body must be a JSON object.", None
    same = [x for x in errors if [p for p in x.get("loc", ()) if p != "body"][:len(field_path)] == field_path]
    last = str(field_path[-1]) if field_path else ""
    if len(same) > 1 and last in _UNION_HINTS:
        return f"Invalid type for '{param}': {_UNION_HINTS[last]} (got {_short(e.get('input'))}).", param
    return f"Invalid value for '{param}': {e.get('msg')} (got {_short(e.get('input'))}).", param


def _unsupported(req: _Common) -> None:
    """Reject OpenAI arguments the engine cannot honour, with the fix in the message."""
    checks: list[tuple[bool, str, str]] = []
    if isinstance(req, CompletionRequest):
        checks += [
            (req.echo and req.stream, "echo", "echo cannot be streamed; send stream: false"),
            (req.best_of is not None and req.best_of < req.n, "best_of",
             f"best_of ({req.best_of}) must be >= n ({req.n})"),
            (req.stream and (req.best_of or 1) > req.n, "best_of",
             "best_of > n cannot be streamed (the best choices are known only at the end); send stream: false"),
            (req.suffix is not None, "suffix", "suffix is not supported; omit it"),
        ]
    else:
        checks += [
            (req.top_logprobs is not None and not req.logprobs, "top_logprobs",
             "top_logprobs needs logprobs: true; send both, or omit top_logprobs"),
        ]
    for bad, param, msg in checks:
        if bad:
            raise APIError(msg, param=param, code="unsupported_parameter")


# --------------------------------------------------------------------------- the app
app = FastAPI(title="hybridserve", description="OpenAI-compatible LLM serving on Ray Serve",
              version="0.1.0", default_response_class=SafeJSONResponse)

# Set by the ingress replica's constructor (one ingress per replica process): what the
# middleware below checks before FastAPI parses a body.
_GATE: dict[str, Any] = {"api_key": None, "max_bytes": 4 * 2**20, "ingress": None}


# POST path -> (body model, chat): the routes GateMiddleware serves without FastAPI's per-request machinery
_FAST_ROUTES: dict[str, tuple[type[_Common], bool]] = {
    "/v1/completions": (CompletionRequest, False), "/v1/chat/completions": (ChatCompletionRequest, True)}


class GateMiddleware:
    """Before the body is read: API key (401) on /v1/*, and body size (413). Then the fast path of a
    well-formed ``POST /v1/completions`` or ``/v1/chat/completions`` (:meth:`_fast`).

    Plain ASGI, not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware relays every
    response message (each SSE chunk) through an extra task and memory stream, which the H100
    HTTP-overhead run put at a measurable share of the per-request cost."""

    def __init__(self, app_: Any):
        self.app = app_

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        scope["hs_http_in"] = time.time()   # the request's timeline starts here (before body parsing)
        path = _route_path(scope) if scope["type"] == "http" else ""
        if path.startswith("/v1/"):
            request = Request(scope)
            refusal = self._refusal(request)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
            route = _FAST_ROUTES.get(path) if scope["method"] == "POST" else None
            ingress = _GATE["ingress"]
            if route is not None and ingress is not None and _json_body(request.headers.get("content-type")):
                await self._fast(ingress, *route, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _fast(self, ingress: "OpenAIIngress", model: type[_Common], chat: bool, scope: dict, receive: Any,
                    send: Any) -> None:
        """The two generation routes without FastAPI's per-request machinery (route matching, dependency
        solving, the class-based view): read the body, validate it exactly as FastAPI would (``json.loads``,
        then the pydantic model in Python mode), call the same handler (``_respond``). Anything that does
        not validate goes to FastAPI with the body replayed, so every error is FastAPI's own 400; an
        :class:`APIError` is answered by the same handler as on FastAPI's path; anything else reaches
        ServerErrorMiddleware (500) as it would from FastAPI. Measured on the hop "ASGI app -> handler" (p50):
        -0.2 ms on the 2-core CI CPU, -0.02 ms on an H100 host (docs/fleet.md, session 15)."""
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return                      # the client left before its body arrived: nothing to answer
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > _GATE["max_bytes"]:   # a chunked body has no content-length to check up front
                await _too_large(size)(scope, receive, send)
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> dict:         # the body once more (FastAPI's fallback, a local-first forward)
            return pending.pop() if pending else await receive()

        request = Request(scope, replay)
        try:
            req = model.model_validate(json.loads(body))
        except (ValueError, RecursionError):   # not JSON, not UTF-8, nested too deep, or invalid (ValidationError
            await self.app(scope, replay, send)   # is a ValueError): FastAPI answers it
            return
        try:
            response = await ingress._respond(req, chat=chat, http_in=scope["hs_http_in"], request=request)
        except APIError as e:
            response = await _on_api_error(request, e)
        await response(scope, receive, send)

    @staticmethod
    def _refusal(request: Request) -> SafeJSONResponse | None:
        key = _GATE["api_key"]
        if key is not None and request.headers.get("authorization", "") != f"Bearer {key}":
            return SafeJSONResponse(
                error_body("Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key"), status_code=401,
                headers={"www-authenticate": "Bearer"})
        cl = request.headers.get("content-length")
        if cl is not None:
            try:
                size = int(cl)
            except ValueError:
                return SafeJSONResponse(error_body(f"Invalid Content-Length header {_short(cl)}."),
                                        status_code=400)
            if size > _GATE["max_bytes"]:
                return _too_large(size)
        return None


def _too_large(size: int) -> SafeJSONResponse:
    return SafeJSONResponse(error_body(
        f"Request body of {size} bytes exceeds the limit of {_GATE['max_bytes']} bytes; "
        "shorten the prompt.", param="prompt", code="request_too_large"), status_code=413)


def _route_path(scope: dict) -> str:
    """The path the app's routes match: without the mount prefix (``root_path``, a Serve ``route_prefix``) when
    the server left it in ``path``, as Starlette's router does."""
    path, root = scope["path"], scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


def _json_body(content_type: str | None) -> bool:
    """Whether FastAPI would parse a body of this content type as JSON (no header, application/json, or
    application/*+json); any other goes to FastAPI, which answers it."""
    if not content_type:
        return True
    kind = content_type.partition(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


app.add_middleware(GateMiddleware)


@app.exception_handler(RequestValidationError)
async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    msg, param = validation_message(list(exc.errors()))
    return SafeJSONResponse(error_body(msg, param=param), status_code=400)


@app.exception_handler(APIError)
async def _on_api_error(_: Request, exc: APIError) -> JSONResponse:
    return SafeJSONResponse(error_body(exc.message, exc.type, exc.param, exc.code),
                            status_code=exc.status, headers=exc.headers)


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
async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
    """A bug, not bad input: 500 naming the exception (a replica's own error, not Ray's wrapper) so
    the report is actionable; the full (remote) traceback goes to the log."""
    logger.exception("unexpected ingress error")
    cause = exc.cause if isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None else exc
    first = (str(cause).strip().splitlines() or [""])[-1][:200]
    return SafeJSONResponse(error_body(f"internal error: {type(cause).__name__}: {first}", "server_error"),
                            status_code=500)


def _logprobs_k(req: _Common) -> int | None:
    """Alternatives per token the engine computes (None: no logprobs)."""
    if isinstance(req, ChatCompletionRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return getattr(req, "logprobs", None)


def format_logprobs(items: list[dict], chat: bool, offset: int = 0) -> dict:
    """The engine's per-token logprobs (dicts of engine.TokenLogprobs) in OpenAI's shape: chat
    ``{"content": [{token, logprob, bytes, top_logprobs}]}``; completions ``{tokens, token_logprobs,
    top_logprobs, text_offset}`` whose top_logprobs holds the chosen token too (up to N + 1 entries).
    offset: characters of the completion before these tokens (a stream's earlier chunks)."""
    if chat:
        def one(x: dict) -> dict:
            return {"token": x["token"], "logprob": x["logprob"], "bytes": x["bytes"]}
        return {"content": [{**one(it["chosen"]), "top_logprobs": [one(a) for a in it["top"]]} for it in items],
                "refusal": None}
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for it in items:
        c = it["chosen"]
        out["tokens"].append(c["token"])
        out["token_logprobs"].append(c["logprob"])
        top: dict[str, float] | None = None
        if c["logprob"] is not None:            # None: an echoed prompt's first token
            top = {}
            for a in [*it["top"], c]:           # tokens of the same text: the likeliest one's value
                top.setdefault(a["token"], a["logprob"])
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(c["token"])
    return out


def _chunk_logprobs(item: dict, chat: bool, offset: int) -> tuple[dict | None, int]:
    """A stream item's logprobs in OpenAI's shape (None without) and the completion's character
    offset after its token."""
    if "logprobs" not in item:
        return None, offset
    return format_logprobs([item["logprobs"]], chat, offset), offset + len(item["logprobs"]["chosen"]["token"])


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


_ASGI_TYPES = {"http", "websocket", "lifespan"}


class OpenAIIngress:
    def __init__(self, model: DeploymentHandle, app_config: dict | AppConfig):
        self.cfg = app_config if isinstance(app_config, AppConfig) else AppConfig.model_validate(app_config)
        if self.cfg.handle_transport == "grpc" and isinstance(model, DeploymentHandle):
            model = model.options(_by_reference=False)      # Serve's replica-to-replica gRPC transport
        self.model = model
        # handles bound once: per-request .options()/attribute lookups build new handle objects
        self._generate_h = model.generate
        self._stream_h = model.options(stream=True).stream
        self.model_name = self.cfg.model_name
        self.tok = load_tokenizer(self.cfg.engine)
        self.created = int(time.time())
        key = os.environ.get(self.cfg.api_key_env, "") if self.cfg.api_key_env else ""
        self.api_key = key or None
        # one ingress per replica process (as Serve's class-based view assumes): the middleware's fast path
        _GATE.update(api_key=self.api_key, max_bytes=self.cfg.max_request_bytes, ingress=self)
        self._retry_after = {"retry-after": str(max(0, int(-(-self.cfg.retry_after_s // 1))))}
        self.max_context = self.cfg.engine.max_context

    # ------------------------------------------------------------------ helpers
    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if got != f"Bearer {self.api_key}":
            raise APIError("Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           status=401, code="invalid_api_key")

    def _check_model(self, req: _Common) -> None:
        if req.model is not None and req.model != self.model_name:
            raise APIError(f"The model '{req.model}' does not exist; this server serves "
                           f"'{self.model_name}' (GET /v1/models).", status=404, param="model",
                           code="model_not_found")

    def _params(self, req: _Common) -> SamplingParams:
        max_tokens = req.max_tokens
        if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
            max_tokens = req.max_completion_tokens
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        p = SamplingParams(
            max_tokens=max_tokens or self.cfg.default_max_tokens,
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            top_k=req.top_k or 0, seed=req.seed, stop=stop, ignore_eos=req.ignore_eos,
            logprobs=_logprobs_k(req), presence_penalty=req.presence_penalty,
            prompt_logprobs=req.logprobs if isinstance(req, CompletionRequest) and req.echo else None,
            frequency_penalty=req.frequency_penalty, logit_bias=self._logit_bias(req.logit_bias))
        try:
            p.validate()
        except EngineInputError as e:
            raise APIError(str(e)) from None
        return p

    def _logit_bias(self, raw: dict[str, float] | None) -> dict[int, float]:
        out: dict[int, float] = {}
        V = getattr(self.tok, "vocab_size", None)
        for k, v in (raw or {}).items():
            try:
                t = int(k)
            except ValueError:
                raise APIError(f"logit_bias keys are token ids written as strings, like \"50256\"; got "
                               f"{_short(k)}", param="logit_bias") from None
            if t < 0 or (V is not None and t >= V):
                raise APIError(f"logit_bias token id {t} is out of range [0, {V}).", param="logit_bias")
            if not -100 <= v <= 100:
                raise APIError(f"logit_bias values must be in [-100, 100]; token {t} has {v}.",
                               param="logit_bias")
            out[t] = v
        return out

    @staticmethod
    def _is_batch(req: CompletionRequest) -> bool:
        """A batch of prompts: a list of strings or of token-id lists (one token-id list is one prompt)."""
        return isinstance(req.prompt, list) and bool(req.prompt) and not isinstance(req.prompt[0], int)

    @classmethod
    def _prompts_as_sent(cls, req: _Common) -> list[Any]:
        """A completions request's prompts as the client sent them: one, or a batch; [] for chat."""
        if not isinstance(req, CompletionRequest):
            return []
        return list(req.prompt) if cls._is_batch(req) else [req.prompt]

    def _completion_prompts(self, req: CompletionRequest) -> list[str | list[int]]:
        """The request's prompts (``_prompts_as_sent``), each checked: not empty, token ids in range."""
        batch = self._is_batch(req)
        prompts = self._prompts_as_sent(req)
        for i, prompt in enumerate(prompts):
            where = f"prompt[{i}]" if batch else "prompt"
            if prompt == "" or prompt == []:
                raise APIError(f"{where} is empty: send at least one character or token id.", param="prompt")
            if isinstance(prompt, list):
                V = getattr(self.tok, "vocab_size", None)
                bad = next((t for t in prompt if t < 0 or (V is not None and t >= V)), None)
                if bad is not None:
                    raise APIError(f"{where} token id {_short(bad)} is out of range [0, {V}).", param="prompt")
        return prompts

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        return chat_prompt_ids(self.tok, req.messages)

    def _prepare(self, req: _Common) -> list[tuple[dict, int]]:
        """One (engine payload, prompt token count) per prompt (a completions batch has several)."""
        self._check_model(req)
        _unsupported(req)
        params = self._params(req)
        try:
            prompts = self._completion_prompts(req) if isinstance(req, CompletionRequest) else [self._chat_prompt(req)]
            # tokenized here, once: the replica gets the ids (the router needs the count anyway)
            ids = [prompt_ids(self.tok, prompt) for prompt in prompts]
        except UnicodeError as e:   # e.g. a lone surrogate ("\ud800") in a JSON string
            raise APIError(f"the prompt is not valid Unicode text ({getattr(e, 'reason', e)}); "
                           "send UTF-8 text without lone surrogates", param="messages" if isinstance(req, ChatCompletionRequest)
                           else "prompt") from None
        calls = len(prompts) * max(req.n, getattr(req, "best_of", None) or 1)
        if calls > MAX_CALLS:
            raise APIError(f"{len(prompts)} prompt(s) x {calls // len(prompts)} choice(s) = {calls} generations; "
                           f"at most {MAX_CALLS} per request: split the batch", param="prompt")
        # the context check here too: a too-long request never takes a replica's queue slot
        for n in map(len, ids):
            if n >= self.max_context:
                raise APIError(f"prompt has {n} tokens but the context holds {self.max_context} "
                               "(prompt + max_tokens); shorten the prompt", param="prompt",
                               code="PromptTooLongError")
            if n + params.max_tokens > self.max_context:
                raise APIError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                               f"of {self.max_context} tokens; lower max_tokens to at most "
                               f"{self.max_context - n}", param="max_tokens", code="PromptTooLongError")
        fields = vars(params)       # a flat dataclass: a dict of its fields, no deep copy (asdict: ~10 us)
        return [({"prompt": p, "params": dict(fields)}, len(p)) for p in ids]

    def _overloaded(self, e: BaseException) -> APIError:
        return APIError("The server is overloaded: every model replica is busy and the request "
                        f"queue is full ({e}). Retry after the Retry-After delay.", status=503,
                        type_="server_error", code="overloaded", headers=self._retry_after)

    def _replica_failed(self, e: BaseException, retried: bool) -> APIError:
        logger.warning("model replica failed during a request%s: %s",
                       " (after one retry)" if retried else "", type(e).__name__)
        return APIError("The model replica serving this request failed"
                        + (" (and so did the retry)" if retried else "")
                        + "; nothing was lost on the server, retry the request.", status=503,
                        type_="server_error", code=_REPLICA_GONE, headers=self._retry_after)

    def _retry(self, e: BaseException, attempt: int) -> bool:
        """A failed model-deployment call: back-pressure -> 503 at once; a dead replica -> True
        (retry) on the first attempt, 503 after; anything else False (the caller re-raises)."""
        kind = _ray_failure(e)
        if kind == _BACKPRESSURE:
            raise self._overloaded(e) from None
        if kind == _REPLICA_GONE:
            if attempt == 0:
                return True
            raise self._replica_failed(e, True) from None
        return False

    async def _generate(self, payload: dict, n: int) -> dict:
        """One call to the model deployment. Back-pressure -> 503 + Retry-After at once; a replica
        that dies under the request -> retried once on another (nothing was sent yet), then 503."""
        for attempt in (0, 1):
            try:
                out = await self._generate_h.remote(payload, **{TOKENS_KWARG: n})
                break
            except Exception as e:
                if self._retry(e, attempt):
                    continue
                raise
        if "error" in out:
            raise APIError(out["error"]["message"], code=out["error"].get("code"))
        return out

    async def _start_stream(self, payload: dict, n: int):
        """Start a stream and wait for its first item (before any byte goes to the client): a
        replica failure up to here is retried once, like a non-streaming request."""
        for attempt in (0, 1):
            gen = None
            try:
                gen = self._stream_h.remote(payload, **{TOKENS_KWARG: n})
                first = await gen.__anext__()
                break
            except StopAsyncIteration:
                raise APIError("the model produced no output", status=500, type_="server_error") from None
            except Exception as e:
                if gen is not None:
                    try:   # cancel() re-raises the call's error (e.g. BackPressureError): ignore it
                        gen.cancel()
                    except Exception:
                        pass
                if self._retry(e, attempt):
                    continue
                raise
        if "error" in first:
            gen.cancel()
            raise APIError(first["error"]["message"], code=first["error"].get("code"))
        return first, gen

    @staticmethod
    def _headers(meta: dict | None) -> dict:
        if not meta:
            return {}
        return {"x-hybridserve-replica": str(meta.get("replica")), "x-hybridserve-bucket": str(meta.get("bucket")),
                "x-hybridserve-warm": "1" if meta.get("warm") else "0"}

    # ------------------------------------------------------------------ HTTP routes
    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.model_name}

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._auth(request)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                            "created": self.created, "owned_by": "hybridserve"}]}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self._auth(request)
        return await self._respond(body, chat=False, http_in=request.scope.get("hs_http_in"), request=request)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._auth(request)
        return await self._respond(body, chat=True, http_in=request.scope.get("hs_http_in"), request=request)

    def _text_and_logprobs(self, req: _Common, prompt: Any, out: dict) -> tuple[str, dict | None]:
        """A finished choice's text and OpenAI logprobs; with echo (completions) the prompt (as the client
        sent it) comes first, its tokens scored too (the first one has null logprob)."""
        chat = isinstance(req, ChatCompletionRequest)
        text = out["text"]
        items = out.get("logprobs")
        if not chat and req.echo:
            text = (prompt if isinstance(prompt, str) else self.tok.decode(prompt)) + text
            if items is not None:
                items = out["prompt_logprobs"] + items
        return text, (format_logprobs(items, chat) if items is not None else None)

    @staticmethod
    def _choice_payloads(payload: dict, count: int, logprobs_for_rank: bool) -> list[dict]:
        """One engine payload per choice: seeded requests get seed, seed+1, ... (so choices differ
        and stay reproducible); best_of ranking needs each token's logprob."""
        out = []
        for i in range(count):
            params = dict(payload["params"])
            if params.get("seed") is not None and i:
                params["seed"] = (params["seed"] + i + 2**63) % 2**64 - 2**63
            if logprobs_for_rank and params.get("logprobs") is None:
                params["logprobs"] = 0
            out.append({**payload, "params": params})
        return out

    @staticmethod
    async def _own_request_id(coro):
        """Run coro (one choice's model call) under its own Serve internal request id. Ray Serve's
        request router indexes pending requests by that id (ray 2.60:
        request_router.py `_pending_requests_by_id`), and child calls inherit their parent's: two
        concurrent calls of one HTTP request would share it and one would never be routed. This
        runs as its own task, so the change stays in that task's context."""
        from ray.serve import context as serve_ctx
        from ray.serve._private.utils import generate_request_id

        ctx = serve_ctx._get_serve_request_context()
        serve_ctx._serve_request_context.set(replace(ctx, _internal_request_id=generate_request_id()))
        return await coro

    @classmethod
    async def _all(cls, coros: list, undo=None) -> list:
        """Run the choices' calls concurrently, each under its own request id; the first failure
        cancels the rest (undo(result) for those already done) and is raised."""
        tasks = [asyncio.ensure_future(cls._own_request_id(c)) for c in coros]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
                if undo is not None and t.done() and not t.cancelled() and t.exception() is None:
                    undo(t.result())
            raise

    async def _elsewhere(self, req: _Common, prepared: list[tuple[dict, int]], request: Request | None):
        """A response from another replica for this validated HTTP request, or None to serve it here.
        Here: always (the colocated topology's local-first mode overrides it)."""
        return None

    async def _respond(self, req: _Common, chat: bool, http_in: float | None = None,
                       request: Request | None = None):
        prepared = self._prepare(req)
        if (forwarded := await self._elsewhere(req, prepared, request)) is not None:
            return forwarded
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        count = max(req.n, getattr(req, "best_of", None) or 1)
        ranked = count > req.n
        # one engine call per (prompt, choice); OpenAI's choice index: prompt * n + choice
        calls = [(k, p, n) for k, (payload, n) in enumerate(prepared)
                 for p in self._choice_payloads(payload, count, ranked)]
        if not req.stream:
            if len(calls) == 1:
                outs = [await self._generate(calls[0][1], calls[0][2])]
            else:
                outs = await self._all([self._generate(p, n) for _, p, n in calls])
            usage = {"prompt_tokens": sum(n for _, n in prepared),
                     "completion_tokens": sum(o["usage"]["completion_tokens"] for o in outs)}  # best_of's too
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            choices = []
            sent = self._prompts_as_sent(req)
            for k, (payload, _) in enumerate(prepared):
                mine = outs[k * count:(k + 1) * count]
                if ranked:   # best_of: the n choices with the highest total logprob, best first
                    mine = sorted(mine, key=lambda o: -sum(t["chosen"]["logprob"] for t in o["logprobs"]))[:req.n]
                    if payload["params"].get("logprobs") is None:
                        mine = [{key: v for key, v in o.items() if key != "logprobs"} for o in mine]
                for out in mine:
                    text, lp = self._text_and_logprobs(req, sent[k] if sent else None, out)
                    i, finish = len(choices), _finish(out["finish_reason"])
                    choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                    "logprobs": lp, "finish_reason": finish} if chat else
                                   {"text": text, "index": i, "logprobs": lp, "finish_reason": finish})
            body = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                    "created": created, "model": self.model_name, "choices": choices,
                    "usage": usage, "hybridserve": outs[0]["meta"]}
            if len(calls) > 1:
                body["hybridserve"] = {**outs[0]["meta"], "choices": [o["meta"] for o in outs]}
            return JSONResponse(body, headers=self._headers(outs[0]["meta"]))
        t_in = time.time()
        if len(calls) == 1:
            streams = [await self._start_stream(calls[0][1], calls[0][2])]
        else:
            streams = await self._all([self._start_stream(p, n) for _, p, n in calls],
                                      undo=lambda started: started[1].cancel())   # stop a stream begun
        first = streams[0][0]
        first["timeline"] = {"ingress_in": t_in, "ingress_first": time.time()}
        if http_in is not None:
            first["timeline"]["http_in"] = http_in
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return SSEResponse(self._sse(streams, [k for k, _, _ in calls], rid, created, chat, include_usage),
                                 media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", **self._headers(first.get("meta"))})

    async def _items(self, streams: list[tuple[dict, Any]]) -> AsyncIterator[tuple[int, Any]]:
        """(choice index, item) from every stream as items arrive, each stream up to its final or
        error item; a stream's exception (a replica died mid-stream) comes as the item."""
        async def one(i: int, first: dict, gen) -> AsyncIterator[tuple[int, Any]]:
            item = first
            while True:
                yield i, item
                if "finish_reason" in item or "error" in item:
                    return
                try:
                    item = await gen.__anext__()
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    yield i, e
                    return

        if len(streams) == 1:           # the common case: no queue, no extra task
            async for x in one(0, *streams[0]):
                yield x
            return
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, first: dict, gen) -> None:
            try:
                async for x in one(i, first, gen):
                    await q.put(x)
            finally:
                await q.put((i, None))
        tasks = [asyncio.ensure_future(pump(i, f, g)) for i, (f, g) in enumerate(streams)]
        try:
            left = len(tasks)
            while left:
                i, item = await q.get()
                if item is None:
                    left -= 1
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()

    async def _sse(self, streams: list[tuple[dict, Any]], prompt_of: list[int], rid: str, created: int,
                   chat: bool, include_usage: bool) -> AsyncIterator[bytes]:
        """SSE chunks of every stream (choice index = stream index), then one usage total (each
        prompt's tokens counted once), then [DONE]."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        base = {"id": rid, "object": obj, "created": created, "model": self.model_name}
        first = streams[0][0]
        metas = [f.get("meta") for f, _ in streams]
        role_sent = [False] * len(streams)
        offset = [0] * len(streams)                 # completion characters of the tokens sent so far
        usage: dict | None = None
        prompts_counted: set[int] = set()
        finished = 0
        try:
            async for i, item in self._items(streams):
                if isinstance(item, Exception):  # the replica died mid-stream: a clean error event, no hang
                    kind = _ray_failure(item)
                    if kind is None:
                        logger.error("stream failed", exc_info=item)
                    msg = (self._replica_failed(item, False).message if kind == _REPLICA_GONE
                           else f"the stream failed: {type(item).__name__}")
                    yield _sse(error_body(msg, "server_error", code=kind or "internal_error"))
                    break
                if "error" in item:
                    yield _sse(error_body(item["error"]["message"], code=item["error"].get("code")))
                    break
                done = "finish_reason" in item
                lp, offset[i] = _chunk_logprobs(item, chat, offset[i])
                if chat:
                    delta: dict = {"content": item["text"]} if (item["text"] or not done) else {}
                    if not role_sent[i]:  # the first chunk carries the role (and the first token)
                        delta = {"role": "assistant", "content": item["text"]}
                        role_sent[i] = True
                    choice = {"index": i, "delta": delta, "logprobs": lp,
                              "finish_reason": _finish(item["finish_reason"]) if done else None}
                else:
                    choice = {"text": item["text"], "index": i, "logprobs": lp,
                              "finish_reason": _finish(item["finish_reason"]) if done else None}
                chunk = {**base, "choices": [choice]}
                if done:
                    chunk["hybridserve"] = {**(metas[i] or {}), **item.get("meta", {})}
                    if i == 0:
                        chunk["hybridserve"]["timeline"] = {**first["timeline"],
                                                            **chunk["hybridserve"].get("timeline", {})}
                    if include_usage:
                        chunk["usage"] = None
                    u = item["usage"]
                    usage = usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
                    if prompt_of[i] not in prompts_counted:
                        prompts_counted.add(prompt_of[i])
                        usage["prompt_tokens"] += u["prompt_tokens"]
                        usage["total_tokens"] += u["prompt_tokens"]
                    usage["completion_tokens"] += u["completion_tokens"]
                    usage["total_tokens"] += u["completion_tokens"]
                    finished += 1
                if item is first:
                    first["timeline"]["sse_first"] = time.time()
                yield _sse(chunk)
            if include_usage and finished == len(streams) and usage is not None:
                yield _sse({**base, "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"
        finally:
            for _, gen in streams:  # client gone or done: stop the replicas' generators (no-op when finished)
                gen.cancel()

    # ------------------------------------------------------------------ Python handle API
    def _python_request(self, request: Any, overrides: dict) -> _Common:
        if isinstance(request, (str, list)):
            body: dict = {"prompt": request}
        elif isinstance(request, dict):
            body = dict(request)
        else:
            raise EngineInputError("call with a prompt string, a list of token ids, or an OpenAI "
                                   "completions/chat request dict")
        body.update(overrides)
        model = ChatCompletionRequest if "messages" in body else CompletionRequest
        try:
            req = model.model_validate(body)
        except ValidationError as e:
            msg, _ = validation_message(list(e.errors()))
            raise EngineInputError(msg) from None
        if req.n > 1 or (getattr(req, "best_of", None) or 1) > 1:
            raise EngineInputError("n and best_of above 1 are served over HTTP; from Python, call "
                                   "handle.remote(...) once per choice (with different seeds)")
        p = getattr(req, "prompt", None)
        if isinstance(p, list) and len(p) > 1 and not isinstance(p[0], int):
            raise EngineInputError("a batch of prompts is served over HTTP; from Python, call "
                                   "handle.remote(...) once per prompt")
        return req

    async def complete(self, request: Any, **overrides: Any) -> dict:
        """Python API, non-streaming: ``{"text", "finish_reason", "usage", "hybridserve"}``."""
        req = self._python_request(request, {**overrides, "stream": False})
        try:
            [(payload, n)] = self._prepare(req)
            out = await self._generate(payload, n)
        except APIError as e:
            raise EngineInputError(e.message) from None
        sent = self._prompts_as_sent(req)
        text, lp = self._text_and_logprobs(req, sent[0] if sent else None, out)
        res = {"text": text, "finish_reason": _finish(out["finish_reason"]),
               "usage": out["usage"], "model": self.model_name, "hybridserve": out["meta"]}
        if lp is not None:
            res["logprobs"] = lp
        return res

    async def stream(self, request: Any, **overrides: Any) -> AsyncIterator[dict]:
        """Python API, streaming (call with ``handle.options(stream=True)``)."""
        req = self._python_request(request, {**overrides, "stream": False})
        if getattr(req, "echo", False):
            raise EngineInputError("echo cannot be streamed; call without stream=True")
        try:
            [(payload, n)] = self._prepare(req)
            first, gen = await self._start_stream(payload, n)
        except APIError as e:
            raise EngineInputError(e.message) from None
        meta = first.get("meta")
        item = first
        chat, offset = isinstance(req, ChatCompletionRequest), 0
        try:
            while True:
                if "error" in item:
                    raise EngineInputError(item["error"]["message"])
                if "finish_reason" in item:
                    yield {"text": item["text"], "finish_reason": _finish(item["finish_reason"]),
                           "usage": item["usage"], "hybridserve": {**(meta or {}), **item["meta"]}}
                    return
                chunk = {"text": item["text"], "index": item["index"]}
                lp, offset = _chunk_logprobs(item, chat, offset)
                if lp is not None:
                    chunk["logprobs"] = lp
                yield chunk
                try:
                    item = await gen.__anext__()
                except StopAsyncIteration:
                    return
        finally:
            gen.cancel()


def _finish(reason: str) -> str:
    return "stop" if reason == "cancelled" else reason


@serve.ingress(app)
class _IngressASGI(OpenAIIngress):
    pass


class Ingress(_IngressASGI):
    """The deployment class: HTTP goes to FastAPI; Python handle calls go to complete/stream.

    ``@serve.ingress`` forbids a ``__call__`` on the decorated class, so it is added on this
    subclass: an ASGI call (scope, receive, send) is forwarded to FastAPI, anything else is the
    Python API. Streaming needs the request to say so (``stream=True`` kwarg or body field),
    because a replica cannot see whether the caller used ``handle.options(stream=True)``.
    """

    async def __call__(self, *args: Any, **kwargs: Any):
        if (len(args) == 3 and not kwargs and isinstance(args[0], dict)
                and args[0].get("type") in _ASGI_TYPES):
            return await super().__call__(*args)  # ASGIAppReplicaWrapper.__call__ -> FastAPI
        if len(args) != 1:
            raise EngineInputError("call handle.remote(prompt_or_request, **params) with one request")
        request = args[0]
        stream = kwargs.pop("stream", None)
        if stream is None and isinstance(request, dict):
            stream = request.get("stream", False)
            request = {k: v for k, v in request.items() if k != "stream"}
        if stream:
            return self.stream(request, **kwargs)
        return await self.complete(request, **kwargs)
