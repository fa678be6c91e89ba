"""Thin adapter between Ray Serve's custom autoscaling policy API and ``autoscale.policy``.

Wire it in ``autoscaling_config`` (see docs/autoscaling.md)::

    policy:
      policy_function: autoscale.ray_policy:LatencyAutoscalingPolicy
      policy_kwargs: {p99_ttft_ms: 50, ...}      # -> LatencyPolicyConfig

What Ray 2.60 does with it (read from ray/serve/_private/autoscaling_state.py):

* ``policy_function`` naming a *class* is instantiated once per deployment (re)registration
  in the Serve controller with ``policy_kwargs`` (JSON-serialisable), then called as
  ``instance(ctx: AutoscalingContext) -> (target_replicas, policy_state_dict)`` on every
  control-loop tick (~0.1 s).
* The dict returned is handed back next tick as ``ctx.policy_state`` (merged with Ray's own
  delay-counter keys); it is reset to ``{}`` whenever the deployment is redeployed and is
  not persisted across controller restarts.  We keep our ``PolicyState`` under one key.
* Per-replica custom metrics: each replica's ``record_autoscaling_stats()`` dict is sampled
  every ``min(look_back_period_s * 0.2, metrics_interval_s)`` seconds, pushed to the
  controller every ``metrics_interval_s``, and exposed as ``ctx.raw_metrics[name][replica_id]``
  (time series over ``look_back_period_s``) and ``ctx.aggregated_metrics[name][replica_id]``
  (that series reduced by ``aggregation_function``, mean by default).  We read the *latest*
  point of the raw series: the replica's ``LatencyWindow`` already is the sliding window,
  and a mean of P99s over the look-back would understate the tail.
* Ray wraps every custom policy in its own ``upscale_delay_s`` / ``downscale_delay_s`` /
  up-/downscaling-factor logic and its min/max bounds.  Our policy owns delays and
  hysteresis, so set Ray's delays to 0 and leave the factors unset (1.0); otherwise the two
  delays add up (and Ray's default ``downscale_delay_s`` is 600 s).

This module runs inside the Serve controller actor; it imports no ``deployments/`` code.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional, Tuple

from autoscale.policy import (
    Decision,
    FleetSnapshot,
    LatencyPolicyConfig,
    PolicyState,
    ReplicaStats,
    decide,
)
from autoscale.window import SNAPSHOT_KEYS

logger = logging.getLogger("hybridserve.autoscale")

#: key of our PolicyState inside Ray's policy_state dict.
STATE_KEY = "hybridserve_latency_policy"


# ------------------------------------------------------------------------- metrics
class _Metrics:
    """ray.util.metrics instruments, created lazily; a no-op where they can't exist."""

    def __init__(self) -> None:
        self.ok = False
        try:
            from ray.util.metrics import Counter, Gauge

            tags = ("deployment", "application")
            self.target = Gauge(
                "hybridserve_autoscale_target_replicas",
                description="Replica count chosen by the latency autoscaling policy.",
                tag_keys=tags,
            )
            self.decisions = Counter(
                "hybridserve_autoscale_decisions_total",
                description="Latency autoscaling policy evaluations, by direction (up/down/hold).",
                tag_keys=tags + ("direction",),
            )
            self.p99_ttft = Gauge(
                "hybridserve_autoscale_fleet_p99_ttft_seconds",
                description="Fleet P99 time-to-first-token the policy decided on.",
                tag_keys=tags,
            )
            self.ok = True
        except Exception as e:  # not in a Ray worker / metrics unavailable: keep deciding
            logger.debug("autoscale metrics disabled: %s", e)

    def export(self, decision: Decision, deployment: str, application: str) -> None:
        if not self.ok:
            return
        tags = {"deployment": deployment, "application": application}
        try:
            self.target.set(decision.target_replicas, tags=tags)
            self.decisions.inc(1, tags={**tags, "direction": decision.direction})
            self.p99_ttft.set(decision.inputs.get("fleet_p99_ttft_ms", 0.0) / 1000.0, tags=tags)
        except Exception as e:
            self.ok = False
            logger.warning("autoscale metrics export failed, disabling: %s", e)


def _ensure_log_output() -> None:
    """In the Serve controller nobody configures our logger: give it a stderr handler at
    INFO (stderr of the controller ends up in its worker log and on the driver) unless the
    process already routes it somewhere."""
    if logger.handlers or logging.getLogger().handlers:
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


# ---------------------------------------------------------------- ctx -> snapshot
def _latest(series: Any) -> Tuple[Optional[float], Optional[float]]:
    """(timestamp, value) of the newest point of a Ray TimeSeries (list of
    TimeStampedValue), or of a bare number."""
    if series is None:
        return None, None
    if isinstance(series, (int, float)):
        return None, float(series)
    best_t, best_v = None, None
    try:
        for p in series:
            t = float(p.timestamp)
            if best_t is None or t >= best_t:
                best_t, best_v = t, float(p.value)
    except (TypeError, AttributeError, ValueError):
        return None, None
    return best_t, best_v


