"""The colocated topology: the OpenAI API served inside each model replica.

``topology: split`` (default) runs Ray proxy -> Ingress replica -> ModelServer replica: two Ray hops
per request, and the warm-bucket router sees each prompt's token count. ``topology: colocated``
removes the Ingress -> ModelServer hop: :class:`ColocatedServer` *is* the Ingress (same FastAPI app,
same validation and errors) and owns its ModelServer in-process, reached through :class:`LocalHandle`,
which has the slice of the ``DeploymentHandle`` interface the Ingress uses. The proxy (or, with
``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``, the replica's own HTTP port) sends HTTP straight to the replica
that runs the engine. What it costs: HTTP requests reach the router as ASGI calls with no token count,
so the router balances them by load only.

``local_first: true`` puts warm-bucket routing back without a routing call per request. Whatever sends
the request here (HAProxy, ``RAY_SERVE_ENABLE_HA_PROXY=1``, balancing by load) picks the replica; the
replica validates and tokenizes the prompt, and when it holds a warm graph for the prompt's bucket it
serves it. On a miss it applies the warm-bucket policy (:func:`deployments.router.choose_replicas`) to
the replicas' routing stats and, if the policy picks another replica, forwards the HTTP request to that
replica's own port (:func:`forward`), marked with
``x-hybridserve-forwarded-by`` so the peer serves it without asking again (one hop at most). A peer that
cannot be reached, or answers 5xx before any byte of the response, means the request is served here.
The policy runs in the replica, not in a Ray ``RequestRouter``: under HAProxy, Ray 2.60 refuses a custom
request router on the ingress deployment (HAProxy would bypass it), so this deployment keeps Ray's
default router and the replica reads the replicas' stats itself.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .ingress import Ingress, SSEResponse
from .router import choose_replicas, view_from_stats
from .server import ModelServer

logger = logging.getLogger("ray.serve")

FORWARDED_HEADER = "x-hybridserve-forwarded-by"
# request headers a forward carries to the peer (it validates auth and the body again)
_FORWARD_IN = ("authorization", "content-type", "accept")


async def forward(session: Any, endpoint: tuple[str, int], request: Request, *, stream: bool,
                  by: str) -> Response | None:
    """Send ``request`` (its path and body as received) to the replica listening at ``endpoint`` and
    relay its answer: streamed chunk by chunk when ``stream``. None when the peer cannot take it (no
    connection, or a 5xx status before any byte of the answer): the caller serves the request itself,
    so nothing is lost. ``session`` is an ``aiohttp.ClientSession``."""
    import aiohttp

    host, port = endpoint
    headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARD_IN}
    headers[FORWARDED_HEADER] = by
    try:
        resp = await session.post(f"http://{host}:{port}{request.url.path}", data=await request.body(),
                                  headers=headers)
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
        logger.warning("local-first: forward to %s:%s failed (%s); serving here", host, port, e)
        return None
    if resp.status >= 500:
        logger.warning("local-first: %s:%s answered %d; serving here", host, port, resp.status)
        resp.release()
        return None
    out = {k: v for k, v in resp.headers.items()
           if k.lower().startswith("x-hybridserve-") or k.lower() in ("content-type", "cache-control")}
    out[FORWARDED_HEADER] = by
    if not stream:
        try:
            data = await resp.read()
        finally:
            resp.release()
        return Response(data, status_code=resp.status, headers=out)

    async def relay():
        try:
            async for chunk in resp.content.iter_any():
                yield chunk
        finally:   # done, or the client went away: closing the connection cancels the peer's request
            resp.close()
    return SSEResponse(relay(), status_code=resp.status, headers=out)


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
        self._local_first = bool(self.cfg.local_first)
        # (own replica id, own node id, handle to this deployment, aiohttp session): set on the first miss
        self._peers = None
        self._hints: dict[str, dict[int, float]] = {}    # peer -> {bucket: time a miss was sent there cold}
        self._rng = random.Random()
        self._lf = {"warm_here": 0, "forwarded_in": 0, "misses": 0, "forwarded": 0,
                    "kept_cold": 0, "forward_failed": 0}

    def _peers_now(self):
        if self._peers is None:
            import aiohttp
            import ray
            from ray import serve

            ctx = serve.get_replica_context()
            handle = serve.get_deployment_handle(ctx.deployment, ctx.app_name)
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0))
            self._peers = (ctx.replica_id.unique_id, ray.get_runtime_context().get_node_id(), handle, session)
        return self._peers

    async def _replicas(self, handle) -> list:
        """This deployment's running replicas (Ray's ``RunningReplica``: routing stats, HTTP endpoint), as
        the handle's request router holds them. Ray 2.60 has no public accessor for that list: this reads
        ``DeploymentHandle._router`` -> ``request_router.curr_replicas`` (tests/test_local_first.py fails if
        a Ray upgrade moves it). The first call starts the handle's router with one ``choose_replica``."""
        def listed():
            rr = getattr(getattr(getattr(handle, "_router", None), "_asyncio_router", None), "request_router", None)
            return list(rr.curr_replicas.values()) if rr is not None else []
        if not (reps := listed()):
            async with handle.choose_replica(_reserve=False):   # waits for the replica list
                pass
            reps = listed()
        return reps

    async def _pick(self, own: str, node: str, handle, bucket: int):
        """The warm-bucket policy (router.choose_replicas) over the replicas' routing stats, this replica
        by its live state; the first with room, or None."""
        now = time.monotonic()
        views, by_id = [], {}
        for r in await self._replicas(handle):
            rid = r.replica_id.unique_id
            if rid == own:
                stats = {"warm_buckets": self.server.warm_set(), "queue_depth": self.server.eng.in_flight(),
                         "capturing_buckets": self.server.eng.capturing_buckets()}
            else:
                stats = r.routing_stats
            views.append(view_from_stats(rid, stats, r.max_ongoing_requests, hints=self._hints.get(rid),
                                         now=now, hint_ttl_s=self.cfg.router.hint_ttl_s))
            by_id[rid] = r
        order = choose_replicas(bucket, views, self._rng, imbalance_threshold=self.cfg.router.imbalance_threshold)
        chosen = next((v for v in order if v.max_load is None or v.load < v.max_load), None)
        if chosen is None:
            return None, None
        if bucket not in chosen.warm and chosen.id != own:    # the next misses follow it until its stats say warm
            self._hints.setdefault(chosen.id, {})[bucket] = now
        endpoint = by_id[chosen.id].backend_http_endpoint
        if endpoint is not None and by_id[chosen.id].node_id == node:
            endpoint = ("127.0.0.1", endpoint[1])   # same node: loopback, as Ray's HAProxy config does
        return chosen.id, endpoint

    async def _elsewhere(self, req, prepared, request):
        """Local-first (module docstring): None (serve here) on a warm bucket, a forwarded request, or
        when the policy picks this replica; else the peer's answer."""
        if not self._local_first or request is None or len(prepared) != 1:
            return None
        if request.headers.get(FORWARDED_HEADER):
            self._lf["forwarded_in"] += 1
            return None
        bucket = self.server.eng.bucket_for(prepared[0][1])
        if bucket in self.server.warm_set():
            self._lf["warm_here"] += 1
            return None
        self._lf["misses"] += 1
        try:
            own, node, handle, session = self._peers_now()
            pick, endpoint = await self._pick(own, node, handle, bucket)
        except Exception as e:    # no replica list (e.g. the app is shutting down): serve here
            logger.warning("local-first: no replica list (%r); serving here", e)
            pick = endpoint = None
        if pick is None or pick == own or endpoint is None:
            self._lf["kept_cold"] += 1
            return None
        out = await forward(session, endpoint, request, stream=bool(req.stream), by=own)
        self._lf["forwarded" if out is not None else "forward_failed"] += 1
        return out

    def record_routing_stats(self) -> dict:
        out = self.server.record_routing_stats()
        if self._local_first:   # warm_here, forwarded_in, misses, forwarded, kept_cold, forward_failed
            out["local_first"] = dict(self._lf)
        return out

    def record_autoscaling_stats(self) -> dict[str, float]:
        return self.server.record_autoscaling_stats()

    def check_health(self) -> None:
        self.server.check_health()

    def stats(self) -> dict:
        out = self.server.stats()
        if self._local_first:
            out["local_first"] = dict(self._lf)
        return out
