"""ModelServer: the model deployment. Each replica owns one engine (and, on GPU, one GPU).

Calls (from the HTTP app, through the warm-bucket router), each with an :class:`engine.request.Request`
the app built and validated once (the replica trusts it):
  ``generate.remote(req)``                    -> dict (see ``_final``)
  ``options(stream=True).stream.remote(req)`` -> dicts, one per token, then a final one
Engine input errors never raise across Ray: they come back as ``{"error": {...}}`` (the only item
of a stream), which the app turns into HTTP 400.

Warm buckets reported to the router (``record_routing_stats``): on CUDA ``eng.warm_buckets()`` (a
captured graph). On CPU there are no graphs; as a deliberate stand-in the replica reports the buckets
it has served (what its JIT path would have captured on a GPU), so routing is testable in CI.
``warm_source`` in the stats says which one it is.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections import deque
from dataclasses import asdict
from typing import Any, AsyncIterator

from engine import EngineInputError, HybridEngine
from engine.errors import PromptTooLongError
from engine.request import CONTEXT_LENGTH_CODE, Request

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

TTFT_HISTORY = 32  # recent TTFTs kept per bucket for routing stats


def _replica_id() -> str:
    try:
        from ray import serve
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"local-{os.getpid()}"


def error_dict(e: Exception) -> dict:
    code = CONTEXT_LENGTH_CODE if isinstance(e, PromptTooLongError) else type(e).__name__
    return {"error": {"message": str(e), "type": "invalid_request_error", "param": None, "code": code}}


def make_engine(cfg: AppConfig, engine_cfg: Any) -> Any:
    """The replica's engine: ``cfg.engine_factory`` ('module:callable', called with the EngineConfig and
    ``engine_factory_args``) or HybridEngine."""
    if not cfg.engine_factory:
        return HybridEngine(engine_cfg)
    module, _, name = cfg.engine_factory.partition(":")
    return getattr(importlib.import_module(module), name)(engine_cfg, **cfg.engine_factory_args)


def engine_load(eng: Any) -> dict[str, int]:
    """running / waiting / free_slots / max_batch of the engine (its stats() keys)."""
    st = eng.stats()
    return {k: int(st[k]) for k in ("running", "waiting", "free_slots", "max_batch")}


class ModelServer:
    """One HybridEngine per replica. Constructed by Ray Serve with ``AppConfig.model_dump()``."""

    def __init__(self, app_config: dict | AppConfig):
        self.cfg = app_config if isinstance(app_config, AppConfig) else AppConfig.model_validate(app_config)
        ecfg = self.cfg.engine.model_copy(update={"device": self.cfg.resolved_device()})
        if ecfg.device == "cpu":
            import torch
            torch.set_num_threads(max(1, int(self.cfg.num_cpus or 1)))
        self.replica_id = _replica_id()
        self.eng = make_engine(self.cfg, ecfg)
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
            if self._window is not None:
                cost = self._full_batch_cost_ms(m, int(event.get("output_tokens", 0)))
                self._window.record(m.ttft_s, m.e2e_s, service_s=max(0.0, m.e2e_s - m.queue_s),
                                    full_batch_s=None if cost is None else cost / 1e3)
        if _metrics is not None:
            try:
                _metrics.observe_event(event, self.replica_id, self.eng.model_name)
            except Exception:  # metrics must never break serving
                pass

    def _full_batch_cost_ms(self, m: Any, tokens: int) -> float | None:
        """The request's cost at the engine's full batch (HybridEngine.full_batch_cost_ms); None where the
        engine can't say (the autoscaler then reads the replica's slots)."""
        try:
            return self.eng.full_batch_cost_ms(m, tokens)
        except Exception:   # an engine without it must not lose the request's latency sample
            return None

    def warm_set(self) -> set[int]:
        if self.cuda:
            return set(self.eng.warm_buckets())
        with self._lock:
            return set(self._served)

    def queue_depth(self) -> int:
        """Requests running + waiting in the engine (cheap: on every request's path)."""
        return int(self.eng.in_flight())

    def _set_in_flight(self) -> None:
        n = self.queue_depth()
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
        warm_batch_sizes   list[int]  decode batch sizes this replica replays by graph
        queue_depth        int        requests running + waiting in the engine
        running, waiting, free_slots, max_batch   int   the engine's scheduler (engine.stats())
        ttft_ms_p50        dict[int, float]  median TTFT of the last 32 requests per bucket (ms)
        warm_source        "cuda_graphs" | "cpu_served_standin"
        replica, model, device, requests, warm_hits
        """
        with self._lock:
            ttft = {b: round(sorted(d)[len(d) // 2] * 1e3, 1) for b, d in self._ttft.items() if d}
            requests, hits = self._requests, self._warm_hits
        load = engine_load(self.eng)
        return {
            "v": 1,
            "replica": self.replica_id,
            "model": self.eng.model_name,
            "device": "cuda" if self.cuda else "cpu",
            "buckets": list(self.eng.config.buckets),
            "warm_buckets": sorted(self.warm_set()),
            "capturing_buckets": sorted(self.eng.capturing_buckets()),
            "warm_batch_sizes": sorted(self.eng.warm_batch_sizes()),
            "queue_depth": load["running"] + load["waiting"],
            **load,
            "ttft_ms_p50": ttft,
            "warm_source": "cuda_graphs" if self.cuda else "cpu_served_standin",
            "requests": requests,
            "warm_hits": hits,
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metrics: the LatencyWindow snapshot (with each request's cost at the engine's full
        batch, mean_full_batch_ms) and the scheduler's load."""
        load = {k: float(v) for k, v in engine_load(self.eng).items()}   # running, waiting, free_slots, max_batch
        if self._window is None:
            return {"in_flight": float(self.queue_depth()), **load}
        self._window.set_in_flight(self.queue_depth())
        return {**self._window.snapshot(), **load}

    def check_health(self) -> None:
        """Fails (so Ray Serve replaces the replica) when the engine is shut down or stuck."""
        if getattr(self.eng, "_closed", False):
            raise RuntimeError("engine is shut down")
        age = self.eng.heartbeat_age_s()
        if age > self.cfg.engine_stuck_s:
            raise RuntimeError(f"engine stuck: no step for {age:.1f} s with requests in flight "
                               f"(engine_stuck_s {self.cfg.engine_stuck_s:g})")

    # ------------------------------------------------------------------ requests
    def _accept(self, req: Any) -> dict:
        """Count the request (warm hit or not); its meta for the answer."""
        if not isinstance(req, Request):
            raise EngineInputError("call the model deployment with an engine.request.Request (the hybridserve "
                                   "app builds one); from Python use the app handle instead")
        warm = req.bucket in self.warm_set()
        with self._lock:
            self._requests += 1
            self._warm_hits += warm
        return {"replica": self.replica_id, "bucket": req.bucket, "warm": warm, "prompt_tokens": req.n_tokens}

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

    async def generate(self, req: Request) -> dict:
        try:
            meta = self._accept(req)
            self._set_in_flight()
            res = await self.eng.generate_async(req)
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

    async def __call__(self, req: Request) -> dict:
        return await self.generate(req)

    async def stream(self, req: Request) -> AsyncIterator[dict]:
        """Yields ``{"text", "index", "token_id"}`` per token (the first also carries ``meta``),
        then ``{"text": "", "finish_reason", "usage", "meta"}``; or a single ``{"error"}``."""
        t_in = time.time()
        try:
            meta = self._accept(req)
        except EngineInputError as e:
            yield error_dict(e)
            return
        gen = self.eng.stream(req)
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
