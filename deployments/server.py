"""ModelServer: the model deployment. Each replica owns one HybridEngine (and, on GPU, one GPU).

Calls (from the ingress, through the warm-bucket router):
  ``generate.remote(request, n_tokens=N)``                  -> dict (see ``_result``)
  ``options(stream=True).stream.remote(request, n_tokens=N)`` -> dicts, one per token, then a final one
  ``remote(request)`` (``__call__``)                           -> same as generate

``request`` is ``{"prompt": str | list[int], "params": {SamplingParams fields}}`` or a bare prompt
string. ``n_tokens`` (the prompt's token count, computed by the ingress) is only read by the
router (``PendingRequest.kwargs``); the replica recounts with the engine.
Engine input errors never raise across Ray: they come back as ``{"error": {...}}`` (the only item
of a stream), which the ingress turns into HTTP 400.

Warm buckets reported to the router (``record_routing_stats``): on CUDA ``eng.warm_buckets()`` (a
captured graph). On CPU there are no graphs; as a deliberate, documented stand-in the replica
reports the buckets it has already served (what its JIT path would have captured on a GPU), so
the router's behaviour is testable in CI. ``warm_source`` in the stats says which one it is.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import asdict, fields
from typing import Any, AsyncIterator

from engine import EngineInputError, HybridEngine, SamplingParams

from .config import AppConfig

logger = logging.getLogger("ray.serve")

try:
    from autoscale.window import LatencyWindow
except ImportError:  # pragma: no cover - autoscale/window.py is written by another helper
    LatencyWindow = None  # type: ignore[assignment,misc]

try:
    from deployments import metrics as _metrics
except ImportError:  # pragma: no cover
    _metrics = None  # type: ignore[assignment]

_PARAM_FIELDS = {f.name for f in fields(SamplingParams)}
TTFT_HISTORY = 32  # recent TTFTs kept per bucket for routing stats


def _replica_id() -> str:
    try:
        from ray import serve
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"local-{os.getpid()}"


def error_dict(e: Exception) -> dict:
    return {"error": {"message": str(e), "type": "invalid_request_error", "param": None,
                      "code": type(e).__name__}}


def to_params(raw: dict | None) -> SamplingParams:
    raw = dict(raw or {})
    bad = sorted(set(raw) - _PARAM_FIELDS)
    if bad:
        raise EngineInputError(f"unknown sampling parameter(s) {bad}; known: {sorted(_PARAM_FIELDS)}")
    p = SamplingParams(**raw)
    p.validate()
    return p


class ModelServer:
    """One HybridEngine per replica. Constructed by Ray Serve with ``AppConfig.model_dump()``."""

    def __init__(self, app_config: dict | AppConfig):
        self.cfg = app_config if isinstance(app_config, AppConfig) else AppConfig.model_validate(app_config)
        ecfg = self.cfg.engine.model_copy(update={"device": self.cfg.resolved_device()})
        if ecfg.device == "cpu":
            import torch
            torch.set_num_threads(max(1, int(self.cfg.num_cpus or 1)))
        self.replica_id = _replica_id()
        self.eng = HybridEngine(ecfg)
        self.cuda = bool(getattr(self.eng, "cuda", False))
        self._lock = threading.Lock()
        self._served: set[int] = set()                        # CPU stand-in for warm graphs
        self._ttft: dict[int, deque] = {}
        self._requests = 0
        self._warm_hits = 0
        self._window = LatencyWindow(self.cfg.latency_window_s) if LatencyWindow is not None else None
        self._finishes: deque = deque(maxlen=64)              # recent (finish_reason, tokens): stats()
        self._finish_counts: dict[str, int] = {}
        self.started_at = time.time()
        self._store_events: list[dict] = []
        self._inject_ms_cached, self._inject_read_at = 0.0, -math.inf  # inject_latency_file
        self.eng.add_listener(self._on_event)
        self._log_store_outcome()
        logger.info("ModelServer %s ready: model=%s device=%s buckets=%s", self.replica_id,
                    self.eng.model_name, ecfg.device, self.eng.config.buckets)

    # ------------------------------------------------------------------ artifact store
    def _log_store_outcome(self) -> None:
        """Say in the replica log what the artifact store gave this replica (and why not)."""
        if not self.cfg.engine.store:
            return
        res = getattr(self.eng, "restore_result", None)
        if res is None:
            logger.warning("artifact store %s: not used by the engine", self.cfg.engine.store)
        elif res.loaded:
            logger.info("artifact store %s: warm start from entry %s (%d files, warm buckets %s)",
                        self.cfg.engine.store, res.entry, res.files, sorted(res.warm_buckets))
        else:
            why = ([f"store unavailable: {res.error}"] if res.error else []) + list(res.rejected) \
                + list(res.skipped)
            logger.warning("artifact store %s: nothing restored (%s); serving on the JIT path",
                           self.cfg.engine.store, "; ".join(why) or "no entry for this fingerprint")

    def store_status(self) -> dict:
        res = getattr(self.eng, "restore_result", None)
        return {"url": self.cfg.engine.store, "loaded": bool(res and res.loaded),
                "entry": getattr(res, "entry", None), "rejected": list(getattr(res, "rejected", []) or []),
                "skipped": list(getattr(res, "skipped", []) or []), "error": getattr(res, "error", None),
                "events": list(self._store_events)}

    # ------------------------------------------------------------------ engine events
    def _on_event(self, event: dict) -> None:
        """Engine listener (engine thread): latency window, per-bucket TTFT, metrics."""
        if event.get("type") == "store":
            self._store_events.append({k: event.get(k) for k in ("action", "reason")})
            if event.get("action") == "reject":
                logger.warning("artifact store: %s", event.get("reason"))
        if event.get("type") == "request":
            m = event["metrics"]
            reason = str(event.get("finish_reason"))
            with self._lock:
                self._finishes.append({"finish_reason": reason,
                                       "output_tokens": int(event.get("output_tokens", 0)),
                                       "e2e_ms": round(m.e2e_s * 1e3, 1), "at": time.time()})
                self._finish_counts[reason] = self._finish_counts.get(reason, 0) + 1
                self._ttft.setdefault(m.bucket, deque(maxlen=TTFT_HISTORY)).append(m.ttft_s)
                if event.get("finish_reason") != "cancelled" or m.ttft_s > 0:
                    self._served.add(m.bucket)
            if self._window is not None:   # as the client sees it: the test-only delay counts too
                extra = self._inject_ms() / 1e3
                self._window.record(m.ttft_s + extra, m.e2e_s + extra,
                                    service_s=max(0.0, m.e2e_s - m.queue_s) + extra)
        if _metrics is not None:
            try:
                _metrics.observe_event(event, self.replica_id, self.eng.model_name)
            except Exception:  # metrics must never break serving
                pass

    def warm_set(self) -> set[int]:
        if self.cuda:
            return set(self.eng.warm_buckets())
        with self._lock:
            return set(self._served)

    def _set_in_flight(self) -> None:
        n = self.eng.in_flight()
        if self._window is not None:
            self._window.set_in_flight(n)
        if _metrics is not None:
            try:
                _metrics.set_queue_depth(n, self.replica_id, self.eng.model_name)
            except Exception:
                pass

    # ------------------------------------------------------------------ Ray Serve hooks
    def record_routing_stats(self) -> dict[str, Any]:
        """Polled by the Serve controller every ``router.stats_period_s``; the router reads it as
        ``RunningReplica.routing_stats``. Contract (version 1):

        buckets            list[int]  the engine's prefill buckets (the router computes a prompt's
                                      bucket from these)
        warm_buckets       list[int]  buckets this replica serves by graph replay (CPU: served)
        capturing_buckets  list[int]  buckets queued or being captured in the background
        queue_depth        int        requests running + waiting in the engine
        ttft_ms_p50        dict[int, float]  median TTFT of the last 32 requests per bucket (ms)
        warm_source        "cuda_graphs" | "cpu_served_standin"
        replica, model, device, requests, warm_hits
        """
        with self._lock:
            ttft = {b: round(sorted(d)[len(d) // 2] * 1e3, 1) for b, d in self._ttft.items() if d}
            requests, hits = self._requests, self._warm_hits
        return {
            "v": 1,
            "replica": self.replica_id,
            "model": self.eng.model_name,
            "device": "cuda" if self.cuda else "cpu",
            "buckets": list(self.eng.config.buckets),
            "warm_buckets": sorted(self.warm_set()),
            "capturing_buckets": sorted(self.eng.capturing_buckets()),
            "queue_depth": int(self.eng.in_flight()),
            "ttft_ms_p50": ttft,
            "warm_source": "cuda_graphs" if self.cuda else "cpu_served_standin",
            "requests": requests,
            "warm_hits": hits,
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metrics (autoscale.window.LatencyWindow snapshot)."""
        if self._window is None:
            return {"in_flight": float(self.eng.in_flight())}
        self._window.set_in_flight(self.eng.in_flight())
        return self._window.snapshot()

    def check_health(self) -> None:
        if getattr(self.eng, "_closed", False):
            raise RuntimeError("engine is shut down")

    # ------------------------------------------------------------------ requests
    def _prepare(self, request: Any) -> tuple[Any, SamplingParams, dict]:
        if isinstance(request, (str, list)):
            request = {"prompt": request}
        if not isinstance(request, dict) or "prompt" not in request:
            raise EngineInputError("request must be a prompt string, a list of token ids, or "
                                   "{'prompt': ..., 'params': {...}}")
        prompt = request["prompt"]
        params = to_params(request.get("params"))
        ids = self.eng.validate(prompt, params)
        bucket = self.eng.bucket_for(len(ids))
        warm = bucket in self.warm_set()
        with self._lock:
            self._requests += 1
            self._warm_hits += warm
        meta = {"replica": self.replica_id, "bucket": bucket, "warm": warm, "prompt_tokens": len(ids)}
        return ids, params, meta

    def _inject_ms(self) -> float:
        """TEST ONLY: the injected latency (ms): ``inject_latency_ms``, or, when
        ``inject_latency_file`` is set, the number in that file (re-read at most every 0.5 s;
        missing file: 0; unparsable, e.g. caught mid-write: the last value)."""
        path = self.cfg.inject_latency_file
        if not path:
            return self.cfg.inject_latency_ms
        now = time.monotonic()
        if now - self._inject_read_at >= 0.5:   # engine thread and event loop: benign race
            self._inject_read_at = now
            try:
                with open(path) as f:
                    v = float(f.read().strip() or 0)
                self._inject_ms_cached = v if math.isfinite(v) and v > 0 else 0.0
            except FileNotFoundError:
                self._inject_ms_cached = 0.0
            except (OSError, ValueError):
                pass
        return self._inject_ms_cached

    async def _delay(self) -> None:
        ms = self._inject_ms()
        if ms > 0:
            await asyncio.sleep(ms / 1e3)

    @staticmethod
    def _final(meta: dict, finish_reason: str, completion_tokens: int, m: Any) -> dict:
        return {
            "finish_reason": finish_reason,
            "usage": {"prompt_tokens": meta["prompt_tokens"], "completion_tokens": completion_tokens,
                      "total_tokens": meta["prompt_tokens"] + completion_tokens},
            "meta": {**meta, "path": m.path if m else None,
                     "engine_ttft_ms": round(m.ttft_s * 1e3, 3) if m else None,
                     "engine_e2e_ms": round(m.e2e_s * 1e3, 3) if m else None,
                     "queue_ms": round(m.queue_s * 1e3, 3) if m else None},
        }

    async def generate(self, request: Any, n_tokens: int | None = None) -> dict:
        await self._delay()
        try:
            ids, params, meta = self._prepare(request)
            self._set_in_flight()
            res = await self.eng.generate_async(ids, params)
        except EngineInputError as e:
            return error_dict(e)
        finally:
            self._set_in_flight()
        out = {"text": res.text, "token_ids": res.token_ids,
               **self._final(meta, res.finish_reason, len(res.token_ids), res.metrics)}
        if res.logprobs is not None:
            out["logprobs"] = [asdict(lp) for lp in res.logprobs]
        if res.prompt_logprobs is not None:
            out["prompt_logprobs"] = [asdict(lp) for lp in res.prompt_logprobs]
        return out

    async def __call__(self, request: Any, n_tokens: int | None = None) -> dict:
        return await self.generate(request, n_tokens=n_tokens)

    async def stream(self, request: Any, n_tokens: int | None = None) -> AsyncIterator[dict]:
        """Yields ``{"text", "index", "token_id"}`` per token (the first also carries ``meta``),
        then ``{"text": "", "finish_reason", "usage", "meta"}``; or a single ``{"error"}``."""
        t_in = time.time()
        await self._delay()
        try:
            ids, params, meta = self._prepare(request)
        except EngineInputError as e:
            yield error_dict(e)
            return
        gen = self.eng.stream(ids, params)
        first = True
        timeline = {"replica_in": t_in}
        self._set_in_flight()
        try:
            async for ch in gen:
                if ch.finish_reason is not None:
                    out = {"text": ch.text, **self._final(meta, ch.finish_reason, ch.index, ch.metrics)}
                    out["meta"]["timeline"] = timeline
                    yield out
                    return
                out = {"text": ch.text, "index": ch.index, "token_id": ch.token_id}
                if ch.logprobs is not None:
                    out["logprobs"] = asdict(ch.logprobs)
                if first:
                    # wall clock (s) where the request reached this replica and its first token left
                    timeline["replica_first"] = time.time()
                    out["meta"] = meta
                    first = False
                yield out
        except EngineInputError as e:
            yield error_dict(e)
        finally:
            await gen.aclose()
            self._set_in_flight()

    def stats(self) -> dict:
        """Engine + routing stats (debugging, tests): also the replica's pid and start time, its
        last 64 finished requests (``finishes``: finish_reason, output_tokens, e2e_ms, at) and
        counts per finish_reason (a cancelled stream shows up as "cancelled")."""
        with self._lock:
            finishes, counts = list(self._finishes), dict(self._finish_counts)
        return {**self.record_routing_stats(), "engine": self.eng.stats(), "pid": os.getpid(),
                "user_code_thread": os.environ.get("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "1") != "0",
                "store": self.store_status(),
                "started_at": self.started_at, "finishes": finishes, "finish_counts": counts}

    def __del__(self):
        try:
            self.eng.shutdown()
        except Exception:
            pass
