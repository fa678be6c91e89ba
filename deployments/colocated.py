"""The colocated topology: the OpenAI API served inside each model replica.

``topology: split`` (default) runs Ray proxy -> Ingress replica -> ModelServer replica: two Ray hops
per request, and the warm-bucket router sees each prompt's bucket. ``topology: colocated``
removes the Ingress -> ModelServer hop: :class:`ColocatedServer` *is* the Ingress (same FastAPI app,
same validation and errors) and owns its ModelServer in-process, reached through :class:`LocalHandle`,
which has the slice of the ``DeploymentHandle`` interface the Ingress uses. The proxy (or, with
``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``, the replica's own HTTP port) sends HTTP straight to the replica
that runs the engine. What it costs: HTTP requests reach the router as ASGI calls with no bucket,
so the router balances them by load only.

``topology: local_first`` puts warm-bucket routing back without a routing call per request. Whatever sends
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
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .http.openai import SSEResponse
from .ingress import Ingress
from .router import WarmBucketPolicy
from .server import ModelServer

logger = logging.getLogger("ray.serve")

FORWARDED_HEADER = "x-hybridserve-forwarded-by"
# request headers a forward carries to the peer (it validates auth and the body again)
_FORWARD_IN = ("authorization", "content-type", "accept")


async def forward(session: Any, endpoint: tuple[str, int], request: Request, *, stream: bool,
                  by: str, read_timeout_s: float = 30.0) -> Response | None:
    """Send ``request`` (its path and body as received) to the replica listening at ``endpoint`` and
    relay its answer: streamed chunk by chunk when ``stream``. None when the peer cannot take it (no
    connection, a 5xx status, or no answer within ``read_timeout_s``, all before any byte of the
    answer): the caller serves the request itself, so nothing is lost. Once relaying, a peer silent for
    ``read_timeout_s`` ends the response. ``session`` is an ``aiohttp.ClientSession``."""
    import aiohttp

    host, port = endpoint
    headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARD_IN}
    headers[FORWARDED_HEADER] = by
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=read_timeout_s)
    try:
        resp = await session.post(f"http://{host}:{port}{request.url.path}", data=await request.body(),
                                  headers=headers, timeout=timeout)
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
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            logger.warning("local-first: %s:%s stopped answering (%r); serving here", host, port, e)
            return None
        finally:
            resp.release()
        return Response(data, status_code=resp.status, headers=out)

    async def relay():
        try:
            async for chunk in resp.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            logger.warning("local-first: %s:%s went silent mid-stream (%r)", host, port, e)
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


class Capacity:
    """Engine calls a colocated replica takes at once (``limit``; None: no bound). Past it a call raises
    Ray Serve's BackPressureError, answered 503 + Retry-After like a full split deployment."""

    def __init__(self, limit: int | None):
        self.limit, self.used = limit, 0

    def take(self) -> None:
        if self.limit is not None and self.used >= self.limit:
            from ray.serve.exceptions import BackPressureError
            raise BackPressureError(num_queued_requests=self.used, max_queued_requests=self.limit)
        self.used += 1

    def give(self) -> None:
        self.used -= 1


class _LocalMethod:
    def __init__(self, fn, stream: bool, capacity: Capacity):
        self._fn, self._stream, self._cap = fn, stream, capacity

    def remote(self, *args: Any, **kwargs: Any):
        if self._stream:
            return LocalStream(self._held_stream(args, kwargs))
        return self._held(args, kwargs)   # coroutine: awaited by the caller

    async def _held(self, args: tuple, kwargs: dict):
        self._cap.take()
        try:
            return await self._fn(*args, **kwargs)
        finally:
            self._cap.give()

    async def _held_stream(self, args: tuple, kwargs: dict):
        self._cap.take()
        agen = self._fn(*args, **kwargs)
        try:
            async for x in agen:
                yield x
        finally:
            self._cap.give()
            await agen.aclose()


class LocalHandle:
    """``handle.method.remote(...)`` / ``handle.options(stream=True).method.remote(...)`` on an
    in-process object, at most ``capacity.limit`` calls at once."""

    def __init__(self, target: Any, stream: bool = False, capacity: Capacity | None = None):
        self._target, self._stream = target, stream
        self._cap = capacity or Capacity(None)

    def options(self, *, stream: bool = False, **_: Any) -> "LocalHandle":
        return LocalHandle(self._target, stream, self._cap)

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self._target, name), self._stream, self._cap)


class ColocatedServer(Ingress):
    """Ingress + ModelServer in one replica (one engine, one GPU): HTTP, handle calls, and the
    replica hooks Ray Serve calls (routing/autoscaling stats, health) of the engine it owns."""

    async def __init__(self, app_config: dict):   # @serve.ingress makes the parent __init__ async
        self.server = await asyncio.to_thread(ModelServer, app_config)   # loading/compiling: off the loop
        cfg = self.server.cfg
        queued = None if cfg.max_queued_requests < 0 else cfg.max_queued_requests
        limit = None if queued is None else cfg.replica_max_ongoing + queued
        await super().__init__(LocalHandle(self.server, capacity=Capacity(limit)), app_config)
        self._local_first = self.cfg.topology == "local_first"
        # (own replica id, own node id, handle to this deployment, aiohttp session): set on the first miss
        self._peers = None
        self.policy = WarmBucketPolicy(self.cfg.router.imbalance_threshold, self.cfg.router.hint_ttl_s)
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
            stats = self.server.record_routing_stats() if rid == own else r.routing_stats
            views.append(self.policy.view(rid, stats, r.max_ongoing_requests, now=now))
            by_id[rid] = r
        chosen = self.policy.first_with_room(self.policy.rank(bucket, views))
        if chosen is None:
            return None, None
        if chosen.id != own:    # a cold pick: the next misses follow it until its stats say warm
            self.policy.placed(chosen.id, bucket, bucket in chosen.warm)
        endpoint = by_id[chosen.id].backend_http_endpoint
        if endpoint is not None and by_id[chosen.id].node_id == node:
            endpoint = ("127.0.0.1", endpoint[1])   # same node: loopback, as Ray's HAProxy config does
        return chosen.id, endpoint

    async def elsewhere(self, req, prepared, request):
        """Local-first (module docstring): None (serve here) on a warm bucket, a forwarded request, or
        when the policy picks this replica; else the peer's answer."""
        if not self._local_first or request is None or len(prepared) != 1:
            return None
        if request.headers.get(FORWARDED_HEADER):
            self._lf["forwarded_in"] += 1
            return None
        bucket = prepared[0].bucket
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
        out = await forward(session, endpoint, request, stream=bool(req.stream), by=own,
                            read_timeout_s=self.cfg.forward_timeout_s)
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
