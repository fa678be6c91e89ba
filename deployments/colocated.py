"""The colocated topology: the OpenAI API served inside each model replica.

``topology: split`` (default) runs Ray proxy -> Ingress replica -> ModelServer replica: two Ray hops
per request, and the warm-bucket router sees each prompt's token count. ``topology: colocated``
removes the Ingress -> ModelServer hop: :class:`ColocatedServer` *is* the Ingress (same FastAPI app,
same validation and errors) and owns its ModelServer in-process, reached through :class:`LocalHandle`,
which has the slice of the ``DeploymentHandle`` interface the Ingress uses. The proxy (or, with
``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``, the replica's own HTTP port) sends HTTP straight to the replica
that runs the engine. What it costs: HTTP requests reach the router as ASGI calls with no token count,
so the router balances them by load only.
"""
from __future__ import annotations

import asyncio
from typing import Any

from .ingress import Ingress
from .server import ModelServer


class LocalStream:
    """A replica stream without Ray: ``__anext__`` and a sync ``cancel()`` like ``DeploymentResponseGenerator``."""

    def __init__(self, agen):
        self._agen = agen
        self._closing: asyncio.Task | None = None

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._agen.__anext__()

    def cancel(self) -> None:
        """Close the generator (its ``finally`` cancels the engine request); no-op once finished."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._agen.aclose())


class _LocalMethod:
    def __init__(self, fn, stream: bool):
        self._fn, self._stream = fn, stream

    def remote(self, *args: Any, **kwargs: Any):
        out = self._fn(*args, **kwargs)
        return LocalStream(out) if self._stream else out   # coroutine: awaited by the caller


class LocalHandle:
    """``handle.method.remote(...)`` / ``handle.options(stream=True).method.remote(...)`` on an
    in-process object."""

    def __init__(self, target: Any, stream: bool = False):
        self._target, self._stream = target, stream

    def options(self, *, stream: bool = False, **_: Any) -> "LocalHandle":
        return LocalHandle(self._target, stream)

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self._target, name), self._stream)


class ColocatedServer(Ingress):
    """Ingress + ModelServer in one replica (one engine, one GPU): HTTP, handle calls, and the
    replica hooks Ray Serve calls (routing/autoscaling stats, health) of the engine it owns."""

    async def __init__(self, app_config: dict):   # @serve.ingress makes the parent __init__ async
        self.server = await asyncio.to_thread(ModelServer, app_config)   # loading/compiling: off the loop
        await super().__init__(LocalHandle(self.server), app_config)

    def record_routing_stats(self) -> dict:
        return self.server.record_routing_stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        return self.server.record_autoscaling_stats()

    def check_health(self) -> None:
        self.server.check_health()

    def stats(self) -> dict:
        return self.server.stats()
