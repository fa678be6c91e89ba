"""Latency-objective autoscaling: the pure decision.

``decide(snapshot, state, cfg, now) -> (Decision, PolicyState)`` is a pure function of a
metrics snapshot of the fleet, the policy's own state and the config.  No Ray, no clock,
no I/O: ``autoscale.ray_policy`` is the thin adapter Ray Serve calls.

How it decides (``ratio`` = fleet P99 / objective, the worse of TTFT and, if set, E2E):

* **too few samples** (fleet samples < ``min_samples``): no latency decision; both
  sustained-condition timers restart.  Exception: a fleet with *no* traffic at all (no
  samples, nothing in flight or queued) counts as "well under the objective", so an idle
  fleet still shrinks to ``min_replicas`` (``scale_down_when_idle``).
* **ratio > 1** (objective breached), confirmed by the replicas' *recent* sub-window
  (``confirm_with_recent``; the long window keeps a spike's slow samples for ``window_s``,
  the recent one says whether it is still going on): once the breach has lasted
  ``upscale_delay_s``, no earlier scale-up is still starting, and the replicas it added have
  been running for ``upscale_cooldown_s`` (so the slow samples from before they served have
  left the windows), go to ``ceil(replicas * ratio / target_ratio)`` — proportional to the
  excess and to the fleet that carries today's load; ratio = min(window, recent) so a fading
  tail doesn't oversize — at least +1, at most ``+max_step_up`` (or ``max_step_up_fraction`` of a
  larger fleet).
* **ratio < downscale_headroom** (well under): once that has lasted ``downscale_delay_s``
  and ``downscale_cooldown_s`` has passed since the last scale action, remove up to
  ``max_step_down`` replicas (or ``max_step_down_fraction`` of a larger fleet) — but only as many as keep the *predicted* ratio
  (load per remaining replica, see below) at or under ``target_ratio`` and the predicted
  busy fraction of each remaining replica at or under ``max_utilization`` (below).
* **in between**: hysteresis band; hold and restart both timers, so steady load that
  wanders around never moves the fleet.
* ``queue_signal`` (off by default): the P99 of *finished* requests lags a load step by the
  time the queued ones take to finish.  With it on, each replica's queue also predicts the
  TTFT of its newest waiting request, ``(queued - 1) * mean_service_ms`` (queued = its
  in-flight requests plus its share of those Ray holds before the replicas), and the fleet's
  ``queue_ratio`` (the max over replicas, / objective) counts as a breach when > 1: such a
  breach is not "subsiding" (the recent window cannot see it yet), it still waits
  ``upscale_delay_s``, and it blocks a scale-down while above ``downscale_headroom``.
* demand sizing (``demand_utilization``, default 0.75): at a breach the arrival rate is estimated as
  the completions now (recent sub-window) plus the growth of the ongoing requests; the scale-up
  targets that demand at ``demand_utilization`` (past the step caps), and a breach the running
  replicas already carry is held as their backlog draining (or one slow replica's queue, which more
  replicas don't fix). Found in the fleet simulation (docs/simulation.md).
* bounds always win: a target outside [min, max] is clamped at once.

Fleet P99 (``fleet_p99="max"``, the default) is the maximum of the replica P99s, taken
over replicas with at least ``min_replica_samples`` samples.  Justification: we only get a
P99 scalar per replica, not its distribution, so the exact P99 of the merged samples is
unknown; it is bounded above by the largest replica P99, so the max never hides an SLO
breach (a hot replica is one users feel) and makes the scale-down test conservative.
Behind a load-balancing router replicas see similar traffic, so max ~= merged P99; the
per-replica sample floor keeps one replica's handful of requests from driving the fleet.
``fleet_p99="weighted"`` uses the sample-weighted mean of replica P99s instead (closer to
the merged P99 when replicas differ, but can under-report a hot replica).

Predicted load after a scale-down: the fleet's request rate is unchanged, so load per
replica grows by ``current / n`` and P99 is predicted to grow in proportion
(``ratio * current / n``).  Linear is pessimistic at low utilisation (flat latency) and
optimistic near saturation (latency grows faster than load) — hence the downscale also needs
the measured P99 sustained under ``downscale_headroom`` and the predicted one under
``target_ratio``.

Capacity guard (``max_utilization``): at batch 1 a replica's latency is flat until it saturates
and then grows without bound, so "P99 far under the objective" says nothing about how close
to the cliff the fleet is.  Each replica reports its request rate and the mean time a request
held its engine; their product is the fraction of time it is busy, and the fleet's sum is the
number of replicas' worth of work it carries.  A scale-down must leave that work at or under
``max_utilization`` per remaining replica.  (An M/D/1 queue waits rho / (2 (1 - rho)) service
times on average: 0.75 at rho = 0.6, 1.5 at 0.75, 4.5 at 0.9.)  Found on GPUs (2x H200,
2026-11-27, ``docs/fleet.md``): at one replica's full capacity spread over two, each replica's
P99 was 0.04 of the objective, the P99 model predicted 0.09 for one replica, the policy scaled
down, the lone replica's queue grew, it scaled up again 45 s later and down once more: 3 direction
changes in 300 s.  With the guard: one scale-up, none after it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Optional, Sequence, Tuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

Direction = Literal["up", "down", "hold"]


# --------------------------------------------------------------------------- config
class LatencyPolicyConfig(BaseModel):
    """Latency objective and the knobs of the scaling policy (``policy_kwargs``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    p99_ttft_ms: float = Field(gt=0, description="Objective: fleet P99 time-to-first-token (ms).")
    p99_e2e_ms: Optional[float] = Field(
        default=None, gt=0, description="Optional second objective: fleet P99 end-to-end (ms)."
    )
    min_replicas: Optional[int] = Field(
        default=None, ge=0,
        description="Lower bound. None: use Ray's autoscaling_config.min_replicas only "
        "(the stricter of the two applies when both are set).",
    )
    max_replicas: Optional[int] = Field(
        default=None, ge=1,
        description="Upper bound. None: use Ray's autoscaling_config.max_replicas only.",
    )
    upscale_delay_s: float = Field(
        default=10.0, ge=0, description="The breach must last this long before scaling up."
    )
    downscale_delay_s: float = Field(
        default=120.0, ge=0,
        description="P99 must stay under downscale_headroom x objective this long before scaling down.",
    )
    downscale_headroom: float = Field(
        default=0.6, gt=0, lt=1,
        description="'Well under' the objective: P99 / objective below this allows a scale-down.",
    )
    target_ratio: float = Field(
        default=0.8, gt=0, le=1,
        description="Aim of every action: predicted P99 / objective after scaling "
        "(up-scaling sizes the fleet for it; down-scaling must not predict above it).",
    )
    min_samples: int = Field(
        default=20, ge=1, description="Fewer fleet samples in the window: no latency decision."
    )
    min_replica_samples: int = Field(
        default=5, ge=1, description="A replica's P99 counts only with at least this many samples."
    )
    upscale_cooldown_s: float = Field(
        default=30.0, ge=0,
        description="After a scale-up, its new replicas must have been running this long before "
        "another scale-up; set >= the replicas' LatencyWindow window_s, so slow samples from "
        "before they served don't trigger a second step.",
    )
    downscale_cooldown_s: float = Field(
        default=60.0, ge=0, description="Min time after any scale action before a scale-down."
    )
    max_step_up: int = Field(default=4, ge=1, description="Most replicas added in one decision.")
    max_step_down: int = Field(default=1, ge=1, description="Most replicas removed in one decision.")
    max_step_up_fraction: Optional[float] = Field(
        default=1.0, gt=0,
        description="A large fleet may add up to this fraction of itself in one decision (when more "
        "than max_step_up); None: max_step_up only. docs/simulation.md: +4 per step took 700 s to "
        "follow a 5x step at 100 replicas.",
    )
    max_step_down_fraction: Optional[float] = Field(
        default=0.1, gt=0, le=1,
        description="A large fleet may remove up to this fraction of itself in one decision (when more "
        "than max_step_down); None: max_step_down only.",
    )
    fleet_p99: Literal["max", "weighted"] = "max"
    confirm_with_recent: bool = Field(
        default=True,
        description="A breach counts only while the replicas' recent sub-window (if reported "
        "with >= min_recent_samples) is also above the objective.",
    )
    min_recent_samples: int = Field(
        default=3, ge=1, description="Fleet samples the recent sub-window needs to be trusted."
    )
    max_utilization: Optional[float] = Field(
        default=0.6, gt=0, le=1,
        description="A scale-down must leave each remaining replica busy at most this fraction of "
        "the time, predicted from the replicas' request rate x mean service time (see the module "
        "docstring). None: no capacity guard (the P99 model alone).",
    )
    queue_signal: bool = Field(
        default=False,
        description="Also scale up when the queued requests predict a TTFT above the objective "
        "((queued - 1) x mean service time), before their slow samples finish.",
    )
    scale_down_when_idle: bool = Field(
        default=True, description="A fleet with no traffic at all counts as well under the objective."
    )
    demand_utilization: Optional[float] = Field(
        default=0.75, gt=0, le=1,
        description="Size a scale-up by the measured demand: arrivals (completions now + the growth of "
        "the ongoing requests) x mean service time / this utilisation; a breach while the running "
        "replicas already carry that demand is their backlog draining (hold). None: off.",
    )
    recent_window_s: float = Field(
        default=5.0, gt=0, description="The replicas' LatencyWindow recent_s: its sample count over "
        "this is the completion rate now (demand sizing).")
    demand_window_s: float = Field(
        default=5.0, gt=0, description="The ongoing requests' growth is measured over this long.")
    stats_max_age_s: float = Field(
        default=60.0, gt=0,
        description="(adapter) replica stats older than this are ignored as stale.",
    )

    @model_validator(mode="after")
    def _check(self) -> "LatencyPolicyConfig":
        if (
            self.min_replicas is not None
            and self.max_replicas is not None
            and self.min_replicas > self.max_replicas
        ):
            raise ValueError(
                f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})"
            )
        if self.downscale_headroom > self.target_ratio:
            raise ValueError(
                f"downscale_headroom ({self.downscale_headroom}) must be <= target_ratio "
                f"({self.target_ratio}), or a scale-down could land above the scale-up aim"
            )
        return self


