"""Warm-bucket routing: a pure choice function plus the thin Ray Serve RequestRouter around it.

The model replicas report (record_routing_stats, see deployments/server.py) which prefill buckets
they hold a warm CUDA graph for. A prompt whose bucket is warm on some replica should go there:
graph replay is the fast path; any other replica would serve it by JIT.

The policy, :func:`choose_replicas`, is a pure function of (bucket, replica views, rng):

1. Replicas at capacity (load >= max_load) go last, in load order.
2. Among the others, the replicas warm for the bucket compete by "power of two choices": two are
   sampled at random and the less loaded one is preferred (the other comes next).
3. Spill: if even that best warm replica carries more than ``imbalance_threshold`` requests above
   the least-loaded cold replica, the cold one goes first (it serves by JIT and warms the bucket).
4. With no warm replica: least loaded first; ties prefer a replica already capturing the bucket,
   then the one with fewer warm + capturing buckets (spreads capture work), then random.

The result is a full preference order; the adapter hands it to Ray as singleton ranks, so Ray only
enforces capacity (it probes/caches queue lengths and moves to the next rank if a replica is full).
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Sequence

logger = logging.getLogger("ray.serve")

@dataclass(frozen=True)
class ReplicaView:
    """What the policy knows about one replica."""

    id: str
    load: int = 0                                  # ongoing + queued requests
    warm: frozenset[int] = frozenset()             # buckets with a warm graph
    capturing: frozenset[int] = frozenset()        # buckets being captured (or just sent here cold)
    max_load: int | None = None                    # max_ongoing_requests; None = unbounded


def view_from_stats(rid: str, stats: dict | None, max_load: int | None, *, load: int | None = None,
                    hints: dict[int, float] | None = None, now: float = 0.0,
                    hint_ttl_s: float = 10.0) -> ReplicaView:
    """A replica's view from its routing stats (``ModelServer.record_routing_stats``): ``load`` when
    known (else the reported queue depth); ``hints`` ({bucket: time sent there cold}, fresher than
    ``hint_ttl_s``) count as capturing, since the stats lag a cold placement."""
    stats = stats or {}
    fresh = {b for b, t in (hints or {}).items() if now - t <= hint_ttl_s}
    return ReplicaView(id=rid, load=int(stats.get("queue_depth", 0) if load is None else load),
                       warm=frozenset(stats.get("warm_buckets", ())),
                       capturing=frozenset(stats.get("capturing_buckets", ())) | fresh,
                       max_load=max_load)


def choose_replicas(bucket: int, replicas: Sequence[ReplicaView], rng: random.Random, *,
                    imbalance_threshold: int = 2) -> list[ReplicaView]:
    """Order ``replicas`` by preference for a prompt of prefill bucket ``bucket`` (see module doc)."""
    if not replicas:
        return []
    available = [r for r in replicas if r.max_load is None or r.load < r.max_load]
    full = sorted((r for r in replicas if not (r.max_load is None or r.load < r.max_load)),
                  key=lambda r: r.load)
    warm = [r for r in available if bucket in r.warm]
    cold = [r for r in available if bucket not in r.warm]
    # Random tie-break keys drawn once per replica, in input order, so the result depends only on
    # (inputs, rng state).
    tie = {r.id: rng.random() for r in available}

    def cold_key(r: ReplicaView):
        return (r.load, bucket not in r.capturing, len(r.warm | r.capturing), tie[r.id])

    cold.sort(key=cold_key)
    if warm:
        if len(warm) >= 2:
            a, b = rng.sample(warm, 2)
            pair = [a, b] if a.load <= b.load else [b, a]
        else:
            pair = [warm[0]]
        rest_warm = sorted((r for r in warm if r not in pair), key=lambda r: (r.load, tie[r.id]))
        order = pair + rest_warm + cold
        if cold and pair[0].load - cold[0].load > imbalance_threshold:
            order = [cold[0]] + [r for r in order if r is not cold[0]]
    else:
        order = cold
    return order + full


class WarmBucketPolicy:
    """The warm-bucket choice with its memory: :func:`choose_replicas` over the replicas' views, plus the
    hints of recent cold placements (a bucket just sent to a cold replica counts as capturing there for
    ``hint_ttl_s``, covering the lag until its stats report it). Used by the Ray router and by the
    local-first replicas alike."""

    def __init__(self, imbalance_threshold: int = 2, hint_ttl_s: float = 10.0, seed: int | None = None):
        self.imbalance_threshold = int(imbalance_threshold)
        self.hint_ttl_s = float(hint_ttl_s)
        self.rng = random.Random(seed)
        self.hints: dict[str, dict[int, float]] = {}    # replica id -> {bucket: time sent there cold}

    def view(self, rid: str, stats: dict | None, max_load: int | None, load: int | None = None,
             now: float | None = None) -> ReplicaView:
        return view_from_stats(rid, stats, max_load, load=load, hints=self.hints.get(rid),
                               now=time.monotonic() if now is None else now, hint_ttl_s=self.hint_ttl_s)

    def rank(self, bucket: int, views: Sequence[ReplicaView]) -> list[ReplicaView]:
        return choose_replicas(bucket, views, self.rng, imbalance_threshold=self.imbalance_threshold)

    @staticmethod
    def first_with_room(order: Sequence[ReplicaView]) -> ReplicaView | None:
        return next((v for v in order if v.max_load is None or v.load < v.max_load), None)

    def placed(self, rid: str, bucket: int, warm: bool) -> None:
        """Count the warm/cold choice; remember a cold placement so the next prompts of that bucket
        follow it until the replica's stats report the bucket."""
        try:
            from deployments.metrics import observe_router_choice
            observe_router_choice(warm)
        except Exception:  # metrics never break routing
            pass
        if not warm:
            self.hints.setdefault(rid, {})[bucket] = time.monotonic()

    def keep(self, live: set[str]) -> None:
        """Forget replicas that are gone and hints older than hint_ttl_s."""
        now = time.monotonic()
        for rid in list(self.hints):
            if rid not in live:
                del self.hints[rid]
            else:
                self.hints[rid] = {b: t for b, t in self.hints[rid].items() if now - t <= self.hint_ttl_s}


