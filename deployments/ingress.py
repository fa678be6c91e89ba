"""The Ingress deployment: the OpenAI HTTP app (deployments/http/) and the Python-handle API in one
Ray Serve class, calling the ModelServer deployment through the warm-bucket router.

HTTP:  POST /v1/completions, POST /v1/chat/completions (``stream: true`` -> SSE), GET /v1/models,
       GET /healthz; errors in OpenAI's shape. Python (``serve.get_app_handle("hybridserve")``):
       ``handle.remote("prompt" | {...}, **params)``, ``handle.options(stream=True).remote(..., stream=True)``.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve

from .http.app import build_http_app
from .http.handle_api import HandleAPI
from .http.service import OpenAIIngress

_ASGI_TYPES = {"http", "websocket", "lifespan"}


@serve.ingress()
class _IngressASGI(HandleAPI, OpenAIIngress):
    def __serve_build_asgi_app__(self) -> FastAPI:   # called by Serve on the replica, after __init__
        return build_http_app(self)


class Ingress(_IngressASGI):
    """HTTP goes to the FastAPI app; any other call is the Python API. ``@serve.ingress`` forbids a
    ``__call__`` on the decorated class, so it is added here."""

    def transport(self) -> str:
        """How this ingress calls the model replicas: "grpc" (Serve's gRPC transport) or "ray"."""
        opts = getattr(self.model, "handle_options", None)
        return "grpc" if getattr(opts, "_by_reference", True) is False else "ray"

    async def __call__(self, *args: Any, **kwargs: Any):
        if (len(args) == 3 and not kwargs and isinstance(args[0], dict)
                and args[0].get("type") in _ASGI_TYPES):
            return await super().__call__(*args)  # ASGIAppReplicaWrapper.__call__ -> FastAPI
        return await self.dispatch(args, dict(kwargs))
