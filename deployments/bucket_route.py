"""Warm-bucket routing in front of colocated replicas, through Ray Serve's HAProxy ingress.

``topology: colocated`` serves the API inside each model replica (no Ray hop on the data path), but
then no router sees the prompt. With ``ingress_router: true`` (and, in the Ray cluster's environment,
``RAY_SERVE_ENABLE_HA_PROXY=1`` plus ``RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY=1``), Ray Serve
runs HAProxy as the HTTP entry point; for each POST, HAProxy's Lua action sends the request body to
:class:`BucketRouteServer`'s ``/internal/route``, which counts the prompt's tokens and asks the
colocated deployment's own request router (:class:`deployments.router.WarmBucketRouter`, through
``DeploymentHandle.choose_replica``) for a replica, and answers with its id; HAProxy then sends the
request straight to that replica's HTTP port. The data path stays HAProxy -> replica; the routing
decision costs one local HTTP call.

What differs from the split topology's routing (the router runs with ``load_from_stats``, set by
app.py): Ray calls the router's ``on_request_routed`` hook only for requests it dispatches itself, so
the router notes its pick (and a cold placement's hint) when it ranks the replicas; and the load it
sees is each replica's reported queue depth (every ``router.stats_period_s``), since Ray's per-request
queue-length cache never sees the requests HAProxy sends.

The hook that attaches this deployment, ``Application._with_ingress_request_router``, is marked
internal and unstable in Ray 2.60 (it is how Serve LLM's direct streaming routes); the contract
used here is small: POST body in, ``{"replica_id", "host", "port"}`` out.
"""

import json
from typing import Any

from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from .config import AppConfig, load_app_config
from .ingress import ChatMessage, chat_prompt_ids
from .router import TOKENS_KWARG
from .tokenize import count_tokens, load_tokenizer


def prompt_tokens(tok: Any, body: bytes) -> int | None:
    """The prompt's token count as the engine will see it, from an OpenAI request body; None when
    the body has no single routable prompt (the replica then validates and answers the request)."""
    try:
        req = json.loads(body or b"{}")
    except ValueError:
        return None
    if not isinstance(req, dict):
        return None
    try:
        prompt = req.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]                                   # a batch of one
        if isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
            return count_tokens(tok, prompt)
        msgs = req.get("messages")
        if isinstance(msgs, list) and msgs:
            return len(chat_prompt_ids(tok, [ChatMessage.model_validate(m) for m in msgs]))
    except Exception:      # a prompt the models or the tokenizer reject: the replica answers it with a 4xx
        return None
    return None


class BucketRouteServer:
    """HAProxy's ingress request router for the colocated topology (see the module docstring).

    A plain ``__call__`` rather than a FastAPI ingress: it is on every request's path, and Serve's
    HTTP path into a replica is shorter without FastAPI's routing and response models (CPU A/B, a tiny
    POST on a same-loop replica: FastAPI 1.41 ms, ``__call__`` 1.21 ms, p50; docs/fleet.md)."""

    def __init__(self, model: DeploymentHandle, app_config: dict):
        cfg = app_config if isinstance(app_config, AppConfig) else load_app_config(app_config)
        self.tok = load_tokenizer(cfg.engine)
        self.model = model

    async def __call__(self, request: Request) -> Response | dict:
        path = request.url.path.rstrip("/")
        if path.endswith("/internal/route") and request.method == "POST":
            return await self.route(await request.body())
        if path.endswith("/healthz") and request.method == "GET":
            return PlainTextResponse("ok")
        return JSONResponse({"detail": f"{request.method} {path or '/'} not found: this deployment "
                                       "serves POST /internal/route (HAProxy) and GET /healthz"},
                            status_code=404)

    async def route(self, body: bytes) -> Response | dict:
        n = prompt_tokens(self.tok, body)
        kwargs: dict[str, Any] = {"_reserve": False}     # the request itself goes through HAProxy
        if n is not None:
            kwargs[TOKENS_KWARG] = n
        try:
            async with self.model.choose_replica(**kwargs) as selection:
                replica = selection._replica
                endpoint = replica.backend_http_endpoint
                if endpoint is None:
                    raise RuntimeError(f"replica {selection.replica_id} has no HTTP endpoint yet")
                host, port = endpoint
                return {"host": host, "port": port, "replica_id": replica.replica_id.to_full_id_str()}
        except RuntimeError as e:
            return JSONResponse({"detail": str(e)}, status_code=503)