# --------------------------------------------------------------------------- Ray Serve adapter
try:  # deployments/ may be imported without Ray (pure tests); the adapter needs it.
    from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica
except ImportError:  # pragma: no cover
    RequestRouter = object  # type: ignore[misc,assignment]
    FIFOMixin = type("FIFOMixin", (), {})  # type: ignore[misc,assignment]
    PendingRequest = RunningReplica = Any  # type: ignore[misc,assignment]


def bucket_of(pending_request: Any) -> int | None:
    """The prompt's prefill bucket: the ``bucket`` of the engine.request.Request the call carries."""
    if pending_request is None or not pending_request.args:
        return None
    b = getattr(pending_request.args[0], "bucket", None)
    return b if isinstance(b, int) and not isinstance(b, bool) else None


# Requests between choose_replicas and on_request_routed that the router remembers (a bound, not a
# batch size: a replica holds a handful in flight; the rest are requests whose hook never fires).
MAX_PENDING_BUCKETS = 4096


class WarmBucketRouter(FIFOMixin, RequestRouter):  # type: ignore[misc,valid-type]
    """Ray Serve 2.60 RequestRouter (alpha API) that applies :class:`WarmBucketPolicy`.

    FIFO when every replica is full: a freed slot goes to the oldest waiting request, not to
    whichever request probes first (a new one, while the old ones sleep in backoff).

    Configured via the deployment's ``request_router_config`` with ``request_router_class:
    deployments.router:WarmBucketRouter`` and ``request_router_kwargs`` (``imbalance_threshold``,
    ``hint_ttl_s``, ``seed``). Reads each replica's ``RunningReplica.routing_stats`` (what
    ModelServer.record_routing_stats returned) and the request's bucket (:func:`bucket_of`).
    """

    def initialize_state(self, imbalance_threshold: int = 2, hint_ttl_s: float = 10.0,
                         seed: int | None = None, **_: Any) -> None:
        self.policy = WarmBucketPolicy(imbalance_threshold, hint_ttl_s, seed)
        self._bucket_of_request: dict[str, int] = {}

    def _ensure_state(self) -> None:
        if not hasattr(self, "policy"):
            self.initialize_state()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        self._ensure_state()
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # back off between rounds when every replica is full (as Ray's own routers do)
            pending_request.routing_context.should_backoff = True
        bucket = bucket_of(pending_request)
        if bucket is None:
            # no bucket (e.g. an HTTP request of the colocated topology): plain power of two choices
            return [self.policy.rng.sample(list(candidate_replicas), min(2, len(candidate_replicas)))]
        now = time.monotonic()
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        views = [self.policy.view(rid, r.routing_stats, r.max_ongoing_requests,
                                  load=self._replica_queue_len_cache.get(r.replica_id), now=now)
                 for rid, r in by_id.items()]
        order = self.policy.rank(bucket, views)
        if pending_request is not None:
            self._remember_bucket(pending_request.metadata.internal_request_id, bucket)
        return [[by_id[v.id]] for v in order]

    def _remember_bucket(self, request_id: str, bucket: int) -> None:
        """Keep the request's bucket for ``on_request_routed``; only the newest MAX_PENDING_BUCKETS
        entries, should requests be routed without that hook firing."""
        d = self._bucket_of_request
        d[request_id] = bucket
        while len(d) > MAX_PENDING_BUCKETS:
            del d[next(iter(d))]        # dicts keep insertion order: this is the oldest

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        """Remember a cold placement so the next prompts of that bucket follow it (stats lag)."""
        self._ensure_state()
        bucket = self._bucket_of_request.pop(pending_request.metadata.internal_request_id, None)
        if bucket is None:
            return
        replica = self._replicas.get(replica_id)
        stats = (replica.routing_stats if replica is not None else None) or {}
        self.policy.placed(replica_id.unique_id, bucket, bucket in set(stats.get("warm_buckets", ())))

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._ensure_state()
        self.policy.keep({r.replica_id.unique_id for r in replicas})
