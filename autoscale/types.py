"""The latency policy's inputs and outputs: its config, a fleet snapshot, its own state, its decision."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Optional, Sequence

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
    fleet_p99: Literal["max", "weighted", "mixture"] = Field(
        default="max",
        description="The fleet P99 from the replica P99s: their max (bounds the merged P99 from above); "
        "their sample-weighted mean; or mixture, the P99 of the merged samples with each replica's tail "
        "taken as exponential through its P99 (at hundreds of replicas the max of the replica P99s is "
        "a far higher quantile than the fleet's P99: docs/simulation.md); mixture also takes the queue "
        "signal as the P99 of every queued request's predicted wait, not the newest one's worst.")
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
    max_utilization_pooled: Optional[float] = Field(
        default=0.65, gt=0, le=1,
        description="The capacity guard's limit for a larger fleet: n remaining replicas behind one "
        "router pool their queues, so their spare capacity need only grow with sqrt(n) (square-root "
        "staffing): each may run at up to 1 - (1 - max_utilization) x sqrt(2 / n), at most this; "
        "fleets of up to 2 (where max_utilization was measured) keep max_utilization. 0.65 leaves "
        "room for a 1.5x burst at 0.975 (docs/simulation.md); a load without bursts can take up to "
        "~0.8. None: max_utilization at every size.",
    )
    downscale_repeat_s: Optional[float] = Field(
        default=None, ge=0,
        description="A scale-down may follow the last scale-down after this long while the P99 stays "
        "well under (its low period carries over; the guard then reads the recent completion rate). "
        "None: every scale-down waits downscale_delay_s of low P99 afresh and downscale_cooldown_s.",
    )
    scale_up_utilization: Optional[float] = Field(
        default=None, gt=0, le=1,
        description="Also scale up (after upscale_delay_s) while the replicas are busier than this in "
        "both the window and the recent sub-window, to demand_utilization: at batch 1 the P99 stays "
        "flat until a replica saturates. None: the latency signals only.",
    )
    busy_per_slot: bool = Field(
        default=False,
        description="A batched engine's replicas (max_batch > 1 in their stats) count busy time, demand "
        "and the queue signal per request at full batch: a replica that reports mean_full_batch_ms is "
        "busy rate x that (1.0 at its full-batch throughput, however full it runs now) and a slot frees "
        "every mean_full_batch_ms; one that does not, per KV slot (service time / slots, which "
        "understates a replica running few rows: docs/simulation.md). Only where every slot is usable: "
        "a deployment whose max_ongoing_requests is below the engine's slots (the 8-slot CPU engine at 1 "
        "in tests/test_autoscale_ray.py) runs as batch 1. Off: every replica as batch 1.",
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
        default=0.65, gt=0, le=1,
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
    max_batch: Optional[float] = None  # the engine's KV slots (None: batch 1)
    # mean cost of a request at the engine's full batch (prefill + its other tokens' decode steps at
    # full batch / the batch's rows), so rate x it is the replica's load against its real capacity
    # however full it runs now; None where the replica doesn't report it (or had no sample with one)
    mean_full_batch_ms: Optional[float] = None

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
            max_batch=num("max_batch", None),
            mean_full_batch_ms=num("mean_full_batch_ms", None) or None,   # the window's 0.0: none
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