# ------------------------------------------------------------------ snapshot / state
@dataclass(frozen=True)
class ReplicaStats:
    """One replica's ``LatencyWindow.snapshot()`` as the policy sees it."""

    replica_id: str
    p99_ttft_ms: float = 0.0
    p99_e2e_ms: float = 0.0
    request_rate: float = 0.0
    in_flight: float = 0.0
    samples: float = 0.0
    # the LatencyWindow's recent sub-window; None where the replica doesn't report it
    p99_ttft_recent_ms: Optional[float] = None
    p99_e2e_recent_ms: Optional[float] = None
    recent_samples: Optional[float] = None
    mean_service_ms: Optional[float] = None  # None where the replica doesn't report it

    @classmethod
    def from_snapshot(cls, replica_id: str, snap: Dict[str, float]) -> "ReplicaStats":
        def num(key: str, default: Optional[float] = 0.0) -> Optional[float]:
            if key not in snap:
                return default
            try:
                v = float(snap[key])
            except (TypeError, ValueError):
                return default
            return v if math.isfinite(v) and v >= 0 else default

        return cls(
            replica_id=str(replica_id),
            p99_ttft_ms=num("p99_ttft_ms"),
            p99_e2e_ms=num("p99_e2e_ms"),
            request_rate=num("request_rate"),
            in_flight=num("in_flight"),
            samples=num("samples"),
            mean_service_ms=num("mean_service_ms", None),
            p99_ttft_recent_ms=num("p99_ttft_recent_ms", None),
            p99_e2e_recent_ms=num("p99_e2e_recent_ms", None),
            recent_samples=num("recent_samples", None),
        )


