"""Unit tests of the latency autoscaling policy: LatencyWindow, the pure `decide`, the Ray
adapter's translation (with a real AutoscalingContext object, no cluster), and synthetic
traces (step, ramp, spike, noisy steady load) through a closed-loop fleet simulator that
feeds real LatencyWindows.
"""
from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import numpy as np
import pytest

from autoscale.policy import (
    FleetSnapshot,
    LatencyPolicyConfig,
    PolicyState,
    ReplicaStats,
    decide,
    fleet_stats,
)
from autoscale.window import SNAPSHOT_KEYS, LatencyWindow, percentile


# ============================================================================ window
class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_percentile_nearest_rank():
    assert percentile([], 99) == 0.0
    assert percentile([5.0], 99) == 5.0
    vals = list(range(1, 201))  # 1..200
    assert percentile(vals, 99) == 198  # ceil(0.99*200) = 198th
    assert percentile(vals, 50) == 100
    assert percentile(list(range(1, 51)), 99) == 50  # < 100 samples: the max


def test_window_snapshot_contract_and_values():
    clock = FakeClock()
    w = LatencyWindow(window_s=10, clock=clock)
    empty = w.snapshot()
    assert tuple(empty) == SNAPSHOT_KEYS
    assert all(type(v) is float and math.isfinite(v) for v in empty.values())
    assert empty["samples"] == 0.0 and empty["p99_ttft_ms"] == 0.0

    clock.t += 10  # replica alive for a full window
    for _ in range(99):
        w.record(0.010, 0.100)  # 10 ms TTFT, 100 ms e2e
    w.record(0.500, 2.0)
    assert w.snapshot()["p99_ttft_ms"] == pytest.approx(10.0)  # 1 slow of 100: not the P99
    w.record(0.500, 2.0)  # 2 slow of 101 (> 1%): now it is
    w.set_in_flight(3)
    s = w.snapshot()
    assert all(type(v) is float for v in s.values())
    assert s["samples"] == 101.0
    assert s["p99_ttft_ms"] == pytest.approx(500.0)
    assert s["p99_e2e_ms"] == pytest.approx(2000.0)
    assert s["request_rate"] == pytest.approx(101 / 10)
    assert s["in_flight"] == 3.0


def test_window_slides_and_ignores_bad_samples():
    clock = FakeClock()
    w = LatencyWindow(window_s=5, recent_s=0.6, clock=clock)
    w.record(1.0, 1.0, now=clock.t)  # slow, old
    for k in range(1, 300):
        w.record(0.01, 0.02, now=clock.t + 3 + k * 0.001)
    assert w.snapshot(now=clock.t + 4)["p99_ttft_ms"] == pytest.approx(10.0)  # 1/300 < 1%
    # the recent sub-window (0.6 s) only sees the newest samples
    for _ in range(3):
        w.record(0.9, 0.9, now=clock.t + 3.5)
    snap = w.snapshot(now=clock.t + 4)
    assert snap["p99_ttft_ms"] == pytest.approx(900.0)  # 4 of 303 slow: > 1%
    assert snap["recent_samples"] == 3.0 and snap["p99_ttft_recent_ms"] == pytest.approx(900.0)
    assert w.snapshot(now=clock.t + 4.5)["recent_samples"] == 0.0
    w.record(float("nan"), 0.1)
    w.record(-1.0, 0.1)
    assert w.snapshot(now=clock.t + 4)["samples"] == 303.0  # nan / negative not recorded
    # 5 s later than the old sample: it left the window; 9 s: everything left.
    assert w.snapshot(now=clock.t + 5.5)["samples"] == 302.0
    assert w.snapshot(now=clock.t + 9)["samples"] == 0.0
    # Rate of a young replica is over its age, not the whole window.
    young = LatencyWindow(window_s=30, clock=FakeClock(0.0))
    for _ in range(10):
        young.record(0.01, 0.01, now=1.0)
    assert young.snapshot(now=2.0)["request_rate"] == pytest.approx(5.0)


