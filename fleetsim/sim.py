"""Discrete-event simulation of a Ray Serve fleet of model replicas (simpy).

What is simulated, per request: the router's choice (the project's ``choose_replicas``) among the
running replicas as their routing stats and the router's own load count show them; the replica's
queue (KV slots: one at batch 1, a FIFO), its prefill by path (graph / padded / JIT) and decode
steps; the background capture a cold bucket starts; the replica's ``LatencyWindow``. Per control
tick: the autoscaling policy (the project's ``decide`` or Ray's queue-length policy) on the metrics
the replicas pushed, and replicas starting (seeded or cold) and stopping.

Coarsening (what keeps 1,000 replicas fast, docs/simulation.md): a replica's queue is solved when
a request arrives (a FIFO's start time is max(arrival, earliest free slot)), so a request costs one
event, not one per token; the router ranks ``candidates`` replicas (all of them up to that many,
else a random sample plus replicas warm for the bucket) instead of the whole fleet; metrics are
pushed by all replicas at once every ``metrics_interval_s``.
"""
from __future__ import annotations

import heapq
import math
import random
from array import array
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import simpy

from fleetsim import adapters
from fleetsim.batched import BatchedEngine
from fleetsim.model import PlatformModel, ReplicaModel


@dataclass
class SimConfig:
    model: ReplicaModel
    platform: PlatformModel = field(default_factory=PlatformModel)
    policy: Callable = None                 # adapters.P99Policy / QueueLengthPolicy instance
    min_replicas: int = 1
    max_replicas: int = 2
    initial_replicas: int = 1
    max_tokens: int = 32
    http_overhead_ms: float = 3.0           # client TTFT - engine TTFT (constant)
    seeded: bool = True                     # new replicas load the artifact store
    store_buckets: Optional[Sequence[int]] = None   # buckets the store holds (None: all)
    router: str = "warm_bucket"             # or "po2": Ray's default power of two choices
    candidates: int = 16                    # replicas ranked per request (coarsening)
    tick_s: float = 0.1                     # autoscaling control loop
    seed: int = 0
    imbalance_threshold: int = 2
    decode_jitter: float = 0.0              # per-request sigma of the decode step, relative
    overhead_jitter_ms: float = 0.0         # per-request sigma of the HTTP overhead (ms, >= 0 kept)
    slow: Dict[str, float] = field(default_factory=dict)   # replica id -> service-time factor (stragglers)


class Replica:
    __slots__ = ("id", "ready_at", "warm", "capturing", "slots", "finishes", "window", "stats",
                 "ongoing", "stopping", "served", "first_graph_t", "last_finish", "engine")

    def __init__(self, rid: str, ready_at: float, warm: Iterable[int], n_slots: int, clock, window_s: float):
        self.id = rid
        self.ready_at = ready_at
        self.warm = set(warm)
        self.capturing: Dict[int, float] = {}     # bucket -> time its graph is ready
        self.slots = [ready_at] * n_slots          # heap: when each KV slot is next free
        self.finishes: List[float] = []            # heap of finish times of admitted requests
        self.window = adapters.LatencyWindow(window_s, clock=clock)
        self.stats: dict = {"warm_buckets": sorted(self.warm), "capturing_buckets": [], "queue_depth": 0}
        self.ongoing: List[float] = []             # Ray's ongoing-requests samples (look-back)
        self.stopping = False
        self.served = 0
        self.first_graph_t: Optional[float] = None
        self.last_finish = ready_at
        self.engine: Optional[BatchedEngine] = None   # batched replicas (max_batch > 1)

    def in_flight(self, t: float) -> int:
        if self.engine is not None:
            self.engine.advance(t)
            return self.engine.in_flight()
        f = self.finishes
        while f and f[0] <= t:
            heapq.heappop(f)
        return len(f)

    def warm_at(self, t: float) -> set:
        done = [b for b, at in self.capturing.items() if at <= t]
        for b in done:
            self.warm.add(b)
            del self.capturing[b]
        return self.warm


