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

import bisect
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

logger = logging.getLogger("ray.serve")

# kwarg of ModelServer.generate/stream that carries the prompt's token count for routing
TOKENS_KWARG = "n_tokens"


@dataclass(frozen=True)
class ReplicaView:
    """What the policy knows about one replica."""

    id: str
    load: int = 0                                  # ongoing + queued requests
    warm: frozenset[int] = frozenset()             # buckets with a warm graph
    capturing: frozenset[int] = frozenset()        # buckets being captured (or just sent here cold)
    max_load: int | None = None                    # max_ongoing_requests; None = unbounded


def bucket_for(n_tokens: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n_tokens (the engine's prefill bucket); the largest if none fits."""
    if not buckets:
        raise ValueError("no buckets")
    bs = sorted(buckets)
    i = bisect.bisect_left(bs, max(int(n_tokens), 0))
    return bs[min(i, len(bs) - 1)]


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


# --------------------------------------------------------------------------- Ray Serve adapter
try:  # deployments/ may be imported without Ray (pure tests); the adapter needs it.
    from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
except ImportError:  # pragma: no cover
    RequestRouter = object  # type: ignore[misc,assignment]
    PendingRequest = RunningReplica = Any  # type: ignore[misc,assignment]


def tokens_of(pending_request: Any) -> int | None:
    """The prompt's token count the ingress attached to the request (kwarg ``n_tokens``)."""
    if pending_request is None:
        return None
    v = (pending_request.kwargs or {}).get(TOKENS_KWARG)
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    return None


# Requests between choose_replicas and on_request_routed that the router remembers (a bound, not a
# batch size: at batch 1 a handful are in flight; the rest are requests whose hook never fires).
MAX_PENDING_BUCKETS = 4096


class WarmBucketRouter(RequestRouter):  # type: ignore[misc,valid-type]
    """Ray Serve 2.60 RequestRouter (alpha API) that applies :func:`choose_replicas`.

    Configured via the deployment's ``request_router_config`` with
    ``request_router_class: deployments.router:WarmBucketRouter`` and ``request_router_kwargs``
    (``buckets``, ``imbalance_threshold``, ``hint_ttl_s``, ``seed``). Reads each replica's
    ``RunningReplica.routing_stats`` (what ModelServer.record_routing_stats returned) and the
    prompt's token count from ``PendingRequest.kwargs['n_tokens']``.
    """

    def initialize_state(self, buckets: Iterable[int] = (), imbalance_threshold: int = 2,
                         hint_ttl_s: float = 10.0, seed: int | None = None,
                         load_from_stats: bool = False, **_: Any) -> None:
        self._buckets = sorted(int(b) for b in buckets)
        # HAProxy mode (bucket_route.py): requests bypass this router, so Ray's queue-length cache
        # (updated on send/complete, else by a probe RPC every 10 s) never sees them; the replicas'
        # reported queue depth (every router.stats_period_s) is the fresher load.
        self._load_from_stats = bool(load_from_stats)
        self._imbalance = int(imbalance_threshold)
        self._hint_ttl_s = float(hint_ttl_s)
        self._rng = random.Random(seed)
        # replica id -> {bucket: time it was sent there cold}; covers the routing-stats lag
        self._hints: dict[str, dict[int, float]] = {}
        self._bucket_of_request: dict[str, int] = {}

    # helpers -----------------------------------------------------------------
    def _ensure_state(self) -> None:
        if not hasattr(self, "_rng"):
            self.initialize_state()

    def _buckets_now(self, replicas: Sequence[Any]) -> list[int]:
        for r in replicas:
            b = (r.routing_stats or {}).get("buckets")
            if b:
                return list(b)
        return self._buckets

    def _view(self, r: Any, now: float) -> ReplicaView:
        rid = r.replica_id.unique_id
        return view_from_stats(rid, r.routing_stats, r.max_ongoing_requests,
                               load=self._replica_queue_len_cache.get(r.replica_id),
                               hints=self._hints.get(rid), now=now, hint_ttl_s=self._hint_ttl_s)

    # RequestRouter API -------------------------------------------------------
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        self._ensure_state()
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # back off between rounds when every replica is full (as Ray's own routers do)
            pending_request.routing_context.should_backoff = True
        n = tokens_of(pending_request)
        buckets = self._buckets_now(candidate_replicas)
        if n is None or not buckets:
            # no token count (e.g. a call that bypassed the ingress): plain power of two choices
            pair = self._rng.sample(list(candidate_replicas), min(2, len(candidate_replicas)))
            return [pair]
        bucket = bucket_for(n, buckets)
        now = time.monotonic()
        if self._load_from_stats:
            self._load_queue_lens_from_stats(candidate_replicas)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        order = choose_replicas(bucket, [self._view(r, now) for r in candidate_replicas], self._rng,
                                imbalance_threshold=self._imbalance)
        if self._load_from_stats:
            # HAProxy mode: on_request_routed never fires. The base class takes the first replica
            # whose (just loaded) queue length leaves room, so the placement is known here.
            chosen = next((v for v in order if v.max_load is None or v.load < v.max_load), None)
            if chosen is not None:
                self._note_placement(chosen.id, bucket, bucket in chosen.warm)
        elif pending_request is not None:
            self._remember_bucket(pending_request.metadata.internal_request_id, bucket)
        return [[by_id[v.id]] for v in order]

    def _load_queue_lens_from_stats(self, replicas: Sequence[Any]) -> None:
        """Put each replica's reported queue depth into Ray's queue-length cache: ``_view`` reads
        the load from it, and the base class then picks among the ranked replicas without a probe
        RPC on the request's path (it still probes a replica reported full, as Ray does)."""
        for r in replicas:
            depth = (r.routing_stats or {}).get("queue_depth")
            if isinstance(depth, int):
                self._replica_queue_len_cache.update(r.replica_id, depth)

    def _remember_bucket(self, request_id: str, bucket: int) -> None:
        """Keep the request's bucket for ``on_request_routed``. Should requests be routed without
        that hook firing, they would pile up here, so the map keeps only the newest
        ``MAX_PENDING_BUCKETS`` entries, dropping the oldest first."""
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
        self._note_placement(replica_id.unique_id, bucket, bucket in set(stats.get("warm_buckets", ())))

    def _note_placement(self, rid: str, bucket: int, warm: bool) -> None:
        """Count the warm/cold choice; remember a cold placement so the next prompts of that bucket
        follow it until the replica's stats report the bucket (hint_ttl_s)."""
        try:
            from deployments.metrics import observe_router_choice
            observe_router_choice(warm)
        except Exception:  # metrics never break routing
            pass
        if not warm:
            self._hints.setdefault(rid, {})[bucket] = time.monotonic()

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._ensure_state()
        live = {r.replica_id.unique_id for r in replicas}
        now = time.monotonic()
        for rid in list(self._hints):
            if rid not in live:
                del self._hints[rid]
                continue
            self._hints[rid] = {b: t for b, t in self._hints[rid].items()
                                if now - t <= self._hint_ttl_s}