@dataclass(frozen=True)
class FleetSnapshot:
    """What the policy knows about the fleet at one instant.

    ``current_replicas``: replicas running now (they produced ``replicas``' stats).
    ``target_replicas``: the count already asked for (> current while replicas start);
    decisions are made relative to it.  ``min_replicas``/``max_replicas``: the platform's
    bounds (Ray's capacity-adjusted ones), intersected with the config's.
    ``ongoing_requests``: requests queued/running as the platform counts them (None: unknown).
    """

    replicas: Sequence[ReplicaStats]
    current_replicas: int
    target_replicas: Optional[int] = None
    min_replicas: Optional[int] = None
    max_replicas: Optional[int] = None
    ongoing_requests: Optional[float] = None


class PolicyState(BaseModel):
    """The policy's memory between calls; JSON-able (kept in Ray's ``policy_state``)."""

    model_config = ConfigDict(frozen=True)

    breach_since: Optional[float] = None  # start of the current uninterrupted breach
    low_since: Optional[float] = None  # start of the current uninterrupted "well under"
    last_scale_up_at: Optional[float] = None
    last_scale_down_at: Optional[float] = None
    up_ready_at: Optional[float] = None  # when the last scale-up's replicas were all running
    last_reason: str = ""
    # demand sizing: the ongoing requests at a reference time, and their growth rate since
    ongoing_ref: Optional[float] = None
    ongoing_ref_at: Optional[float] = None
    ongoing_growth: Optional[float] = None  # requests/s

    def to_dict(self) -> Dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]]) -> "PolicyState":
        if not d:
            return cls()
        try:
            return cls.model_validate(d)
        except Exception:  # corrupted / older layout: start fresh rather than crash Serve
            return cls()