class Simulation:
    """One run: ``Simulation(cfg).run(arrivals, until)`` or with closed-loop users."""

    def __init__(self, cfg: SimConfig):
        self.cfg = cfg
        self.env = simpy.Environment()
        self.rng = random.Random(cfg.seed)
        self.route_rng = random.Random(cfg.seed + 1)
        self.m = cfg.model
        self.p = cfg.platform
        self.replicas: Dict[str, Replica] = {}     # running (routable)
        self.starting: List[Tuple[float, str]] = []  # (ready_at, id)
        self.stopped: List[Replica] = []
        self.target = cfg.initial_replicas
        self.hints: Dict[str, Dict[int, float]] = {}
        self._n = 0
        self._ids_cache: Optional[List[str]] = None
        self.warm_lists: Dict[int, List[str]] = {}
        # per request (compact arrays)
        self.r_arrival = array("d")
        self.r_first = array("d")
        self.r_ttft = array("d")
        self.r_warm = array("b")
        self.r_replica = array("l")
        # time series
        self.series: List[tuple] = []              # (t, running, target, allocated)
        self.events: List[dict] = []               # scaling actions
        self.gpu_seconds = 0.0
        self._last_account = 0.0
        self.decisions: List[tuple] = []
        # a batched replica's decode step at its full batch, from the model's step table as the engine reads its own
        self.full_step_ms = adapters.full_batch_step_ms(self.m.decode_ms, self.m.max_batch)
        store = set(self.m.buckets if cfg.store_buckets is None else cfg.store_buckets)
        self._store = store
        for _ in range(cfg.initial_replicas):
            self._add_replica(0.0, ready_at=0.0)

    # --------------------------------------------------------------- fleet
    def _add_replica(self, now: float, ready_at: Optional[float] = None) -> None:
        self._n += 1
        rid = f"r{self._n}"
        if ready_at is None:
            ready_at = now + (self.m.start_seeded_s if self.cfg.seeded else self.m.start_cold_s)
        warm = self._store if self.cfg.seeded else ()
        rep = Replica(rid, ready_at, warm, self.m.max_batch, lambda: self.env.now, self.p.latency_window_s)
        if self.m.max_batch > 1:
            rep.engine = BatchedEngine(self.m, self.cfg.max_tokens, ready_at, rep.warm_at,
                                       lambda req, start, first, path, rode=0.0, rep=rep:
                                       self._admitted(rep, req, start, first, path, rode),
                                       lambda req, t, rep=rep: self._finished(rep, req, t))
        if ready_at <= now:
            self.replicas[rid] = rep
            self._ids_cache = None
        else:
            heapq.heappush(self.starting, (ready_at, rid))
            self._pending = getattr(self, "_pending", {})
            self._pending[rid] = rep

    def allocated(self) -> int:
        return len(self.replicas) + len(self.starting)

    def _account(self, now: float) -> None:
        # GPU-seconds: every replica started or running, plus stopped ones until they drained
        self.gpu_seconds += (now - self._last_account) * self.allocated()
        self._last_account = now

    def _apply_target(self, now: float, target: int) -> None:
        cur = self.allocated()
        if target > cur:
            for _ in range(target - cur):
                self._add_replica(now)
            self.events.append({"t": now, "from": cur, "to": target})
        elif target < cur:
            # Ray stops starting replicas first, then the newest running ones
            n = cur - target
            while n and self.starting:
                _, rid = self.starting.pop()          # latest ready_at
                heapq.heapify(self.starting)
                self._pending.pop(rid, None)
                n -= 1
            for rid in sorted(self.replicas, key=lambda r: self.replicas[r].ready_at, reverse=True)[:n]:
                rep = self.replicas.pop(rid)
                self._ids_cache = None
                rep.stopping = True
                if rep.engine is not None:
                    rep.engine.advance(math.inf)                      # no more arrivals: drain it now
                self.gpu_seconds += max(0.0, rep.last_finish - now)   # drains its in-flight requests
                self.stopped.append(rep)
                self.hints.pop(rid, None)
            self.events.append({"t": now, "from": cur, "to": target})
        self.target = target

    # ------------------------------------------------------------ requests
    def request(self, n_tokens: int, t: float) -> Tuple[float, float]:
        """Route and serve one request arriving at ``t``: (client TTFT s, e2e s)."""
        bucket = adapters.bucket_for(n_tokens, self.m.buckets)
        reps = self.replicas
        if not reps:                                    # nothing running yet: wait for the first
            t0 = min(at for at, _ in self.starting) if self.starting else t
            rep_t = max(t, t0)
            self._promote(rep_t)
            return self._serve(next(iter(self.replicas.values())), bucket, t, rep_t)
        rep = self._choose(bucket, t)
        return self._serve(rep, bucket, t, t)

    def _choose(self, bucket: int, t: float) -> Replica:
        reps = self.replicas
        k = self.cfg.candidates
        if len(reps) <= k:
            cands = list(reps.values())
        else:
            ids = self._ids()                              # sample without building views for all
            pick = dict.fromkeys(self.rng.sample(ids, k // 2))   # ordered: no hash-seed dependence
            warm = self.warm_lists.get(bucket) or []
            if warm:
                for rid in self.rng.sample(warm, min(len(warm), k - len(pick))):
                    if rid in reps:
                        pick[rid] = None
            while len(pick) < k:
                pick[ids[self.rng.randrange(len(ids))]] = None
            cands = [reps[r] for r in pick]
        if self.cfg.router == "po2":
            pair = self.route_rng.sample(cands, min(2, len(cands)))
            return min(pair, key=lambda r: r.in_flight(t))
        views = [adapters.view(r.id, r.stats, self.p.max_ongoing_requests, r.in_flight(t),
                               self.hints.get(r.id), t, self.p.hint_ttl_s) for r in cands]
        order = adapters.route(bucket, views, self.route_rng, self.cfg.imbalance_threshold)
        chosen = reps[order[0].id]
        if bucket not in order[0].warm:                   # the adapter's hint for a cold placement
            self.hints.setdefault(chosen.id, {})[bucket] = t
        return chosen

    def _ids(self) -> List[str]:
        if self._ids_cache is None:                # reset whenever the routable set changes
            self._ids_cache = list(self.replicas)
        return self._ids_cache

    def _serve(self, rep: Replica, bucket: int, t: float, avail: float) -> Tuple[float, float]:
        if rep.engine is not None:                      # batched: its engine reports first token and end
            self.r_arrival.append(t)
            self.r_first.append(math.nan)
            self.r_ttft.append(math.nan)
            self.r_warm.append(0)
            self.r_replica.append(int(rep.id[1:]))
            rep.engine.arrive([len(self.r_arrival) - 1, t, bucket, t, 0.0, 0.0], t)
            return math.nan, math.nan
        start = max(avail, heapq.heappop(rep.slots))
        warm = rep.warm_at(start)
        pre_ms, path = self.m.prefill_ms(bucket, warm)
        step = self.m.decode_ms[1]
        if self.cfg.decode_jitter:
            step *= max(0.5, self.rng.gauss(1.0, self.cfg.decode_jitter))
        if self.cfg.slow:
            f = self.cfg.slow.get(rep.id, 1.0)
            pre_ms, step = pre_ms * f, step * f
        service = (pre_ms + (self.cfg.max_tokens - 1) * step) / 1000.0
        finish = start + service
        heapq.heappush(rep.slots, finish)
        heapq.heappush(rep.finishes, finish)
        rep.last_finish = max(rep.last_finish, finish)
        ttft = start - t + pre_ms / 1000.0
        e2e = finish - t
        rep.window.record(ttft, e2e, now=finish, service_s=service)
        rep.served += 1
        if path != "graph" and bucket not in rep.capturing:
            rep.capturing[bucket] = finish + self.m.capture_ms[bucket] / 1000.0   # next idle gap
        elif path == "graph" and rep.first_graph_t is None:
            rep.first_graph_t = t + ttft
        oh = self.cfg.http_overhead_ms
        if self.cfg.overhead_jitter_ms:
            oh = max(0.0, self.rng.gauss(oh, self.cfg.overhead_jitter_ms))
        cttft = ttft + oh / 1000.0
        self.r_arrival.append(t)
        self.r_first.append(t + cttft)
        self.r_ttft.append(cttft * 1000.0)
        self.r_warm.append(1 if path == "graph" else 0)
        self.r_replica.append(int(rep.id[1:]))
        return cttft, e2e + oh / 1000.0

    def _admitted(self, rep: Replica, req: list, start: float, first: float, path: str, rode: float = 0.0) -> None:
        """A batched replica's engine ran the prefill of ``req`` ([index, arrival, bucket, admitted,
        ttft, rode]) from ``start`` to its first token at ``first``; rode: a mixed prompt's decode step without it."""
        i, t, bucket = req[0], req[1], req[2]
        req[3], req[4], req[5] = start, first - t, rode
        oh = self.cfg.http_overhead_ms
        if self.cfg.overhead_jitter_ms:
            oh = max(0.0, self.rng.gauss(oh, self.cfg.overhead_jitter_ms))
        self.r_first[i] = first + oh / 1000.0
        self.r_ttft[i] = (first - t) * 1000.0 + oh
        self.r_warm[i] = 1 if path == "graph" else 0
        rep.served += 1
        if path != "graph" and bucket not in rep.capturing:     # warm after this request ends
            rest = rep.engine.decode_steps * self.m.step_ms(max(1, rep.engine.running())) / 1000.0
            rep.capturing[bucket] = first + rest + self.m.capture_ms[bucket] / 1000.0
        elif path == "graph" and rep.first_graph_t is None:
            rep.first_graph_t = first

    def _finished(self, rep: Replica, req: list, t: float) -> None:
        # the server's service time: e2e less the wait before the engine admitted it; its cost at full batch:
        # its prefill (admission -> first token, less the step a mixed prompt rode in) and its other tokens at the
        # full batch's step, as the server's
        cost = adapters.full_batch_cost_ms((req[1] + req[4] - req[3] - req[5]) * 1000.0, self.cfg.max_tokens,
                                           self.full_step_ms, self.m.max_batch)
        rep.window.record(req[4], t - req[1], now=t, service_s=t - req[3], full_batch_s=cost / 1000.0)
        rep.last_finish = max(rep.last_finish, t)

    # ------------------------------------------------------------ control
    def _promote(self, now: float) -> None:
        while self.starting and self.starting[0][0] <= now:
            _, rid = heapq.heappop(self.starting)
            rep = self._pending.pop(rid)
            self.replicas[rid] = rep
            self._ids_cache = None

    def _control(self):
        env, p = self.env, self.p
        next_metrics = 0.0
        next_stats = 0.0
        snaps: Dict[str, dict] = {}
        while True:
            now = env.now
            self._account(now)
            self._promote(now)
            if now + 1e-9 >= next_stats:                  # routing stats reach the router
                self.warm_lists = {}
                for rep in self.replicas.values():
                    w = rep.warm_at(now)
                    rep.stats = {"warm_buckets": sorted(w), "capturing_buckets": sorted(rep.capturing),
                                 "queue_depth": rep.in_flight(now)}
                    for b in w:
                        self.warm_lists.setdefault(b, []).append(rep.id)
                next_stats = now + p.routing_stats_period_s
            if now + 1e-9 >= next_metrics:                # replicas push autoscaling metrics
                snaps = {}
                keep = int(round(p.look_back_period_s / p.metrics_interval_s))
                for rep in self.replicas.values():
                    n = rep.in_flight(now)
                    rep.window.set_in_flight(n)
                    snaps[rep.id] = {**rep.window.snapshot(now), "max_batch": float(self.m.max_batch)}
                    rep.ongoing.append(n)
                    del rep.ongoing[:-keep]
                next_metrics = now + p.metrics_interval_s
            ongoing = float(sum(sum(r.ongoing) / len(r.ongoing) for r in self.replicas.values() if r.ongoing))
            cur = len(self.replicas)
            if len(snaps) != len(self.replicas) or any(rid not in self.replicas for rid in snaps):
                snaps = {rid: s for rid, s in snaps.items() if rid in self.replicas}
            snaps_now = snaps
            target = self.cfg.policy(now, snaps_now, cur, self.target, self.cfg.min_replicas,
                                     self.cfg.max_replicas, ongoing)
            if target != self.target:
                self._apply_target(now, target)
            self.series.append((now, cur, self.target, self.allocated()))
            yield env.timeout(self.cfg.tick_s)

    # --------------------------------------------------------------- load
    def _open_loop(self, times: np.ndarray, lengths: np.ndarray):
        env = self.env
        req = self.request
        prev = 0.0
        for t, n in zip(times.tolist(), lengths.tolist()):
            if t > prev:
                yield env.timeout(t - prev)
                prev = t
            req(n, env.now)

    def _user(self, rps: float, phases: Sequence[Tuple[float, float]], draw: Callable, start_delay: float):
        """A Locust user with ``constant_throughput(rps)``: one request at a time, then it waits
        1/rps less the request's own time (0 when the request took longer)."""
        env = self.env
        yield env.timeout(start_delay)
        t_from, t_to = phases
        if env.now < t_from:
            yield env.timeout(t_from - env.now)
        while env.now < t_to:
            t0 = env.now
            _, e2e = self.request(draw(self.rng), t0)
            yield env.timeout(e2e)
            wait = max(0.0, 1.0 / rps - (env.now - t0))
            if wait:
                yield env.timeout(wait)

    def run(self, until: float, arrivals: Optional[Tuple[np.ndarray, np.ndarray]] = None,
            users: Sequence[Tuple[float, Tuple[float, float], Callable, float]] = ()) -> "Simulation":
        self.env.process(self._control())
        if arrivals is not None:
            self.env.process(self._open_loop(*arrivals))
        for rps, phases, draw, delay in users:
            self.env.process(self._user(rps, phases, draw, delay))
        self.env.run(until=until)
        self._account(until)
        for rep in self.replicas.values():          # batched: every admitted request's first token
            if rep.engine is not None:
                rep.engine.advance(math.inf)
        return self

    # ------------------------------------------------------------- output
    def rolling_p99(self, t0: float, t1: float, window_s: float = 10.0, step_s: float = 1.0):
        """[(t, p99 ms or None, n)]: P99 of the client TTFTs whose first token fell in (t - window, t],
        nearest rank as bench/fleet.py's pct; evaluated every step_s as its step analysis does."""
        first = np.frombuffer(self.r_first, dtype=np.float64)
        ttft = np.frombuffer(self.r_ttft, dtype=np.float64)
        order = np.argsort(first, kind="stable")
        first, ttft = first[order], ttft[order]
        out = []
        t = t0 + step_s
        while t <= t1 + 1e-9:
            lo = np.searchsorted(first, t - window_s, side="right")
            hi = np.searchsorted(first, t, side="right")
            n = hi - lo
            if n:
                k = max(1, min(n, int(round(0.99 * n + 0.5))))
                p = float(np.partition(ttft[lo:hi], k - 1)[k - 1])
            else:
                p = None
            out.append((round(t, 3), p, int(n)))
            t += step_s
        return out