def test_window_thread_safe():
    w = LatencyWindow(window_s=60)
    n_threads, per = 8, 2000

    def feed(k: int):
        for i in range(per):
            w.record(0.001 * (i % 50), 0.002)
            w.set_in_flight(k)
            if i % 200 == 0:
                w.snapshot()

    threads = [threading.Thread(target=feed, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert w.snapshot()["samples"] == n_threads * per


# =========================================================================== helpers
CFG = LatencyPolicyConfig(
    p99_ttft_ms=50,
    min_replicas=1,
    max_replicas=8,
    upscale_delay_s=10,
    downscale_delay_s=60,
    downscale_headroom=0.6,
    target_ratio=0.8,
    min_samples=20,
    min_replica_samples=5,
    upscale_cooldown_s=30,
    downscale_cooldown_s=60,
    max_step_up=4,
    max_step_down=1,
)


def fleet(p99s, samples=100.0, rate=10.0, current=None, target=None, e2e=None, in_flight=1.0,
          ongoing=None) -> FleetSnapshot:
    reps = [
        ReplicaStats(f"r{i}", p99_ttft_ms=p, p99_e2e_ms=(e2e[i] if e2e else p * 4),
                     request_rate=rate, in_flight=in_flight, samples=samples)
        for i, p in enumerate(p99s)
    ]
    n = len(p99s) if current is None else current
    return FleetSnapshot(tuple(reps), current_replicas=n, target_replicas=n if target is None else target,
                         ongoing_requests=ongoing)


def run_open_loop(p99_at: Callable[[float], float], cfg=CFG, start=1, t_end=600.0, dt=1.0,
                  samples_at: Callable[[float], float] = lambda t: 200.0):
    """Feed a P99 trace (ms, same on every replica) through decide; replicas start at once."""
    state, n, out = PolicyState(), start, []
    t = 0.0
    while t <= t_end:
        snap = fleet([p99_at(t)] * n, samples=samples_at(t) / n)
        d, state = decide(snap, state, cfg, t)
        out.append((t, d))
        n = d.target_replicas
        t += dt
    return out


def actions(trace) -> List[tuple]:
    return [(t, d.direction, d.target_replicas) for t, d in trace if d.direction != "hold"]


def direction_changes(trace) -> int:
    dirs = [d.direction for _, d in trace if d.direction != "hold"]
    return sum(1 for a, b in zip(dirs, dirs[1:]) if a != b)


# ================================================================ decide: units
def test_reacts_to_step_within_upscale_delay():
    trace = run_open_loop(lambda t: 30.0 if t < 100 else 120.0, t_end=200)
    ups = [(t, n) for t, d, n in actions(trace) if d == "up"]
    assert ups, actions(trace)
    t_up, n_up = ups[0]
    assert 100 + CFG.upscale_delay_s <= t_up <= 100 + CFG.upscale_delay_s + 1.0
    # proportional: ratio 2.4 at 1 replica aiming at 0.8 -> ceil(3.0) = 3
    assert n_up == 3
    # nothing happened before the step
    assert all(t >= 100 for t, *_ in actions(trace))


def test_breach_shorter_than_delay_is_ignored():
    trace = run_open_loop(lambda t: 200.0 if 100 <= t < 108 else 30.0, t_end=300)
    assert actions(trace) == []


def test_proportional_and_step_capped():
    d, _ = decide(fleet([100.0] * 4), PolicyState(breach_since=0.0), CFG, 100.0)
    # ratio 2 x 4 replicas / 0.8 = 10, capped at +4
    assert (d.direction, d.target_replicas, d.inputs["proportional_target"]) == ("up", 8, 10)
    big = CFG.model_copy(update={"max_step_up": 100, "max_replicas": 100})
    d, _ = decide(fleet([100.0] * 4), PolicyState(breach_since=0.0), big, 100.0)
    assert d.target_replicas == 10
    # just over the objective still adds one
    d, _ = decide(fleet([50.5] * 4), PolicyState(breach_since=0.0), big, 100.0)
    assert d.target_replicas == 6  # ceil(4 * 1.01 / 0.8)


def test_respects_bounds():
    # never above max
    trace = run_open_loop(lambda t: 1000.0, t_end=600)
    assert max(d.target_replicas for _, d in trace) == CFG.max_replicas
    assert trace[-1][1].reason == "at_max"
    # never below min
    cfg = CFG.model_copy(update={"min_replicas": 2})
    trace = run_open_loop(lambda t: 1.0, cfg=cfg, start=5, t_end=2000)
    assert min(d.target_replicas for _, d in trace) == 2
    assert trace[-1][1].target_replicas == 2 and trace[-1][1].reason == "at_min"
    # out-of-bounds targets are clamped at once, whatever the latency says
    d, _ = decide(fleet([10.0]), PolicyState(), cfg, 0.0)
    assert (d.direction, d.target_replicas, d.reason) == ("up", 2, "below_min")
    d, _ = decide(fleet([500.0] * 9), PolicyState(), CFG, 0.0)
    assert (d.direction, d.target_replicas, d.reason) == ("down", 8, "above_max")
    # platform bounds (Ray's) intersect the config's: the stricter wins
    snap = FleetSnapshot(fleet([500.0] * 3).replicas, 3, 3, min_replicas=1, max_replicas=3)
    d, _ = decide(snap, PolicyState(breach_since=0.0), CFG, 100.0)
    assert (d.direction, d.reason) == ("hold", "at_max")


def test_ignores_windows_with_too_few_samples():
    # A breach seen through 10 samples/window: never scales up.
    trace = run_open_loop(lambda t: 500.0, t_end=600, samples_at=lambda t: 10.0)
    assert actions(trace) == []
    assert {d.reason for _, d in trace} == {"insufficient_samples"}
    # ... nor down (low P99 from a trickle of requests is no evidence either).
    trace = run_open_loop(lambda t: 1.0, start=4, t_end=1000, samples_at=lambda t: 10.0)
    assert actions(trace) == []
    # A thin window in the middle of a breach restarts the delay.
    trace = run_open_loop(lambda t: 500.0, t_end=60,
                          samples_at=lambda t: 10.0 if t == 8 else 200.0)
    assert actions(trace)[0][0] == 9 + CFG.upscale_delay_s
    # Replicas below min_replica_samples don't set the fleet P99 (but count to the total).
    snap = FleetSnapshot((ReplicaStats("a", 20.0, samples=50), ReplicaStats("b", 900.0, samples=3)), 2, 2)
    assert fleet_stats(snap, CFG).p99_ttft_ms == 20.0
    assert fleet_stats(snap, CFG).samples == 53


def test_scale_down_needs_sustained_low_p99():
    # Low for 59 s, one in-band tick, low again: the scale-down comes a full delay later.
    def p99(t):
        return 40.0 if t == 59 else 10.0

    trace = run_open_loop(p99, start=3, t_end=200)
    downs = [(t, n) for t, d, n in actions(trace) if d == "down"]
    assert downs[0] == (60 + CFG.downscale_delay_s, 2)
    # and then one step per downscale_delay (delay restarts after each step, cooldown 60)
    assert downs[1][0] - downs[0][0] >= max(CFG.downscale_delay_s, CFG.downscale_cooldown_s)


def test_scale_down_only_if_remaining_replicas_stay_under():
    cfg = CFG.model_copy(update={"downscale_delay_s": 0, "downscale_cooldown_s": 0, "max_replicas": 16})
    # ratio 0.55 (< 0.6 headroom) on 2 replicas: 1 replica predicted at 1.1 -> refuse.
    d, _ = decide(fleet([27.5, 27.5]), PolicyState(), cfg, 0.0)
    assert (d.direction, d.reason) == ("hold", "downscale_would_breach")
    assert d.inputs["predicted_ratio_after"] is not None
    # same ratio on 10 replicas: 9 predicted at 0.61 -> fine.
    d, _ = decide(fleet([27.5] * 10), PolicyState(), cfg, 0.0)
    assert (d.direction, d.target_replicas) == ("down", 9)
    assert d.inputs["predicted_ratio_after"] == pytest.approx(0.55 * 10 / 9, abs=1e-3)
    assert d.inputs["load_per_replica_after"] > d.inputs["load_per_replica_now"]
    # max_step_down > 1 removes as many as stay under target_ratio
    d, _ = decide(fleet([10.0] * 10), PolicyState(), cfg.model_copy(update={"max_step_down": 8}), 0.0)
    assert d.target_replicas == 3  # 0.2 * 10 / 3 = 0.67 <= 0.8; / 2 = 1.0 > 0.8


def test_cooldowns_and_pending_scale_up():
    # Scale-up still starting (current < target): no second scale-up.
    snap = fleet([200.0], current=1, target=3)
    d, _ = decide(snap, PolicyState(breach_since=0.0), CFG, 100.0)
    assert (d.direction, d.reason, d.target_replicas) == ("hold", "scale_up_pending", 3)
    # Replicas up, slow samples still in their windows: cooldown (counted from when the new
    # replicas run, not from the decision) holds.
    st = PolicyState(breach_since=0.0, last_scale_up_at=10.0)
    d, st = decide(fleet([200.0] * 3), st, CFG, 100.0)
    assert (d.direction, d.reason, st.up_ready_at) == ("hold", "upscale_cooldown", 100.0)
    d, st = decide(fleet([200.0] * 3), st, CFG, 100.0 + CFG.upscale_cooldown_s - 1)
    assert d.reason == "upscale_cooldown"
    d, st = decide(fleet([200.0] * 3), st, CFG, 100.0 + CFG.upscale_cooldown_s)
    assert d.direction == "up"
    # No scale-down right after a scale-up, even when P99 has been low long enough.
    d, _ = decide(fleet([5.0] * 3), PolicyState(low_since=0.0, last_scale_up_at=80.0), CFG, 100.0)
    assert (d.direction, d.reason) == ("hold", "downscale_cooldown")


def test_e2e_objective_and_fleet_aggregation():
    cfg = CFG.model_copy(update={"p99_e2e_ms": 400})
    snap = fleet([20.0, 20.0], e2e=[300.0, 900.0])
    fs = fleet_stats(snap, cfg)
    assert fs.p99_e2e_ms == 900.0 and fs.ratio == pytest.approx(900 / 400)
    d, _ = decide(snap, PolicyState(breach_since=0.0), cfg, 100.0)
    assert d.direction == "up"
    # weighted: the sample-weighted mean of replica P99s
    w = CFG.model_copy(update={"fleet_p99": "weighted"})
    snap = FleetSnapshot((ReplicaStats("a", 10.0, samples=300), ReplicaStats("b", 90.0, samples=100)), 2, 2)
    assert fleet_stats(snap, w).p99_ttft_ms == pytest.approx(30.0)
    assert fleet_stats(snap, CFG).p99_ttft_ms == 90.0


def test_idle_fleet_shrinks_to_min():
    snap = fleet([0.0] * 3, samples=0.0, rate=0.0, in_flight=0.0, ongoing=0.0)
    state, t, n = PolicyState(), 0.0, 3
    seen = []
    while t < 400:
        snap = fleet([0.0] * n, samples=0.0, rate=0.0, in_flight=0.0, ongoing=0.0)
        d, state = decide(snap, state, CFG, t)
        if d.direction != "hold":
            seen.append((t, d.target_replicas, d.reason))
        n = d.target_replicas
        t += 1.0
    assert [x[1] for x in seen] == [2, 1] and {x[2] for x in seen} == {"idle"}
    # requests queued somewhere (ongoing > 0) -> not idle -> no decision from no samples
    d, _ = decide(fleet([0.0] * 3, samples=0.0, in_flight=0.0, ongoing=2.0),
                  PolicyState(low_since=0.0), CFG, 1000.0)
    assert d.reason == "insufficient_samples"


def test_decide_is_pure_and_state_roundtrips():
    snap = fleet([120.0] * 2)
    state = PolicyState(breach_since=5.0)
    a = decide(snap, state, CFG, 20.0)
    b = decide(snap, state, CFG, 20.0)
    assert a == b
    assert state == PolicyState(breach_since=5.0)  # input state untouched
    d, new = a
    again = PolicyState.from_dict(json.loads(json.dumps(new.to_dict())))
    assert again == new
    assert PolicyState.from_dict({"breach_since": "garbage"}) == PolicyState()
    json.dumps(d.as_dict())  # the logged inputs are JSON-able


def test_config_validation():
    with pytest.raises(ValueError):
        LatencyPolicyConfig(p99_ttft_ms=50, min_replicas=4, max_replicas=2)
    with pytest.raises(ValueError):
        LatencyPolicyConfig(p99_ttft_ms=50, downscale_headroom=0.9, target_ratio=0.8)
    with pytest.raises(ValueError):
        LatencyPolicyConfig(p99_ttft_ms=0)
    with pytest.raises(ValueError):
        LatencyPolicyConfig(p99_ttft_ms=50, p99_ttf_ms=3)  # typo'd key is an error


# ====================================================== closed-loop fleet simulator
@dataclass
class SimReplica:
    window: LatencyWindow
    ready_at: float


@dataclass
class FleetSim:
    """Fleet of M/M/1-like replicas (service rate `mu` req/s each) behind an even router.

    Each tick draws Poisson arrivals per running replica, exponential sojourn times
    (rate mu - lambda_i, floored at 5% of mu when overloaded) and service times (rate mu),
    records them into a *real*
    LatencyWindow per replica, then asks `decide` what to do.  New replicas serve after
    `startup_s`; removed ones leave at once (newest / still-starting first).
    """

    load: Callable[[float], float]
    cfg: LatencyPolicyConfig = CFG
    mu: float = 200.0
    startup_s: float = 5.0
    window_s: float = 30.0
    dt: float = 1.0
    start_replicas: int = 1
    seed: int = 0
    t: float = 0.0
    replicas: List[SimReplica] = field(default_factory=list)
    log: List[tuple] = field(default_factory=list)  # (t, decision, running, true_p99_ms)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)
        self.replicas = [self._new(ready_at=-1.0) for _ in range(self.start_replicas)]
        self.state = PolicyState()

    def _new(self, ready_at: float) -> SimReplica:
        return SimReplica(LatencyWindow(self.window_s, clock=lambda: self.t), ready_at)

    def run(self, t_end: float) -> "FleetSim":
        while self.t < t_end:
            self.t += self.dt
            running = [r for r in self.replicas if r.ready_at <= self.t]
            lam_i = self.load(self.t) / max(len(running), 1)
            rate = max(self.mu - lam_i, 0.05 * self.mu)
            for r in running:
                n = self.rng.poisson(lam_i * self.dt)
                lat = self.rng.exponential(1.0 / rate, size=n)
                ts = self.t - self.dt + self.rng.uniform(0, self.dt, size=n)
                held = self.rng.exponential(1.0 / self.mu, size=n)  # M/M/1: exp(mu) on the server
                for x, when, s in zip(lat, ts, held):
                    r.window.record(x, x + 0.05, now=when, service_s=s)
            snap = FleetSnapshot(
                tuple(ReplicaStats.from_snapshot(str(i), r.window.snapshot(now=self.t))
                      for i, r in enumerate(running)),
                current_replicas=len(running),
                target_replicas=len(self.replicas),
            )
            d, self.state = decide(snap, self.state, self.cfg, self.t)
            while len(self.replicas) < d.target_replicas:
                self.replicas.append(self._new(ready_at=self.t + self.startup_s))
            while len(self.replicas) > d.target_replicas:
                self.replicas.pop()  # newest first
            self.log.append((self.t, d, len(running), math.log(100) / rate * 1000))
        return self

    # views
    def actions(self):
        return [(t, d.direction, d.target_replicas) for t, d, *_ in self.log if d.direction != "hold"]

    def direction_changes(self) -> int:
        return direction_changes([(t, d) for t, d, *_ in self.log])

    def true_p99_ms(self, t0: float, t1: float) -> List[float]:
        return [p for t, _, _, p in self.log if t0 <= t <= t1]


# Per replica: P99 = ln(100)/(mu - lambda_i). With mu = 200/s and a 50 ms objective the
# objective holds up to lambda_i ~ 108/s; "well under" (30 ms) below ~47/s.


def test_sim_step_reacts_within_delay_and_settles():
    sim = FleetSim(load=lambda t: 60.0 if t < 200 else 400.0).run(900)
    acts = sim.actions()
    ups = [a for a in acts if a[1] == "up"]
    assert ups and ups[0][0] <= 200 + CFG.upscale_delay_s + 2 * sim.dt, acts
    assert all(a[0] >= 200 for a in acts)  # steady 60 req/s on 1 replica: nothing to do
    assert not [a for a in acts if a[1] == "down"], acts  # the load never dropped
    # settled under the objective, with no actions in the last 5 minutes
    assert max(sim.true_p99_ms(600, 900)) <= CFG.p99_ttft_ms
    assert not [a for a in acts if a[0] > 600]


def test_sim_ramp_scales_monotonically():
    sim = FleetSim(load=lambda t: 50.0 + min(t, 400.0) * (650.0 / 400.0)).run(700)
    acts = sim.actions()
    assert acts and all(a[1] == "up" for a in acts), acts  # never down while load grows
    targets = [a[2] for a in acts]
    assert targets == sorted(targets)
    assert max(sim.true_p99_ms(550, 700)) <= CFG.p99_ttft_ms
    assert sim.direction_changes() == 0


def test_breach_must_still_be_happening():
    """The long window still holds a spike's slow samples; the recent sub-window is fine."""
    reps = tuple(ReplicaStats(f"r{i}", 200.0, 300.0, 10.0, 1.0, 300.0,
                              p99_ttft_recent_ms=20.0, p99_e2e_recent_ms=40.0, recent_samples=50.0)
                 for i in range(2))
    d, st = decide(FleetSnapshot(reps, 2, 2), PolicyState(breach_since=0.0), CFG, 100.0)
    assert (d.direction, d.reason, st.breach_since) == ("hold", "breach_subsiding", None)
    # too few recent samples to trust: the long window decides
    thin = tuple(ReplicaStats(r.replica_id, 200.0, 300.0, 10.0, 1.0, 300.0, 20.0, 40.0, 1.0) for r in reps)
    d, _ = decide(FleetSnapshot(thin, 2, 2), PolicyState(breach_since=0.0), CFG, 100.0)
    assert d.direction == "up"
    # confirmed: sized on the smaller of the two excesses (window 4x, recent 1.2x)
    hot = tuple(ReplicaStats(r.replica_id, 200.0, 300.0, 10.0, 1.0, 300.0, 60.0, 90.0, 50.0) for r in reps)
    d, _ = decide(FleetSnapshot(hot, 2, 2), PolicyState(breach_since=0.0), CFG, 100.0)
    assert (d.direction, d.target_replicas) == ("up", 3)  # ceil(2 * 1.2 / 0.8)


def test_sim_spike_scales_once_and_returns_without_oscillation():
    # 20 s of 2x overload on the 1-replica fleet, then back to baseline.
    sim = FleetSim(load=lambda t: 300.0 if 200 <= t < 220 else 50.0).run(1200)
    acts = sim.actions()
    ups = [a for a in acts if a[1] == "up"]
    downs = [a for a in acts if a[1] == "down"]
    assert len(ups) == 1, acts
    assert sim.direction_changes() <= 1, acts  # up once, then only down: no oscillation
    # trimmed back, but not before the slow samples left the window and a full downscale
    # delay of low P99 passed; ends at <= 2 replicas (1 -> at 2 replicas P99 is 0.53 of the
    # objective, and the linear load model predicts 1.05 for a single replica: it stays)
    assert downs and downs[0][0] >= 220 + CFG.downscale_delay_s
    assert sim.log[-1][1].target_replicas <= 2
    assert not [a for a in acts if a[0] > 900], acts


def test_sim_short_spike_is_ignored():
    # 2 s of 6x overload: the long window's P99 stays high ~30 s, but the breach is over
    # (recent sub-window) well before the upscale delay.
    sim = FleetSim(load=lambda t: 300.0 if 300 < t <= 302 else 50.0).run(600)
    assert sim.actions() == []
    reasons = {d.reason for t, d, *_ in sim.log if 300 < t < 340}
    assert "breach_subsiding" in reasons  # it did see the slow samples


def _noise(seed: int, sigma: float = 0.25):
    rng = np.random.default_rng(100 + seed)
    return rng.lognormal(0.0, sigma, size=5000)


@pytest.mark.parametrize("seed", [0, 1])
def test_sim_noisy_steady_load_never_flaps(seed):
    # 150 req/s with 25% log-normal noise tick to tick, for 25 minutes, on the fleet size
    # that load needs (3 replicas: P99 ~ 0.6 of the objective): nothing to do, ever.
    noise = _noise(seed)
    sim = FleetSim(load=lambda t: 150.0 * noise[int(t)], seed=seed, start_replicas=3).run(1500)
    assert sim.actions() == []
    assert max(sim.true_p99_ms(0, 1500)) <= CFG.p99_ttft_ms * 1.5


@pytest.mark.parametrize("seed", [0, 1])
def test_sim_noisy_steady_load_settles_from_cold(seed):
    # Same load hitting a 1-replica fleet: up (capped step), trim, then stay put.
    noise = _noise(seed)
    sim = FleetSim(load=lambda t: 150.0 * noise[int(t)], seed=seed).run(1500)
    acts = sim.actions()
    assert acts and acts[0][1] == "up"
    assert sim.direction_changes() <= 1, acts  # never up again after trimming
    assert len(acts) <= 4, acts
    assert max(sim.true_p99_ms(300, 1500)) <= CFG.p99_ttft_ms * 1.5


# ============================================================ Ray adapter (no cluster)
def _ctx(raw: Dict[str, Dict[str, list]], running: List[str], policy_state=None, current_time=1000.0,
         target=None, cfg=None):
    from ray.serve._private.common import TimeStampedValue
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    series = {k: {rid: [TimeStampedValue(t, v) for t, v in pts] for rid, pts in per.items()}
              for k, per in raw.items()}
    return AutoscalingContext(
        deployment_id=None, deployment_name="Model", app_name="app",
        current_num_replicas=len(running),
        target_num_replicas=len(running) if target is None else target,
        running_replicas=running, total_num_requests=0.0, total_queued_requests=0.0,
        aggregated_metrics=lambda: {}, raw_metrics=lambda: series,
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4,
        policy_state=policy_state or {}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=current_time,
        config=cfg or AutoscalingConfig(min_replicas=1, max_replicas=4, upscale_delay_s=0,
                                        downscale_delay_s=0),
    )


def _raw(per_replica: Dict[str, Dict[str, float]], t: float):
    raw: Dict[str, Dict[str, list]] = {}
    for rid, snap in per_replica.items():
        for k, v in snap.items():
            # an older point first: the adapter must read the newest
            raw.setdefault(k, {})[rid] = [(t - 5, 0.0), (t, v)]
    return raw


def test_adapter_translates_context_and_keeps_state():
    from autoscale.ray_policy import STATE_KEY, LatencyAutoscalingPolicy, snapshot_from_context

    pol = LatencyAutoscalingPolicy(p99_ttft_ms=50, upscale_delay_s=2, min_samples=10)
    slow = {"p99_ttft_ms": 120.0, "p99_e2e_ms": 900.0, "request_rate": 5.0, "in_flight": 2.0, "samples": 40.0}
    ctx = _ctx(_raw({"a": slow}, 1000.0), ["a"], current_time=1000.0)
    snap = snapshot_from_context(ctx)
    assert snap.current_replicas == 1 and snap.max_replicas == 4
    assert snap.replicas[0] == ReplicaStats("a", 120.0, 900.0, 5.0, 2.0, 40.0)

    n, state = pol(ctx)
    assert n == 1 and state[STATE_KEY]["breach_since"] == 1000.0
    json.dumps(state)
    # Ray hands the state back next tick; 2 s later the delay has passed -> scale up.
    ctx2 = _ctx(_raw({"a": slow}, 1002.0), ["a"], policy_state=state, current_time=1002.0)
    n, state = pol(ctx2)
    assert n == 3  # ceil(1 * 2.4 / 0.8), within Ray's max 4
    assert state[STATE_KEY]["last_scale_up_at"] == 1002.0


def test_adapter_scale_up_value_and_stale_or_missing_stats():
    from autoscale.ray_policy import LatencyAutoscalingPolicy, snapshot_from_context

    pol = LatencyAutoscalingPolicy(p99_ttft_ms=50, upscale_delay_s=0, min_samples=10)
    slow = {"p99_ttft_ms": 120.0, "p99_e2e_ms": 900.0, "request_rate": 5.0, "in_flight": 2.0, "samples": 40.0}
    n, _ = pol(_ctx(_raw({"a": slow}, 1000.0), ["a"]))
    assert n == 3  # ceil(1 * 2.4 / 0.8)
    # stats 120 s old are ignored (stats_max_age_s=60): too few samples -> hold
    n, st = pol(_ctx(_raw({"a": slow}, 880.0), ["a"]))
    assert n == 1 and st["hybridserve_latency_policy"]["last_reason"] == "insufficient_samples"
    # a replica that never reported our keys is left out; stopped replicas aren't read
    ctx = _ctx(_raw({"a": slow, "gone": slow}, 1000.0), ["a", "b"])
    assert [r.replica_id for r in snapshot_from_context(ctx).replicas] == ["a"]


# ------------------------------------------------------------------ queue signal (leading)
QCFG = CFG.model_copy(update={"queue_signal": True})


def queued(p99, in_flight, service_ms, n=1, ongoing=None, recent=None):
    """n replicas with P99 TTFT p99 (ms), in_flight requests each, mean service time service_ms."""
    reps = tuple(ReplicaStats(f"r{i}", p99, p99 * 4, 10.0, in_flight, 100.0,
                              p99_ttft_recent_ms=recent, p99_e2e_recent_ms=recent and recent * 4,
                              recent_samples=None if recent is None else 50.0, mean_service_ms=service_ms)
                 for i in range(n))
    return FleetSnapshot(reps, n, n, ongoing_requests=ongoing)


def test_window_reports_mean_service_time():
    clock = FakeClock()
    w = LatencyWindow(window_s=10, clock=clock)
    w.record(0.01, 0.30, service_s=0.10)   # waited 200 ms, held the engine 100 ms
    w.record(0.01, 0.30)                   # no service time given: e2e
    assert w.snapshot()["mean_service_ms"] == pytest.approx(200.0)
    w.record(0.01, 0.30, service_s=float("nan"))   # broken: dropped, like a broken latency
    assert w.snapshot()["samples"] == 2.0


def test_window_reports_mean_cost_at_full_batch_over_the_requests_with_one():
    clock = FakeClock()
    w = LatencyWindow(window_s=10, clock=clock)
    w.record(0.01, 0.30, service_s=0.10)
    assert w.snapshot()["mean_full_batch_ms"] == 0.0            # none recorded with a cost
    w.record(0.01, 0.30, service_s=0.10, full_batch_s=0.020)
    w.record(0.01, 0.30, service_s=0.10, full_batch_s=0.030)
    w.record(0.01, 0.30, service_s=0.10, full_batch_s=float("nan"))   # a broken cost: the sample stays
    s = w.snapshot()
    assert s["samples"] == 4.0 and s["mean_full_batch_ms"] == pytest.approx(25.0)


def test_queue_signal_scales_up_before_the_p99_shows_the_queue():
    # P99 of finished requests 30 ms (0.6 of the 50 ms objective: in the band), but 6 requests wait
    # on the replica, 20 ms each: the newest will see ~100 ms TTFT -> queue ratio 2.0.
    snap = queued(30.0, 6.0, 20.0)
    d, st = decide(snap, PolicyState(), QCFG, 100.0)
    assert (d.direction, d.reason) == ("hold", "breach_waiting_delay")   # the delay still applies
    assert d.inputs["queue_ratio"] == pytest.approx(2.0)
    d, _ = decide(snap, st, QCFG, 100.0 + QCFG.upscale_delay_s)
    assert (d.direction, d.reason, d.target_replicas) == ("up", "queue_predicts_breach", 3)  # ceil(2.0/0.8)
    # off (the default): the same fleet holds in the band
    d, _ = decide(snap, st, CFG, 100.0 + CFG.upscale_delay_s)
    assert (d.direction, d.reason) == ("hold", "within_band")


def test_queue_signal_counts_requests_ray_holds_before_the_replicas():
    # 1 in flight on each of 2 replicas (max_ongoing_requests 1), 10 more queued at the handles:
    # 5 per replica wait behind the running one -> (1 + 5 - 1) * 20 ms = 100 ms -> ratio 2.0
    snap = queued(30.0, 1.0, 20.0, n=2, ongoing=12.0)
    d, _ = decide(snap, PolicyState(breach_since=0.0), QCFG, 100.0)
    assert d.inputs["queue_ratio"] == pytest.approx(2.0) and d.direction == "up"
    # without the outside queue, one running request per replica predicts no wait at all
    d, _ = decide(queued(30.0, 1.0, 20.0, n=2, ongoing=2.0), PolicyState(breach_since=0.0), QCFG, 100.0)
    assert d.inputs["queue_ratio"] == 0.0 and (d.direction, d.reason) == ("hold", "within_band")


def test_queue_breach_is_not_subsiding_and_blocks_a_scale_down():
    # long window breached, recent window fine (would be "subsiding"), but a queue is building
    d, _ = decide(queued(80.0, 6.0, 20.0, recent=20.0), PolicyState(breach_since=0.0), QCFG, 100.0)
    assert d.direction == "up"
    d, _ = decide(queued(80.0, 1.0, 20.0, recent=20.0), PolicyState(breach_since=0.0), QCFG, 100.0)
    assert d.reason == "breach_subsiding"
    # P99 far under the objective for long enough, 2 replicas: a scale-down, unless the queue
    # predicts 0.8 of the objective (above the 0.6 headroom)
    calm = PolicyState(low_since=0.0)
    d, _ = decide(queued(5.0, 1.0, 20.0, n=2), calm, QCFG, 1000.0)
    assert d.direction == "down"
    d, _ = decide(queued(5.0, 3.0, 20.0, n=2), calm, QCFG, 1000.0)
    assert d.direction == "hold" and d.inputs["queue_ratio"] == pytest.approx(0.8)


def test_adapter_passes_the_window_service_time_to_the_queue_signal():
    """A real LatencyWindow snapshot goes through Ray's context into the policy: its mean service
    time and in-flight count scale the deployment up while the P99 is still under the objective."""
    from autoscale.ray_policy import STATE_KEY, LatencyAutoscalingPolicy, snapshot_from_context

    clock = FakeClock()
    w = LatencyWindow(window_s=30, clock=clock)
    clock.t += 30
    for _ in range(40):
        w.record(0.030, 0.120, service_s=0.020)     # 30 ms TTFT (objective 50), 20 ms on the engine
    w.set_in_flight(6)
    raw = _raw({"a": w.snapshot()}, 1000.0)
    assert snapshot_from_context(_ctx(raw, ["a"])).replicas[0].mean_service_ms == pytest.approx(20.0)
    pol = LatencyAutoscalingPolicy(p99_ttft_ms=50, upscale_delay_s=0, min_samples=10, queue_signal=True)
    n, state = pol(_ctx(raw, ["a"], current_time=1000.0))
    assert n == 3 and state[STATE_KEY]["last_reason"] == "queue_predicts_breach"   # ceil(2.0 / 0.8)
    n, _ = LatencyAutoscalingPolicy(p99_ttft_ms=50, upscale_delay_s=0, min_samples=10)(_ctx(raw, ["a"]))
    assert n == 1


# ------------------------------------------------- capacity guard (batch-1 latency cliff)
def test_scale_down_keeps_the_remaining_replicas_under_max_utilization():
    """The 2x H200 fleet run of 2026-11-27, 40 s after the 5x step: two replicas, each finishing
    4.27 req/s of 117 ms on the engine (busy half the time), P99 TTFT 20 ms against a 468.6 ms
    objective. The P99 model predicts 0.09 of the objective for one replica, but one replica would
    carry a whole replica's worth of work: hold. The same P99s at the steady rate (1.7 req/s for
    the fleet, 0.2 busy) do scale down."""
    cfg = CFG.model_copy(update={"p99_ttft_ms": 468.6, "queue_signal": True})

    def snap(rate_each):
        reps = tuple(ReplicaStats(f"r{i}", 20.0, 130.0, rate_each, 1.0, 128.0, mean_service_ms=117.0)
                     for i in range(2))
        return FleetSnapshot(reps, 2, 2)

    calm = PolicyState(low_since=0.0)
    d, _ = decide(snap(4.27), calm, cfg, 1000.0)
    assert (d.direction, d.reason) == ("hold", "downscale_would_saturate")
    assert d.inputs["busy_replicas"] == pytest.approx(0.999, abs=1e-3)
    assert d.inputs["predicted_ratio_after"] == pytest.approx(0.0427, abs=1e-3)   # the P99 model says go
    d, _ = decide(snap(0.85), calm, cfg, 1000.0)
    assert (d.direction, d.target_replicas) == ("down", 1)
    assert d.inputs["utilization_after"] == pytest.approx(0.199, abs=1e-3)
    # without the guard, the first fleet scales down (what the GPU run did)
    d, _ = decide(snap(4.27), calm, cfg.model_copy(update={"max_utilization": None}), 1000.0)
    assert (d.direction, d.reason) == ("down", "p99_well_under_objective")
    # a replica that doesn't report its service time switches the guard off, never crashes it
    reps = (ReplicaStats("a", 20.0, 130.0, 4.27, 1.0, 128.0, mean_service_ms=117.0),
            ReplicaStats("b", 20.0, 130.0, 4.27, 1.0, 128.0))
    d, _ = decide(FleetSnapshot(reps, 2, 2), calm, cfg, 1000.0)
    assert d.inputs["busy_replicas"] is None and d.direction == "down"


@dataclass
class Batch1Sim:
    """Batch-1 FIFO replicas (the engine: one request at a time, a fixed time on the engine),
    Poisson arrivals sent to the replica with the fewest requests in flight, real LatencyWindows
    fed each request's TTFT, e2e and service time when it finishes.  Latency is flat until a
    replica saturates, then its queue grows without bound: the cliff the M/M/1 FleetSim smooths."""

    load: Callable[[float], float]  # req/s
    cfg: LatencyPolicyConfig
    service_s: float = 0.117
    prefill_s: float = 0.006
    startup_s: float = 8.0
    max_replicas: int = 2
    dt: float = 1.0
    seed: int = 0

    def run(self, t_end: float) -> "Batch1Sim":
        rng = np.random.default_rng(self.seed)
        self.t, self.state, self.log, self.ttfts = 0.0, PolicyState(), [], []
        # per replica: [window, ready_at, free_at, pending [(finish, ttft, e2e)]]
        reps = [[LatencyWindow(30.0, clock=lambda: self.t), -1.0, 0.0, []]]
        while self.t < t_end:
            t0, self.t = self.t, self.t + self.dt
            running = [r for r in reps if r[1] <= t0]
            n = rng.poisson(self.load(self.t) * self.dt)
            for a in np.sort(rng.uniform(t0, self.t, size=n)):
                r = min(running, key=lambda r: sum(1 for f, *_ in r[3] if f > a))
                start = max(a, r[2])
                r[2] = start + self.service_s
                r[3].append((r[2], start - a + self.prefill_s, r[2] - a))
                self.ttfts.append((a, start - a + self.prefill_s))
            for r in running:
                for f, ttft, e2e in [p for p in r[3] if p[0] <= self.t]:
                    r[0].record(ttft, e2e, now=f, service_s=self.service_s)
                r[3] = [p for p in r[3] if p[0] > self.t]
                r[0].set_in_flight(len(r[3]))
            snap = FleetSnapshot(
                tuple(ReplicaStats.from_snapshot(str(i), r[0].snapshot(now=self.t)) for i, r in enumerate(running)),
                current_replicas=len(running), target_replicas=len(reps), max_replicas=self.max_replicas)
            d, self.state = decide(snap, self.state, self.cfg, self.t)
            while len(reps) < d.target_replicas:
                reps.append([LatencyWindow(30.0, clock=lambda: self.t), self.t + self.startup_s, self.t, []])
            while len(reps) > d.target_replicas:
                reps.pop()   # newest first; its queue drains off the books
            self.log.append((self.t, d))
        return self

    def actions(self):
        return [(t, d.direction, d.target_replicas) for t, d in self.log if d.direction != "hold"]


# The fleet run's setting: 117 ms per request, objective 4x that, 0.2 of one replica's capacity
# for 60 s, then 5x: exactly one replica's capacity, held for 300 s, on at most 2 replicas.
FLEET_CFG = LatencyPolicyConfig(p99_ttft_ms=468.6, upscale_delay_s=5.0, downscale_delay_s=60.0,
                                min_samples=10, queue_signal=True)
FLEET_LOAD = lambda t: (0.2 if t < 60 else 1.0) / 0.117  # noqa: E731


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch1_sim_step_to_one_replicas_capacity_scales_up_once_and_stays(seed):
    sim = Batch1Sim(FLEET_LOAD, FLEET_CFG, seed=seed).run(360)
    assert sim.actions()[:1] and sim.actions()[0][1:] == ("up", 2), sim.actions()
    assert [a for a in sim.actions() if a[1] == "down"] == [], sim.actions()
    assert sim.actions()[0][0] <= 60 + 30   # the queue signal sees the step
    late = [ttft for a, ttft in sim.ttfts if a >= 150]
    assert percentile(late, 99) * 1000 <= FLEET_CFG.p99_ttft_ms   # and the objective holds after it
    # downscale decisions were considered and refused for capacity, not for lack of evidence
    assert "downscale_would_saturate" in {d.reason for t, d in sim.log if t > 150}


def test_batch1_sim_without_the_capacity_guard_flaps_like_the_gpu_run():
    """What the guard fixes: the P99 model alone scales the fleet down at full load, the lone
    replica's queue grows past the objective, and it scales up again."""
    cfg = FLEET_CFG.model_copy(update={"max_utilization": None})
    sim = Batch1Sim(FLEET_LOAD, cfg, seed=0).run(360)
    dirs = [a[1] for a in sim.actions()]
    assert dirs[:3] == ["up", "down", "up"], sim.actions()


def test_adapter_feeds_the_capacity_guard_from_real_windows():
    """Two real LatencyWindows through Ray's AutoscalingContext: replicas finishing 4 req/s of
    150 ms on the engine (busy 0.6 each, 1.2 together) with a P99 far under the objective hold
    at 2; at 1 req/s each (0.3 together) the same P99s scale down to 1."""
    from autoscale.ray_policy import STATE_KEY, LatencyAutoscalingPolicy

    def ctx(rate):
        clock = FakeClock()
        windows = {}
        for rid in ("a", "b"):
            w = LatencyWindow(window_s=30, clock=clock)
            windows[rid] = w
        clock.t += 30
        n = int(rate * 30)
        for i in range(n):
            for w in windows.values():
                w.record(0.010, 0.160, now=clock.t - 30 + (i + 0.5) * 30 / n, service_s=0.150)
        return _ctx(_raw({rid: w.snapshot() for rid, w in windows.items()}, 1000.0), ["a", "b"],
                    policy_state={STATE_KEY: PolicyState(low_since=0.0).to_dict()})

    pol = LatencyAutoscalingPolicy(p99_ttft_ms=500, min_samples=10, downscale_delay_s=60)
    n, st = pol(ctx(4.0))
    assert n == 2 and st[STATE_KEY]["last_reason"] == "downscale_would_saturate"
    n, st = pol(ctx(1.0))
    assert n == 1 and st[STATE_KEY]["last_reason"] == "p99_well_under_objective"