@dataclass(frozen=True)
class Decision:
    target_replicas: int
    direction: Direction
    reason: str
    inputs: Dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "target_replicas": self.target_replicas,
            "direction": self.direction,
            "reason": self.reason,
            **self.inputs,
        }


# ------------------------------------------------------------------------- helpers
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
    busy: Optional[float] = None  # replicas' worth of work: sum of rate x mean service time


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
        recent_ratio = max(r.p99_ttft_recent_ms for r in live) / cfg.p99_ttft_ms
        if cfg.p99_e2e_ms is not None:
            recent_ratio = max(
                recent_ratio, max((r.p99_e2e_recent_ms or 0.0) for r in live) / cfg.p99_e2e_ms
            )
    return FleetStats(ttft, e2e, samples, rate, in_flight, ratio, len(counted),
                      recent_ratio, recent_n, queue_ratio(snapshot, counted, cfg), busy_replicas(reps))


def busy_replicas(reps: Sequence[ReplicaStats]) -> Optional[float]:
    """How many replicas' worth of work the fleet carries: the sum over replicas of the fraction
    of time each is busy (requests finished per second x mean time one held the engine).
    None unless every replica reports its service time (the guard then stays out of the way)."""
    if not reps or any(r.mean_service_ms is None for r in reps):
        return None
    return sum(r.request_rate * r.mean_service_ms / 1000.0 for r in reps)


