"""Test engine factories (``AppConfig.engine_factory``): the real HybridEngine with a delay before
each request, as a client would see a slower engine, or one whose scheduler hangs."""
from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from typing import Any

from engine import HybridEngine


class SlowEngine:
    """HybridEngine whose requests wait ``ms`` milliseconds first (or the number in ``ms_file``,
    re-read at most every 0.5 s; missing file: 0); the metrics its listeners get include the wait.
    ``step_ms``: every decode step takes that much longer (a bigger model), so a request of many tokens
    outlasts a stall of the serving loop (a disconnect test must see the request still running)."""

    def __init__(self, cfg: Any, ms: float = 0.0, ms_file: str | None = None, step_ms: float = 0.0):
        self._eng = HybridEngine(cfg)
        self._ms, self._file = float(ms), ms_file
        self._cached, self._read_at = 0.0, -math.inf
        if step_ms > 0:
            read = self._eng.runner.read_decode

            def slower(step):
                time.sleep(step_ms / 1e3)
                return read(step)
            self._eng.runner.read_decode = slower

    def __getattr__(self, name: str) -> Any:
        return getattr(self._eng, name)

    def delay_ms(self) -> float:
        if not self._file:
            return self._ms
        now = time.monotonic()
        if now - self._read_at >= 0.5:
            self._read_at = now
            try:
                with open(self._file) as f:
                    v = float(f.read().strip() or 0)
                self._cached = v if math.isfinite(v) and v > 0 else 0.0
            except FileNotFoundError:
                self._cached = 0.0
            except (OSError, ValueError):   # caught mid-write: keep the last value
                pass
        return self._cached

    def add_listener(self, fn) -> None:
        def shifted(event: dict) -> None:
            m = event.get("metrics")
            if event.get("type") == "request" and m is not None:
                extra = self.delay_ms() / 1e3
                event = {**event, "metrics": dataclasses.replace(m, ttft_s=m.ttft_s + extra, e2e_s=m.e2e_s + extra)}
            fn(event)
        self._eng.add_listener(shifted)

    async def generate_async(self, req, params=None):
        await asyncio.sleep(self.delay_ms() / 1e3)
        return await self._eng.generate_async(req, params)

    async def stream(self, req, params=None):
        await asyncio.sleep(self.delay_ms() / 1e3)
        async for ch in self._eng.stream(req, params):
            yield ch


class StuckEngine(SlowEngine):
    """An engine whose scheduler reports no step for ``stuck_s`` once a request with prompt token 7
    arrives (heartbeat_age_s); the request itself never finishes."""

    def __init__(self, cfg: Any, **kw: Any):
        super().__init__(cfg, **kw)
        self._stuck_since: float | None = None

    def heartbeat_age_s(self) -> float:
        return 0.0 if self._stuck_since is None else time.monotonic() - self._stuck_since

    async def _maybe_stick(self, req) -> None:
        if 7 in req.ids:
            self._stuck_since = time.monotonic()
            await asyncio.Event().wait()

    async def generate_async(self, req, params=None):
        await self._maybe_stick(req)
        return await super().generate_async(req, params)

    async def stream(self, req, params=None):
        await self._maybe_stick(req)
        async for ch in super().stream(req, params):
            yield ch


class FaultyEngine(StuckEngine):
    """StuckEngine that also fails, with an error naming a server path, on a prompt with token 11."""

    async def generate_async(self, req, params=None):
        if 11 in req.ids:
            raise RuntimeError("cannot open /srv/secret/weights.bin")
        return await super().generate_async(req, params)

    async def stream(self, req, params=None):
        if 11 in req.ids:
            raise RuntimeError("cannot open /srv/secret/weights.bin")
        async for ch in super().stream(req, params):
            yield ch
