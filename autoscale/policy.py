"""Latency-objective autoscaling: the pure decision.

``decide(snapshot, state, cfg, now) -> (Decision, PolicyState)`` is a pure function of a metrics snapshot of the
fleet, the policy's own state and the config (autoscale/types.py). No Ray, no clock, no I/O: ``autoscale.ray_policy``
is the thin adapter Ray Serve calls. How it decides (breach, hysteresis band, scale-down with the predicted ratio and
the capacity guard, the queue signal, demand sizing, the fleet P99 as the max of the replica P99s) and why:
docs/autoscaling.md and docs/decisions/autoscaling.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

from .types import (Decision, Direction, FleetSnapshot, LatencyPolicyConfig, PolicyState,  # noqa: F401 (the API)
                    ReplicaStats)


@dataclass(frozen=True)
class FleetStats:
    p99_ttft_ms: float
    p99_e2e_ms: float
    samples: float
    request_rate: float
    in_flight: float
    ratio: float
    counted_replicas: int
    recent_ratio: Optional[float] = None  # None: not reported / too few recent samples
    recent_samples: float = 0.0
    queue_ratio: float = 0.0  # predicted TTFT of the newest queued request / objective (max)
    busy: Optional[float] = None  # replicas' worth of work: sum of rate x time per request (slot_ms)


def fleet_stats(snapshot: FleetSnapshot, cfg: LatencyPolicyConfig) -> FleetStats:
    """Fleet P99s (see module docstring), totals, and the pressure ratio."""
    reps = list(snapshot.replicas)
    samples = sum(r.samples for r in reps)
    rate = sum(r.request_rate for r in reps)
    in_flight = sum(r.in_flight for r in reps)
    counted = [r for r in reps if r.samples >= cfg.min_replica_samples and r.samples > 0]
    if not counted:
        ttft = e2e = 0.0
    elif cfg.fleet_p99 == "max":
        ttft = max(r.p99_ttft_ms for r in counted)
        e2e = max(r.p99_e2e_ms for r in counted)
    elif cfg.fleet_p99 == "mixture":
        ttft = mixture_p99([(r.samples, r.p99_ttft_ms) for r in counted])
        e2e = mixture_p99([(r.samples, r.p99_e2e_ms) for r in counted])
    else:
        w = sum(r.samples for r in counted)
        ttft = sum(r.p99_ttft_ms * r.samples for r in counted) / w
        e2e = sum(r.p99_e2e_ms * r.samples for r in counted) / w
    ratio = ttft / cfg.p99_ttft_ms
    if cfg.p99_e2e_ms is not None:
        ratio = max(ratio, e2e / cfg.p99_e2e_ms)

    recent = [r for r in reps if r.recent_samples is not None and r.p99_ttft_recent_ms is not None]
    recent_n = sum(r.recent_samples for r in recent)
    recent_ratio: Optional[float] = None
    if recent and recent_n >= cfg.min_recent_samples:
        live = [r for r in recent if r.recent_samples > 0]
        agg = max if cfg.fleet_p99 != "mixture" else (
            lambda vals: mixture_p99(list(zip((r.recent_samples for r in live), vals))))
        recent_ratio = agg([r.p99_ttft_recent_ms for r in live]) / cfg.p99_ttft_ms
        if cfg.p99_e2e_ms is not None:
            recent_ratio = max(
                recent_ratio, agg([(r.p99_e2e_recent_ms or 0.0) for r in live]) / cfg.p99_e2e_ms
            )
    return FleetStats(ttft, e2e, samples, rate, in_flight, ratio, len(counted),
                      recent_ratio, recent_n, queue_ratio(snapshot, counted, cfg), busy_replicas(reps, cfg))


def mixture_p99(weighted: Sequence[Tuple[float, float]]) -> float:
    """P99 of the replicas' samples merged, from (samples, P99) per replica, each replica's tail taken
    as exponential through its P99 (P(X > x) = 0.01 ** (x / p99)): the x where the sample-weighted
    tails hold 1%. Equal replica P99s give that P99; one replica far above the rest among many
    moves it little (the max of many replica P99s is a far higher quantile of the fleet's)."""
    pts = [(w, p) for w, p in weighted if w > 0 and p > 0]
    if not pts:
        return 0.0
    tot = sum(w for w, _ in pts)
    lo, hi = min(p for _, p in pts), max(p for _, p in pts)
    for _ in range(30):
        if hi - lo <= 1e-3 * hi:
            break
        mid = 0.5 * (lo + hi)
        if sum(w * 0.01 ** (mid / p) for w, p in pts) / tot > 0.01:
            lo = mid
        else:
            hi = mid
    return hi


def slots(r: ReplicaStats, cfg: LatencyPolicyConfig) -> float:
    """Requests the replica runs at once: its KV slots with busy_per_slot, else 1 (batch 1)."""
    return max(1.0, r.max_batch or 1.0) if cfg.busy_per_slot else 1.0


def slot_ms(r: ReplicaStats, cfg: LatencyPolicyConfig) -> Optional[float]:
    """The replica's time per request of its capacity: batch 1, its mean service time; batched with
    busy_per_slot, its mean cost at full batch where it reports one (its real capacity, however full it
    runs now), else its service time / slots (which understates it at few rows)."""
    k = slots(r, cfg)
    if k > 1 and r.mean_full_batch_ms:
        return r.mean_full_batch_ms
    return None if r.mean_service_ms is None else r.mean_service_ms / k


def busy_replicas(reps: Sequence[ReplicaStats], cfg: LatencyPolicyConfig) -> Optional[float]:
    """How many replicas' worth of work the fleet carries: the sum over replicas of requests
    finished per second x each one's time of the replica's capacity (slot_ms: the fraction of time
    a batch-1 replica is busy; for a batched one with busy_per_slot, of its full-batch throughput).
    None unless every replica reports its service time (the guard then stays out of the way)."""
    if not reps or any(r.mean_service_ms is None for r in reps):
        return None
    return sum(r.request_rate * slot_ms(r, cfg) / 1000.0 for r in reps)


def utilization_cap(n: int, cfg: LatencyPolicyConfig) -> Optional[float]:
    """The capacity guard's limit for n remaining replicas: max_utilization up to 2 (where it was
    measured), growing as 1 - (1 - max_utilization) x sqrt(2 / n) up to max_utilization_pooled
    (square-root staffing: spare capacity grows with sqrt(n))."""
    u = cfg.max_utilization
    if u is None or cfg.max_utilization_pooled is None or n <= 2:
        return u
    return max(u, min(cfg.max_utilization_pooled, 1.0 - (1.0 - u) * math.sqrt(2.0 / n)))


def queue_ratio(snapshot: FleetSnapshot, counted: Sequence[ReplicaStats], cfg: LatencyPolicyConfig) -> float:
    """Max over replicas of the predicted TTFT of the newest queued request, / objective: it waits
    for the (queued - slots) requests ahead of it to get a slot, a slot freeing every slot_ms
    (batch 1: (queued - 1) x mean_service_ms).
    queued = the replica's in-flight requests + an even share of those Ray holds before replicas
    (ongoing_requests - sum of in-flight). Replicas without enough samples or no service time: 0."""
    reps = list(snapshot.replicas)
    outside = 0.0
    if snapshot.ongoing_requests is not None and reps:
        outside = max(0.0, snapshot.ongoing_requests - sum(r.in_flight for r in reps)) / len(reps)
    worst = 0.0
    waits = []       # (fleet_p99 "mixture") every queued request's predicted wait
    for r in counted:
        if r.mean_service_ms:
            k, per = slots(r, cfg), slot_ms(r, cfg)
            q = max(0.0, r.in_flight + outside - k)
            worst = max(worst, q * per)
            if cfg.fleet_p99 == "mixture":
                waits += [j * per for j in range(1, int(q) + 1)] + [0.0] * int(min(k, r.in_flight))
    if cfg.fleet_p99 == "mixture" and waits:
        waits.sort()
        worst = waits[max(0, math.ceil(0.99 * len(waits)) - 1)]     # nearest rank
    return worst / cfg.p99_ttft_ms


def bounds(snapshot: FleetSnapshot, cfg: LatencyPolicyConfig) -> Tuple[int, int]:
    """[lo, hi]: the stricter of the config's and the platform's bounds."""
    los = [b for b in (cfg.min_replicas, snapshot.min_replicas) if b is not None]
    his = [b for b in (cfg.max_replicas, snapshot.max_replicas) if b is not None]
    lo = max(los) if los else 1
    hi = min(his) if his else max(lo, snapshot.current_replicas, snapshot.target_replicas or 0)
    return lo, max(lo, hi)


def track_ongoing(snapshot: FleetSnapshot, state: PolicyState, cfg: LatencyPolicyConfig,
                  now: float) -> PolicyState:
    """Every demand_window_s: the growth rate of the ongoing requests since the last reference
    (the larger of Ray's look-back mean and the replicas' own newer in-flight counts)."""
    if cfg.demand_utilization is None or snapshot.ongoing_requests is None:
        return state
    ongoing = max(snapshot.ongoing_requests, sum(r.in_flight for r in snapshot.replicas))
    if state.ongoing_ref is None or state.ongoing_ref_at is None:
        return state.model_copy(update={"ongoing_ref": ongoing, "ongoing_ref_at": now})
    dt = now - state.ongoing_ref_at
    if dt < cfg.demand_window_s:
        return state
    return state.model_copy(update={"ongoing_ref": ongoing, "ongoing_ref_at": now,
                                    "ongoing_growth": (ongoing - state.ongoing_ref) / dt})


def demand_replicas(fs: FleetStats, state: PolicyState, cfg: LatencyPolicyConfig) -> Optional[int]:
    """Replicas the measured demand needs at demand_utilization; None without the inputs.
    Arrivals = completions now + the growth of the ongoing requests (negative while a backlog
    drains: the completions then are the replicas' capacity, not the demand)."""
    if (cfg.demand_utilization is None or fs.busy is None or state.ongoing_growth is None
            or fs.request_rate <= 0):
        return None
    service_s = fs.busy / fs.request_rate
    done = fs.recent_samples / cfg.recent_window_s if fs.recent_samples else fs.request_rate
    return math.ceil(max(0.0, done + state.ongoing_growth) * service_s / cfg.demand_utilization)


def recent_busy(fs: FleetStats, cfg: LatencyPolicyConfig) -> Optional[float]:
    """Busy replicas at the recent sub-window's completion rate (the window's, without one)."""
    if fs.busy is None or fs.request_rate <= 0 or not fs.recent_samples:
        return fs.busy
    return fs.recent_samples / cfg.recent_window_s * fs.busy / fs.request_rate


def busy_now(fs: FleetStats, cfg: LatencyPolicyConfig) -> Optional[float]:
    """The fleet's busy replicas for the capacity guard: the larger of the window's and the recent
    sub-window's (the window lags a scale-down: the removed replicas' share of the rate is gone
    from it until the remaining replicas' windows fill)."""
    return None if fs.busy is None else max(fs.busy, recent_busy(fs, cfg))


def step_up(base: int, cfg: LatencyPolicyConfig) -> int:
    """Most replicas one scale-up adds: max_step_up, or the fraction of a large fleet."""
    frac = 0 if cfg.max_step_up_fraction is None else math.ceil(cfg.max_step_up_fraction * base)
    return max(cfg.max_step_up, frac)


def step_down(base: int, cfg: LatencyPolicyConfig) -> int:
    """Most replicas one scale-down removes: max_step_down, or the fraction of a large fleet."""
    frac = 0 if cfg.max_step_down_fraction is None else math.floor(cfg.max_step_down_fraction * base)
    return max(cfg.max_step_down, frac)


def _elapsed(now: float, since: Optional[float]) -> float:
    return 0.0 if since is None else max(0.0, now - since)


# ------------------------------------------------------------------------ decision
def decide(
    snapshot: FleetSnapshot,
    state: PolicyState,
    cfg: LatencyPolicyConfig,
    now: float,
) -> Tuple[Decision, PolicyState]:
    """One autoscaling decision. Pure: same inputs, same outputs."""
    current = max(0, int(snapshot.current_replicas))
    base = current if snapshot.target_replicas is None else max(0, int(snapshot.target_replicas))
    lo, hi = bounds(snapshot, cfg)
    fs = fleet_stats(snapshot, cfg)
    idle = (
        len(snapshot.replicas) >= current  # every running replica reported (fresh) stats
        and fs.samples == 0
        and fs.in_flight == 0
        and not (snapshot.ongoing_requests or 0) > 0
        and cfg.scale_down_when_idle
    )
    enough = fs.samples >= cfg.min_samples
    inputs: Dict[str, Any] = {
        "current_replicas": current,
        "prior_target_replicas": base,
        "min_replicas": lo,
        "max_replicas": hi,
        "fleet_p99_ttft_ms": round(fs.p99_ttft_ms, 3),
        "fleet_p99_e2e_ms": round(fs.p99_e2e_ms, 3),
        "objective_p99_ttft_ms": cfg.p99_ttft_ms,
        "objective_p99_e2e_ms": cfg.p99_e2e_ms,
        "ratio": round(fs.ratio, 4),
        "recent_ratio": None if fs.recent_ratio is None else round(fs.recent_ratio, 4),
        "recent_samples": fs.recent_samples,
        "queue_ratio": round(fs.queue_ratio, 4),
        "busy_replicas": None if fs.busy is None else round(fs.busy, 4),
        "samples": fs.samples,
        "counted_replicas": fs.counted_replicas,
        "request_rate": round(fs.request_rate, 3),
        "in_flight": fs.in_flight,
        "ongoing_requests": snapshot.ongoing_requests,
        "idle": idle,
    }

    # The last scale-up's replicas are all running from the first tick current >= target.
    if state.last_scale_up_at is not None and state.up_ready_at is None and current >= base:
        state = state.model_copy(update={"up_ready_at": now})

    state = track_ongoing(snapshot, state, cfg, now)

    def out(target: int, direction: Direction, reason: str, **st: Any):
        new_state = state.model_copy(update={**st, "last_reason": reason})
        return Decision(target, direction, reason, inputs), new_state

    # 1. Bounds win immediately (e.g. min/max just changed).
    if base < lo:
        return out(lo, "up", "below_min", breach_since=None, low_since=None,
                   last_scale_up_at=now, up_ready_at=None)
    if base > hi:
        return out(hi, "down", "above_max", breach_since=None, low_since=None, last_scale_down_at=now)

    # 2. Too few samples: no latency evidence either way (unless the fleet is idle).
    if not enough and not idle:
        return out(base, "hold", "insufficient_samples", breach_since=None, low_since=None)

    ratio = 0.0 if (idle and not enough) else fs.ratio
    queued = fs.queue_ratio if cfg.queue_signal else 0.0
    queue_breach = queued > 1.0 >= ratio
    ratio = max(ratio, queued)

    # 3. Breach: scale up. Also (scale_up_utilization) when the replicas run busier than that, in the
    # window and in the recent sub-window (a burst shorter than the window is not): at batch 1 the
    # P99 is flat until a replica saturates, so on a rising load it warns only once queues grow.
    busy_min = None if fs.busy is None else min(fs.busy, recent_busy(fs, cfg))
    cap_breach = (cfg.scale_up_utilization is not None and busy_min is not None and current > 0
                  and busy_min / current > cfg.scale_up_utilization)
    subsiding = (
        not cap_breach
        and ratio > 1.0
        and not queued > 1.0          # queued requests: their slow samples are still to come
        and cfg.confirm_with_recent
        and fs.recent_ratio is not None
        and fs.recent_ratio <= 1.0
    )
    if subsiding:
        # The long window still holds slow samples, but the last few seconds are fine.
        return out(base, "hold", "breach_subsiding", breach_since=None, low_since=None)
    if ratio > 1.0 or cap_breach:
        breach_since = state.breach_since if state.breach_since is not None else now
        inputs["breach_for_s"] = round(_elapsed(now, breach_since), 3)
        if current < base:
            return out(base, "hold", "scale_up_pending", breach_since=breach_since, low_since=None)
        if now - breach_since < cfg.upscale_delay_s:
            return out(base, "hold", "breach_waiting_delay", breach_since=breach_since, low_since=None)
        if state.last_scale_up_at is not None and (
            state.up_ready_at is None or now - state.up_ready_at < cfg.upscale_cooldown_s
        ):
            return out(base, "hold", "upscale_cooldown", breach_since=breach_since, low_since=None)
        if base >= hi:
            return out(base, "hold", "at_max", breach_since=breach_since, low_since=None)
        excess = ratio if (fs.recent_ratio is None or queued > 1.0) else min(ratio, fs.recent_ratio)
        want = math.ceil(max(base, 1) * excess / cfg.target_ratio)
        if cap_breach and ratio <= 1.0:
            want = math.ceil(busy_min / (cfg.demand_utilization or cfg.scale_up_utilization))
        target = max(base + 1, min(want, base + step_up(base, cfg), hi))
        need = demand_replicas(fs, state, cfg)
        if need is not None:
            inputs["demand_replicas"] = need
            if need <= current:
                return out(base, "hold", "breach_backlog_draining", breach_since=breach_since, low_since=None)
            target = max(base + 1, need)
        target = min(target, hi)
        inputs["proportional_target"] = want
        reason = ("queue_predicts_breach" if queue_breach else "p99_above_objective") if ratio > 1.0 \
            else "utilization_above_limit"
        return out(target, "up", reason,
                   breach_since=None, low_since=None, last_scale_up_at=now, up_ready_at=None)

    # 4. Well under: maybe scale down.
    if ratio < cfg.downscale_headroom:
        low_since = state.low_since if state.low_since is not None else now
        inputs["low_for_s"] = round(_elapsed(now, low_since), 3)
        # a scale-down may repeat sooner within one low period (downscale_repeat_s)
        repeat = (cfg.downscale_repeat_s is not None and state.last_scale_down_at is not None
                  and low_since <= state.last_scale_down_at
                  and (state.last_scale_up_at is None or state.last_scale_up_at < state.last_scale_down_at))
        if not repeat and now - low_since < cfg.downscale_delay_s:
            return out(base, "hold", "low_waiting_delay", breach_since=None, low_since=low_since)
        last_action = max(
            (t for t in (state.last_scale_up_at, state.last_scale_down_at) if t is not None),
            default=None,
        )
        cooldown = cfg.downscale_repeat_s if repeat else cfg.downscale_cooldown_s
        if last_action is not None and now - last_action < cooldown:
            return out(base, "hold", "downscale_cooldown", breach_since=None, low_since=low_since)
        if base <= lo:
            return out(base, "hold", "at_min", breach_since=None, low_since=low_since)
        # Load per remaining replica grows by serving/n; P99 predicted to grow with it.
        # The busy time the fleet carries is spread over the remaining replicas (capacity guard).
        serving = max(current, 1)
        target = base
        predicted = ratio
        saturates = False
        busy = busy_now(fs, cfg)
        for n in range(max(lo, base - step_down(base, cfg)), base):
            p = ratio * serving / n if n > 0 else (0.0 if idle else math.inf)
            util = None if (busy is None or n == 0) else busy / n
            cap = utilization_cap(n, cfg)
            if util is not None and cap is not None and util > cap:
                saturates = True
                continue
            if p <= cfg.target_ratio:
                target, predicted = n, p
                break
        inputs["predicted_ratio_after"] = round(predicted, 4) if math.isfinite(predicted) else None
        if busy is not None and target > 0:
            inputs["utilization_after"] = round(busy / target, 4)
        if fs.request_rate > 0 and target > 0:
            inputs["load_per_replica_now"] = round(fs.request_rate / serving, 3)
            inputs["load_per_replica_after"] = round(fs.request_rate / target, 3)
        if target >= base:
            return out(base, "hold", "downscale_would_saturate" if saturates else "downscale_would_breach",
                       breach_since=None, low_since=low_since)
        return out(target, "down", "idle" if (idle and not enough) else "p99_well_under_objective",
                   breach_since=None, low_since=None if cfg.downscale_repeat_s is None else low_since,
                   last_scale_down_at=now)

    # 5. Hysteresis band: nothing sustained, nothing to do.
    return out(base, "hold", "within_band", breach_since=None, low_since=None)