def queue_ratio(snapshot: FleetSnapshot, counted: Sequence[ReplicaStats], cfg: LatencyPolicyConfig) -> float:
    """Max over replicas of the predicted TTFT of the newest queued request, / objective: it waits
    for the (queued - 1) requests ahead of it, each holding the engine mean_service_ms (batch 1).
    queued = the replica's in-flight requests + an even share of those Ray holds before replicas
    (ongoing_requests - sum of in-flight). Replicas without enough samples or no service time: 0."""
    reps = list(snapshot.replicas)
    outside = 0.0
    if snapshot.ongoing_requests is not None and reps:
        outside = max(0.0, snapshot.ongoing_requests - sum(r.in_flight for r in reps)) / len(reps)
    worst = 0.0
    for r in counted:
        if r.mean_service_ms:
            worst = max(worst, max(0.0, r.in_flight + outside - 1.0) * r.mean_service_ms)
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
    """Replicas the measured demand needs at demand_utilization; None without the inputs."""
    if (cfg.demand_utilization is None or fs.busy is None or state.ongoing_growth is None
            or fs.request_rate <= 0):
        return None
    service_s = fs.busy / fs.request_rate
    done = fs.recent_samples / cfg.recent_window_s if fs.recent_samples else fs.request_rate
    return math.ceil((done + max(0.0, state.ongoing_growth)) * service_s / cfg.demand_utilization)


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

    # 3. Breach: scale up.
    subsiding = (
        ratio > 1.0
        and not queued > 1.0          # queued requests: their slow samples are still to come
        and cfg.confirm_with_recent
        and fs.recent_ratio is not None
        and fs.recent_ratio <= 1.0
    )
    if subsiding:
        # The long window still holds slow samples, but the last few seconds are fine.
        return out(base, "hold", "breach_subsiding", breach_since=None, low_since=None)
    if ratio > 1.0:
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
        target = max(base + 1, min(want, base + step_up(base, cfg), hi))
        need = demand_replicas(fs, state, cfg)
        if need is not None:
            inputs["demand_replicas"] = need
            if need <= current:
                return out(base, "hold", "breach_backlog_draining", breach_since=breach_since, low_since=None)
            target = max(base + 1, need)
        target = min(target, hi)
        inputs["proportional_target"] = want
        return out(target, "up", "queue_predicts_breach" if queue_breach else "p99_above_objective",
                   breach_since=None, low_since=None, last_scale_up_at=now, up_ready_at=None)

    # 4. Well under: maybe scale down.
    if ratio < cfg.downscale_headroom:
        low_since = state.low_since if state.low_since is not None else now
        inputs["low_for_s"] = round(_elapsed(now, low_since), 3)
        if now - low_since < cfg.downscale_delay_s:
            return out(base, "hold", "low_waiting_delay", breach_since=None, low_since=low_since)
        last_action = max(
            (t for t in (state.last_scale_up_at, state.last_scale_down_at) if t is not None),
            default=None,
        )
        if last_action is not None and now - last_action < cfg.downscale_cooldown_s:
            return out(base, "hold", "downscale_cooldown", breach_since=None, low_since=low_since)
        if base <= lo:
            return out(base, "hold", "at_min", breach_since=None, low_since=low_since)
        # Load per remaining replica grows by serving/n; P99 predicted to grow with it.
        # The busy time the fleet carries is spread over the remaining replicas (capacity guard).
        serving = max(current, 1)
        target = base
        predicted = ratio
        saturates = False
        for n in range(max(lo, base - step_down(base, cfg)), base):
            p = ratio * serving / n if n > 0 else (0.0 if idle else math.inf)
            util = None if (fs.busy is None or n == 0) else fs.busy / n
            if util is not None and cfg.max_utilization is not None and util > cfg.max_utilization:
                saturates = True
                continue
            if p <= cfg.target_ratio:
                target, predicted = n, p
                break
        inputs["predicted_ratio_after"] = round(predicted, 4) if math.isfinite(predicted) else None
        if fs.busy is not None and target > 0:
            inputs["utilization_after"] = round(fs.busy / target, 4)
        if fs.request_rate > 0 and target > 0:
            inputs["load_per_replica_now"] = round(fs.request_rate / serving, 3)
            inputs["load_per_replica_after"] = round(fs.request_rate / target, 3)
        if target >= base:
            return out(base, "hold", "downscale_would_saturate" if saturates else "downscale_would_breach",
                       breach_since=None, low_since=low_since)
        return out(target, "down", "idle" if (idle and not enough) else "p99_well_under_objective",
                   breach_since=None, low_since=None, last_scale_down_at=now)

    # 5. Hysteresis band: nothing sustained, nothing to do.
    return out(base, "hold", "within_band", breach_since=None, low_since=None)