def _replica_key(replica_id: Any) -> str:
    return str(getattr(replica_id, "unique_id", replica_id))


#: the engine's own keys the policy reads beside the LatencyWindow's (ModelServer.record_autoscaling_stats)
ENGINE_KEYS = ("max_batch",)


def snapshot_from_context(ctx: Any, max_age_s: float = 60.0) -> FleetSnapshot:
    """Translate a Ray ``AutoscalingContext`` into a ``FleetSnapshot``.

    Per running replica: the newest point of each ``LatencyWindow`` key from
    ``ctx.raw_metrics`` (falling back to ``ctx.aggregated_metrics``).  A replica that hasn't
    reported ``samples`` yet, or whose newest report is older than ``max_age_s``, is left out.
    """
    now = ctx.current_time if ctx.current_time is not None else time.time()
    raw: Dict[str, Dict[Any, Any]] = {}
    agg: Dict[str, Dict[Any, Any]] = {}
    try:
        raw = ctx.raw_metrics or {}
    except Exception as e:
        logger.debug("raw_metrics unavailable: %s", e)
    try:
        agg = ctx.aggregated_metrics or {}
    except Exception as e:
        logger.debug("aggregated_metrics unavailable: %s", e)

    replicas = []
    for rid in list(ctx.running_replicas or []):
        snap: Dict[str, float] = {}
        newest: Optional[float] = None
        for key in SNAPSHOT_KEYS + ENGINE_KEYS:
            t, v = _latest(raw.get(key, {}).get(rid))
            if v is None and rid in agg.get(key, {}):
                t, v = None, float(agg[key][rid])
            if v is None:
                continue
            snap[key] = v
            if t is not None:
                newest = t if newest is None else max(newest, t)
        if "samples" not in snap:
            continue  # replica hasn't reported our stats yet
        if newest is not None and now - newest > max_age_s:
            continue  # stale report (replica wedged or not pushing)
        replicas.append(ReplicaStats.from_snapshot(_replica_key(rid), snap))

    try:
        ongoing: Optional[float] = float(ctx.total_num_requests)
    except Exception:
        ongoing = None
    return FleetSnapshot(
        replicas=tuple(replicas),
        current_replicas=int(ctx.current_num_replicas),
        target_replicas=int(ctx.target_num_replicas),
        min_replicas=ctx.capacity_adjusted_min_replicas,
        max_replicas=ctx.capacity_adjusted_max_replicas,
        ongoing_requests=ongoing,
    )


# -------------------------------------------------------------------- the policy
class LatencyAutoscalingPolicy:
    """Ray Serve custom autoscaling policy (class form; Ray instantiates it once with
    ``policy_kwargs`` and calls it with an ``AutoscalingContext`` each tick)."""

    def __init__(self, **policy_kwargs: Any):
        self.cfg = LatencyPolicyConfig(**policy_kwargs)
        self._metrics = _Metrics()
        _ensure_log_output()
        self._warned_ray_delays = False
        logger.info("latency autoscaling policy configured: %s", self.cfg.model_dump())

    def __call__(self, ctx: Any) -> Tuple[int, Dict[str, Any]]:
        self._warn_on_stacked_delays(ctx)
        now = ctx.current_time if ctx.current_time is not None else time.time()
        prior = dict(ctx.policy_state or {})
        state = PolicyState.from_dict(prior.get(STATE_KEY))
        snapshot = snapshot_from_context(ctx, max_age_s=self.cfg.stats_max_age_s)
        decision, new_state = decide(snapshot, state, self.cfg, now)

        deployment = str(getattr(ctx, "deployment_name", "") or "")
        application = str(getattr(ctx, "app_name", "") or "")
        # Every up/down, and every change of reason, at INFO; steady holds at DEBUG
        # (Ray calls this ~10x a second).
        level = (
            logging.INFO
            if decision.direction != "hold" or decision.reason != state.last_reason
            else logging.DEBUG
        )
        if logger.isEnabledFor(level):
            logger.log(
                level,
                "autoscale decision deployment=%s app=%s %s",
                deployment,
                application,
                " ".join(f"{k}={v}" for k, v in decision.as_dict().items()),
            )
        self._metrics.export(decision, deployment, application)

        prior[STATE_KEY] = new_state.to_dict()
        return decision.target_replicas, prior

    def _warn_on_stacked_delays(self, ctx: Any) -> None:
        if self._warned_ray_delays:
            return
        self._warned_ray_delays = True
        rc = getattr(ctx, "config", None)
        up = getattr(rc, "upscale_delay_s", 0) or 0
        down = getattr(rc, "downscale_delay_s", 0) or 0
        if up or down:
            logger.warning(
                "autoscaling_config.upscale_delay_s=%s / downscale_delay_s=%s are applied by "
                "Ray *on top of* this policy's own delays (upscale_delay_s=%s, "
                "downscale_delay_s=%s); set them to 0 in autoscaling_config.",
                up, down, self.cfg.upscale_delay_s, self.cfg.downscale_delay_s,
            )
