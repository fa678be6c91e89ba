"""Per-replica sliding window of request latencies.

The model replica feeds it (``record`` once per finished request, ``set_in_flight`` whenever
its in-flight count changes) and returns ``snapshot()`` from Ray Serve's
``record_autoscaling_stats`` hook.  The snapshot is what the autoscaling policy
(``autoscale.ray_policy``) reads back as per-replica custom metrics.

Snapshot contract (every value a plain ``float``; Ray Serve disables custom autoscaling
metrics for the life of the replica if the first snapshot holds anything but int/float):

===============  =====================================================================
key              meaning
===============  =====================================================================
``p99_ttft_ms``  P99 time-to-first-token of the requests finished in the window (ms)
``p99_e2e_ms``   P99 end-to-end latency of the requests finished in the window (ms)
``request_rate`` requests finished per second over the window
``in_flight``    requests running or waiting on this replica right now
``samples``      number of requests in the window (the P99s are 0.0 when this is 0)
``mean_service_ms`` mean time a request of the window held the engine (e2e less its wait
                 for the engine); with ``in_flight`` it predicts the TTFT of requests
                 queued now, before they finish (the policy's ``queue_signal``)
``mean_full_batch_ms`` mean cost of a request of the window at full batch (its prefill + its other
                 tokens' decode steps at the engine's full batch / the batch's rows: engine/scheduler.py
                 ``full_batch_cost_ms``), over the requests recorded with one; 0.0 when none was
                 (the policy then reads the replica's slots instead, ``busy_per_slot``)
``p99_ttft_recent_ms`` / ``p99_e2e_recent_ms`` / ``recent_samples``: the same over the
                 last ``recent_s`` seconds only (default window_s / 6).  The policy uses
                 them to confirm a breach is still happening, so a short spike isn't
                 acted on for the whole time its slow samples sit in the long window.
===============  =====================================================================

P99 is the nearest-rank percentile (below 100 samples that is the maximum), never
interpolated and never NaN.  No Ray import: this module is plain Python.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Callable, Deque, Dict, Optional, Tuple

#: keys of :meth:`LatencyWindow.snapshot`, in a stable order.
SNAPSHOT_KEYS = (
    "p99_ttft_ms",
    "p99_e2e_ms",
    "request_rate",
    "in_flight",
    "samples",
    "mean_service_ms",
    "mean_full_batch_ms",
    "p99_ttft_recent_ms",
    "p99_e2e_recent_ms",
    "recent_samples",
)


def percentile(values, q: float) -> float:
    """Nearest-rank percentile of ``values`` (0.0 when empty). ``q`` in (0, 100]."""
    n = len(values)
    if n == 0:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * n))
    return float(ordered[min(rank, n) - 1])


class LatencyWindow:
    """Thread-safe sliding window of (time, ttft, e2e) samples.

    Args:
        window_s: length of the window in seconds.
        recent_s: length of the "recent" sub-window (default ``window_s / 6``).
        max_samples: hard cap on the samples kept (oldest dropped first) so a burst can't
            grow memory without bound; the P99 then covers the newest ``max_samples``.
        clock: monotonic clock in seconds (injectable for tests).
    """

    def __init__(
        self,
        window_s: float = 30.0,
        recent_s: Optional[float] = None,
        max_samples: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        if max_samples <= 0:
            raise ValueError(f"max_samples must be > 0, got {max_samples}")
        self.window_s = float(window_s)
        self.recent_s = min(self.window_s, float(recent_s) if recent_s else self.window_s / 6.0)
        if self.recent_s <= 0:
            raise ValueError(f"recent_s must be > 0, got {recent_s}")
        self._clock = clock
        self._lock = threading.Lock()
        self._samples: Deque[Tuple[float, float, float, float, float]] = deque(maxlen=max_samples)
        self._in_flight = 0
        self._started = clock()

    # ------------------------------------------------------------------ feeding
    def record(self, ttft_s: float, e2e_s: float, now: Optional[float] = None,
               service_s: Optional[float] = None, full_batch_s: Optional[float] = None) -> None:
        """Record one finished request (latencies in seconds). service_s: the time it held the
        engine (default e2e_s, i.e. no wait); full_batch_s: its cost at full batch (None: not
        known; a broken one is dropped alone)."""
        ttft_s = float(ttft_s)
        e2e_s = float(e2e_s)
        service_s = e2e_s if service_s is None else float(service_s)
        if not all(math.isfinite(v) and v >= 0 for v in (ttft_s, e2e_s, service_s)):
            return  # a broken measurement must not poison the P99
        cost = math.nan if full_batch_s is None else float(full_batch_s)
        if not (math.isfinite(cost) and cost > 0):
            cost = math.nan                 # nan: no cost for this request
        t = self._clock() if now is None else float(now)
        with self._lock:
            self._samples.append((t, ttft_s, e2e_s, service_s, cost))

    def set_in_flight(self, n: int) -> None:
        """Set the replica's current in-flight (running + waiting) request count."""
        with self._lock:
            self._in_flight = max(0, int(n))

    # ----------------------------------------------------------------- reading
    def snapshot(self, now: Optional[float] = None) -> Dict[str, float]:
        """The window's statistics as ``{key: float}`` (see module docstring)."""
        t = self._clock() if now is None else float(now)
        cutoff = t - self.window_s
        with self._lock:
            while self._samples and self._samples[0][0] < cutoff:
                self._samples.popleft()
            rows = [s for s in self._samples if s[0] <= t]
            in_flight = self._in_flight
        n = len(rows)
        recent_cut = t - self.recent_s
        recent = [r for r in rows if r[0] >= recent_cut]
        # Rate over the part of the window the replica has been alive for, so a fresh
        # replica doesn't under-report by dividing by the full window.
        span = min(self.window_s, max(t - self._started, 1e-3))
        costs = [r[4] for r in rows if r[4] == r[4]]          # those recorded with one (not nan)
        return {
            "p99_ttft_ms": percentile([r[1] for r in rows], 99) * 1000.0,
            "p99_e2e_ms": percentile([r[2] for r in rows], 99) * 1000.0,
            "request_rate": n / span,
            "in_flight": float(in_flight),
            "samples": float(n),
            "mean_service_ms": (sum(r[3] for r in rows) / n * 1000.0) if n else 0.0,
            "mean_full_batch_ms": (sum(costs) / len(costs) * 1000.0) if costs else 0.0,
            "p99_ttft_recent_ms": percentile([r[1] for r in recent], 99) * 1000.0,
            "p99_e2e_recent_ms": percentile([r[2] for r in recent], 99) * 1000.0,
            "recent_samples": float(len(recent)),
        }

    def __len__(self) -> int:
        with self._lock:
            return len(self._samples)
