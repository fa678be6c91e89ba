"""The one place the simulator touches the project's decision code (and Ray's), imported, not copied.

A later rename of ``choose_replicas``/``view_from_stats`` or of the policy's entry points is one
line here. Nothing else in fleetsim imports deployments/, autoscale/ or ray.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import autoscale.policy as _policy
import deployments.router as _router
from autoscale.policy import FleetSnapshot, LatencyPolicyConfig, PolicyState, ReplicaStats
from autoscale.window import LatencyWindow
from deployments.router import ReplicaView
from engine import request as _request
from engine.scheduler import full_batch_cost_ms, full_batch_step_ms

def bucket_for(n_tokens: int, buckets) -> int:
    """The engine's bucket function; a modelled prompt longer than the largest bucket runs in it."""
    return _request.bucket_for(min(n_tokens, buckets[-1]), buckets)


__all__ = ["route", "view", "bucket_for", "LatencyWindow", "P99Policy", "QueueLengthPolicy",
           "ReplicaView", "ReplicaStats", "full_batch_cost_ms", "full_batch_step_ms"]


def view(rid: str, stats: dict, max_load: Optional[int], load: int, hints: Dict[int, float],
         now: float, hint_ttl_s: float) -> ReplicaView:
    """A replica as the warm-bucket router sees it (``deployments.router.view_from_stats``)."""
    return _router.view_from_stats(rid, stats, max_load, load=load, hints=hints, now=now, hint_ttl_s=hint_ttl_s)


def route(bucket: int, views: Sequence[ReplicaView], rng, imbalance_threshold: int = 2) -> list:
    """The router's preference order (``deployments.router.choose_replicas``)."""
    return _router.choose_replicas(bucket, views, rng, imbalance_threshold=imbalance_threshold)


class P99Policy:
    """The project's latency policy (``autoscale.policy.decide``) fed the replicas' LatencyWindow
    snapshots, as ``autoscale.ray_policy`` does (Ray's own delays 0, its bounds applied)."""

    name = "p99"

    def __init__(self, decide_fn=None, **kwargs: Any):
        self.cfg = LatencyPolicyConfig(**kwargs)
        self.state = PolicyState()
        self._decide = decide_fn
        self.last: Any = None
        self._snaps_key: Any = None
        self._reps: tuple = ()

    def __call__(self, now: float, snaps: Dict[str, dict], current: int, target: int,
                 lo: int, hi: int, ongoing: float) -> int:
        key = (id(snaps), len(snaps))
        if key != self._snaps_key:              # the replicas' stats change once per metrics push
            self._reps = tuple(ReplicaStats.from_snapshot(rid, s) for rid, s in snaps.items())
            self._snaps_key = key
        reps = self._reps
        fs = FleetSnapshot(replicas=reps, current_replicas=current, target_replicas=target,
                           min_replicas=lo, max_replicas=hi, ongoing_requests=ongoing)
        d, self.state = (self._decide or _policy.decide)(fs, self.state, self.cfg, now)
        self.last = d
        return max(lo, min(hi, d.target_replicas))


class QueueLengthPolicy:
    """Ray Serve's default autoscaling (``replica_queue_length_autoscaling_policy``: ongoing requests
    over ``target_ongoing_requests``) with Ray's own scaling factors and up/downscale delays."""

    name = "queue_length"

    def __init__(self, target_ongoing_requests: float = 1.0, upscale_delay_s: float = 5.0,
                 downscale_delay_s: float = 60.0, min_replicas: int = 1, max_replicas: int = 2):
        from ray.serve.autoscaling_policy import (_apply_delay_logic, _apply_scaling_factors,
                                                  _core_replica_queue_length_policy)
        from ray.serve.config import AutoscalingConfig

        self.cfg = AutoscalingConfig(target_ongoing_requests=target_ongoing_requests,
                                     upscale_delay_s=upscale_delay_s, downscale_delay_s=downscale_delay_s,
                                     min_replicas=min_replicas, max_replicas=max_replicas)
        self._core, self._factors, self._delay = (_core_replica_queue_length_policy,
                                                  _apply_scaling_factors, _apply_delay_logic)
        self.state: Dict[str, Any] = {}
        self.last: Any = None

    def __call__(self, now: float, snaps: Dict[str, dict], current: int, target: int,
                 lo: int, hi: int, ongoing: float) -> int:
        ctx = _Ctx(current, target, ongoing, self.cfg)
        desired, _ = self._core(ctx)
        desired = self._factors(desired, current, self.cfg)
        # Ray's delay logic reads time.time() unless given _now: the simulated clock goes in here
        final, self.state = self._delay(max(0, desired), target, self.cfg, self.state, _now=now)
        self.last = {"desired": desired, "final": final}
        return max(lo, min(hi, int(math.ceil(final))))


class _Ctx:
    """The fields of ray.serve.config.AutoscalingContext that the queue-length policy reads."""

    def __init__(self, current: int, target: int, total: float, cfg):
        self.current_num_replicas = current
        self.target_num_replicas = target
        self.total_num_requests = total
        self.config = cfg
