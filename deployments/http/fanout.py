"""Calls from the HTTP app to the model replicas: one call per (prompt, choice), run concurrently, each
under its own Serve request id; back-pressure -> 503, a dead replica -> one retry, a deadline -> 504."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

from engine.request import Request

from .errors import BACKPRESSURE, REPLICA_GONE, APIError, ray_failure

logger = logging.getLogger("ray.serve")


def timed_out(timeout_s: float) -> APIError:
    return APIError(f"The request did not complete within its timeout of {timeout_s:g} s; raise "
                    "request_timeout_s, lower max_tokens, or retry later.", status=504,
                    type_="server_error", code="request_timeout")


class Deadline:
    """The time a request must be answered by (None: no limit)."""

    def __init__(self, timeout_s: float | None):
        self.timeout_s = timeout_s
        self.at = None if timeout_s is None else time.monotonic() + timeout_s

    def left(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    async def run(self, coro):
        """Await coro within the deadline; 504 (and coro cancelled: the engine request ends) past it."""
        if self.at is None:
            return await coro
        try:
            return await asyncio.wait_for(coro, self.left())
        except TimeoutError:
            raise timed_out(self.timeout_s) from None


class DeadlineStream:
    """A replica stream whose next item must come before the deadline; past it, TimeoutError."""

    def __init__(self, gen: Any, deadline: Deadline):
        self._gen, self._deadline = gen, deadline

    def __aiter__(self):
        return self

    async def __anext__(self):
        left = self._deadline.left()
        if left is None:
            return await self._gen.__anext__()
        return await asyncio.wait_for(self._gen.__anext__(), left)

    def cancel(self) -> None:
        self._gen.cancel()


def choice_requests(req: Request, count: int, logprobs_for_rank: bool) -> list[Request]:
    """One engine request per choice: seeded requests get seed, seed+1, ... (so choices differ and stay
    reproducible); best_of ranking needs each token's logprob."""
    out = []
    for i in range(count):
        p = req.params
        if p.seed is not None and i:
            p = replace(p, seed=(p.seed + i + 2**63) % 2**64 - 2**63)
        if logprobs_for_rank and p.logprobs is None:
            p = replace(p, logprobs=0)
        out.append(req if p is req.params else replace(req, params=p))
    return out


class ModelClient:
    """The model deployment as the HTTP app calls it (a Ray handle, or the colocated LocalHandle)."""

    def __init__(self, handle: Any, retry_after_s: float):
        self._generate_h = handle.generate          # bound once: .options()/getattr build new handle objects
        self._stream_h = handle.options(stream=True).stream
        self._retry_after = {"retry-after": str(max(0, int(-(-retry_after_s // 1))))}

    def overloaded(self, e: BaseException) -> APIError:
        return APIError("The server is overloaded: every model replica is busy and the request "
                        "queue is full. Retry after the Retry-After delay.", status=503,
                        type_="server_error", code="overloaded", headers=self._retry_after)

    def replica_failed(self, e: BaseException, retried: bool) -> APIError:
        logger.warning("model replica failed during a request%s: %s",
                       " (after one retry)" if retried else "", type(e).__name__)
        return APIError("The model replica serving this request failed"
                        + (" (and so did the retry)" if retried else "")
                        + "; nothing was lost on the server, retry the request.", status=503,
                        type_="server_error", code=REPLICA_GONE, headers=self._retry_after)

    def _retry(self, e: BaseException, attempt: int) -> bool:
        """Back-pressure -> 503 at once; a dead replica -> True (retry) on the first attempt, 503
        after; anything else False (the caller re-raises)."""
        kind = ray_failure(e)
        if kind == BACKPRESSURE:
            raise self.overloaded(e) from None
        if kind == REPLICA_GONE:
            if attempt == 0:
                return True
            raise self.replica_failed(e, True) from None
        return False

    async def generate(self, req: Request) -> dict:
        for attempt in (0, 1):
            try:
                out = await self._generate_h.remote(req)
                break
            except Exception as e:
                if self._retry(e, attempt):
                    continue
                raise
        if "error" in out:
            raise APIError(out["error"]["message"], code=out["error"].get("code"))
        return out

    async def start_stream(self, req: Request) -> tuple[dict, Any]:
        """Start a stream and wait for its first item (before any byte goes to the client): a replica
        failure up to here is retried once, like a non-streaming request."""
        for attempt in (0, 1):
            gen = None
            try:
                gen = self._stream_h.remote(req)
                first = await gen.__anext__()
                break
            except StopAsyncIteration:
                raise APIError("the model produced no output", status=500, type_="server_error") from None
            except BaseException as e:
                if gen is not None:
                    try:   # cancel() re-raises the call's error (e.g. BackPressureError): ignore it
                        gen.cancel()
                    except Exception:
                        pass
                if isinstance(e, Exception) and self._retry(e, attempt):
                    continue
                raise
        if "error" in first:
            gen.cancel()
            raise APIError(first["error"]["message"], code=first["error"].get("code"))
        return first, gen

    def stream_failure(self, e: BaseException) -> tuple[str, str]:
        """(message, code) of a stream that failed after its first byte."""
        if isinstance(e, TimeoutError):
            return "the request timed out (request_timeout_s)", "request_timeout"
        kind = ray_failure(e)
        if kind == REPLICA_GONE:
            return self.replica_failed(e, False).message, kind
        logger.error("stream failed", exc_info=e)
        return "the stream failed on the server; retry the request", kind or "internal_error"


async def _own_request_id(coro):
    """Run coro (one choice's model call) under its own Serve internal request id: Ray Serve's router
    indexes pending requests by that id and child calls inherit their parent's, so two concurrent
    calls of one HTTP request would share it and one would never be routed."""
    try:
        from ray.serve import context as serve_ctx
        from ray.serve._private.utils import generate_request_id
    except ImportError:   # pragma: no cover - no Ray: nothing to separate
        return await coro
    ctx = serve_ctx._get_serve_request_context()
    serve_ctx._serve_request_context.set(replace(ctx, _internal_request_id=generate_request_id()))
    return await coro


async def run_all(coros: list, undo=None) -> list:
    """Run the choices' calls concurrently, each under its own request id; the first failure cancels
    the rest (undo(result) for those already done) and is raised."""
    if len(coros) == 1:
        return [await coros[0]]
    tasks = [asyncio.ensure_future(_own_request_id(c)) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
            if undo is not None and t.done() and not t.cancelled() and t.exception() is None:
                undo(t.result())
        raise
