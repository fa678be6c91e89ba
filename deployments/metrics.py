"""hybridserve's Prometheus metrics, exported through Ray's metrics agent.

Ray prefixes every exported name with ``ray_`` and serves them on each node's metrics export
port (``ray.init(_metrics_export_port=...)`` / ``ray start --metrics-export-port``), so
``hybridserve_ttft_seconds`` is scraped as ``ray_hybridserve_ttft_seconds_bucket`` etc.
Counters are named ``*_total`` (Ray keeps such names unchanged), durations are ``*_seconds``.

Entry points (all cheap, thread-safe, and never raise into the caller):

- :func:`observe_event` — the replica's engine listener: ``engine.add_listener(lambda ev:
  observe_event(ev, replica_id, model=engine.model_name))``. Events are those of
  docs/engine-contract.md (``request``, ``capture``, ``store``).
- :func:`set_queue_depth` — the replica, whenever its queue changes / on each stats report.
- :func:`observe_router_choice` — the request router, once per routing decision.

The mapping event -> samples is the pure function :func:`samples_for_event` (unit-testable
without Ray); Ray metric objects are created lazily, once per process, on first use.
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Any, Iterable

logger = logging.getLogger(__name__)

PREFIX = "hybridserve_"

# Latency boundaries in seconds: 1 ms .. 10 s (TTFT / queue), finer below 100 ms for TPOT,
# up to 120 s for end-to-end of long generations, and up to 10 min for graph capture.
LATENCY_BUCKETS_S = [
    0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0,
]
TPOT_BUCKETS_S = [
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03,
    0.04, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0,
]
E2E_BUCKETS_S = LATENCY_BUCKETS_S + [15.0, 20.0, 30.0, 60.0, 120.0]
CAPTURE_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]

REQ_TAGS = ("model", "replica", "bucket", "path")


@dataclass(frozen=True)
class MetricSpec:
    name: str                      # without the ray_ prefix
    kind: str                      # "counter" | "histogram" | "gauge"
    description: str
    tag_keys: tuple[str, ...]
    boundaries: tuple[float, ...] | None = None

    @property
    def exported(self) -> str:
        """The name Prometheus sees (histograms add _bucket/_sum/_count)."""
        return "ray_" + self.name


def _h(name: str, desc: str, tags: tuple[str, ...], buckets: list[float]) -> MetricSpec:
    return MetricSpec(PREFIX + name, "histogram", desc, tags, tuple(buckets))


def _c(name: str, desc: str, tags: tuple[str, ...]) -> MetricSpec:
    assert name.endswith("_total"), name
    return MetricSpec(PREFIX + name, "counter", desc, tags)


def _g(name: str, desc: str, tags: tuple[str, ...]) -> MetricSpec:
    return MetricSpec(PREFIX + name, "gauge", desc, tags)


SPECS: dict[str, MetricSpec] = {s.name: s for s in [
    _h("ttft_seconds", "Time to first token: request start to first token on host.",
       REQ_TAGS, LATENCY_BUCKETS_S),
    _h("tpot_seconds", "Time per output token (mean gap between tokens after the first), "
       "one observation per request with >= 2 output tokens.", REQ_TAGS, TPOT_BUCKETS_S),
    _h("e2e_seconds", "End-to-end engine latency of a request (start to last token).",
       REQ_TAGS, E2E_BUCKETS_S),
    _h("queue_wait_seconds", "Time a request waited for the engine before it started.",
       ("model", "replica"), LATENCY_BUCKETS_S),
    _c("requests_total", "Finished requests by prefill bucket and path: path=graph is a "
       "CUDA-graph hit, path=padded a replay of a larger warm bucket's graph, path=jit a JIT "
       "fallback (no warm graph fits), path=eager the CPU engine.",
       REQ_TAGS + ("finish_reason",)),
    _c("prompt_tokens_total", "Prompt tokens processed.", ("model", "replica")),
    _c("mixed_prompts_total", "Prompts that rode in a decode step (a mixed step: one pass over the prompt and the "
       "running streams) instead of a prefill of their own.", ("model", "replica")),
    _c("output_tokens_total", "Output tokens generated.", ("model", "replica")),
    _c("graph_captures_total", "Background CUDA-graph captures completed, by bucket.",
       ("model", "replica", "bucket")),
    _h("graph_capture_seconds", "Duration of one background CUDA-graph capture (with warm-up).",
       ("model", "replica"), CAPTURE_BUCKETS_S),
    _c("store_events_total", "Artifact-store events: action=load|publish|reject; reason is "
       "the rejection reason's kind (text before ':'), normalised.",
       ("model", "replica", "action", "reason")),
    _g("queue_depth", "Requests running or waiting on this replica's engine.",
       ("model", "replica")),
    _c("router_choices_total", "Routing decisions of the warm-bucket router: warm=true when the "
       "chosen replica had the request's bucket warm.", ("warm",)),
]}

# Exported by autoscale/ (listed so the dashboard and docs have one source of names).
AUTOSCALE_METRICS = {
    "hybridserve_autoscale_target_replicas": "gauge",
    "hybridserve_autoscale_decisions_total": "counter",        # {direction}
    "hybridserve_autoscale_fleet_p99_ttft_seconds": "gauge",
}


def _norm_reason(reason: Any) -> str:
    """Bounded-cardinality label from a free-text reason: its kind, e.g. 'hmac mismatch: ...'."""
    text = str(reason or "").split(":", 1)[0].strip().lower()
    text = re.sub(r"[^a-z0-9]+", "_", text).strip("_")
    return text[:40]


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def samples_for_event(event: dict, replica_id: str, model: str = "") -> list[tuple[str, float, dict[str, str]]]:
    """Pure mapping of one engine event to ``(metric name, value, tags)`` samples.

    Counters carry the increment, histograms the observation, gauges the value.
    Unknown event types map to no samples.
    """
    base = {"model": str(model or ""), "replica": str(replica_id)}
    etype = event.get("type")
    out: list[tuple[str, float, dict[str, str]]] = []
    if etype == "request":
        m = event["metrics"]
        tags = {**base, "bucket": str(_get(m, "bucket", "")), "path": str(_get(m, "path", "") or "")}
        out.append((PREFIX + "ttft_seconds", float(_get(m, "ttft_s", 0.0)), tags))
        gaps = list(_get(m, "token_times_s", None) or [])
        if gaps:
            out.append((PREFIX + "tpot_seconds", float(sum(gaps) / len(gaps)), tags))
        out.append((PREFIX + "e2e_seconds", float(_get(m, "e2e_s", 0.0)), tags))
        out.append((PREFIX + "queue_wait_seconds", float(_get(m, "queue_s", 0.0) or 0.0), base))
        out.append((PREFIX + "requests_total", 1.0,
                    {**tags, "finish_reason": str(event.get("finish_reason") or "")}))
        prompt_tokens = int(_get(m, "prompt_tokens", 0) or 0)
        if prompt_tokens > 0:
            out.append((PREFIX + "prompt_tokens_total", float(prompt_tokens), base))
        if _get(m, "mixed", False):
            out.append((PREFIX + "mixed_prompts_total", 1.0, base))
        output_tokens = int(event.get("output_tokens") or 0)
        if output_tokens > 0:
            out.append((PREFIX + "output_tokens_total", float(output_tokens), base))
    elif etype == "capture":
        out.append((PREFIX + "graph_captures_total", 1.0, {**base, "bucket": str(event.get("bucket", ""))}))
        seconds = event.get("seconds")
        if seconds is not None:
            out.append((PREFIX + "graph_capture_seconds", float(seconds), base))
    elif etype == "store":
        out.append((PREFIX + "store_events_total", 1.0,
                    {**base, "action": str(event.get("action", "")),
                     "reason": _norm_reason(event.get("reason"))}))
    return out


class _Registry:
    """Ray metric objects of this process, created on first use."""

    def __init__(self) -> None:
        from ray.util import metrics as rm   # deferred: importing this module must not need Ray

        self.objs: dict[str, Any] = {}
        for spec in SPECS.values():
            if spec.kind == "counter":
                obj = rm.Counter(spec.name, description=spec.description, tag_keys=spec.tag_keys)
            elif spec.kind == "gauge":
                obj = rm.Gauge(spec.name, description=spec.description, tag_keys=spec.tag_keys)
            else:
                obj = rm.Histogram(spec.name, description=spec.description,
                                   boundaries=list(spec.boundaries or ()), tag_keys=spec.tag_keys)
            self.objs[spec.name] = obj

    def record(self, name: str, value: float, tags: dict[str, str]) -> None:
        kind = SPECS[name].kind
        obj = self.objs[name]
        if kind == "counter":
            if value > 0:
                obj.inc(value, tags=tags)
        elif kind == "gauge":
            obj.set(value, tags=tags)
        else:
            obj.observe(max(float(value), 0.0), tags=tags)


_registry: _Registry | None = None
_lock = threading.Lock()
_warned: set[str] = set()


def _reg() -> _Registry:
    global _registry
    if _registry is None:
        with _lock:
            if _registry is None:
                _registry = _Registry()
    return _registry


def _record_all(samples: Iterable[tuple[str, float, dict[str, str]]], where: str) -> None:
    try:
        reg = _reg()
        for name, value, tags in samples:
            reg.record(name, value, tags)
    except Exception as exc:   # metrics must never break serving
        if where not in _warned:
            _warned.add(where)
            logger.warning("hybridserve metrics: %s failed: %r (further failures not logged)", where, exc)


def observe_event(event: dict, replica_id: str, model: str = "") -> None:
    """Record one engine listener event (request / capture / store) of ``replica_id``."""
    try:
        samples = samples_for_event(event, replica_id, model)
    except Exception as exc:
        if "event" not in _warned:
            _warned.add("event")
            logger.warning("hybridserve metrics: bad engine event %r: %r", event, exc)
        return
    _record_all(samples, "observe_event")


def set_queue_depth(n: int, replica_id: str, model: str = "") -> None:
    """Set the replica's engine queue depth (running + waiting requests)."""
    _record_all([(PREFIX + "queue_depth", float(n),
                  {"model": str(model or ""), "replica": str(replica_id)})], "set_queue_depth")


def observe_router_choice(warm: bool) -> None:
    """Count one routing decision; ``warm`` = the chosen replica had the bucket warm."""
    _record_all([(PREFIX + "router_choices_total", 1.0, {"warm": "true" if warm else "false"})],
                "observe_router_choice")
