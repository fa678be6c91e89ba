"""The latency policy's at-scale behaviour (docs/simulation.md, 2026-12-02): the capacity guard's limit
growing with the fleet, repeated scale-downs within one low period, the guard reading the recent
completion rate, demand sizing through a draining backlog, and batched replicas (busy time and the
queue signal per request at full batch, else per KV slot). Each is inert on the 2-GPU fleet (tests/test_autoscale_policy.py)."""
from __future__ import annotations

import pytest

from autoscale.policy import (FleetSnapshot, LatencyPolicyConfig, PolicyState, ReplicaStats, decide,
                              demand_replicas, fleet_stats, mixture_p99, queue_ratio, utilization_cap)

CFG = LatencyPolicyConfig(p99_ttft_ms=500.0, upscale_delay_s=5.0, downscale_delay_s=60.0, min_samples=10,
                          queue_signal=True, max_replicas=200)


def fleet(n, rate, service_ms, p99=100.0, recent_samples=None, max_batch=None, in_flight=1.0, full_ms=None):
    reps = tuple(ReplicaStats(f"r{i}", p99, p99 * 2, rate, in_flight, 200.0, p99_ttft_recent_ms=p99,
                              p99_e2e_recent_ms=p99 * 2, recent_samples=recent_samples,
                              mean_service_ms=service_ms, max_batch=max_batch, mean_full_batch_ms=full_ms)
                 for i in range(n))
    return FleetSnapshot(reps, n, n)


def test_guard_limit_grows_with_the_fleet_from_max_utilization():
    # up to 2 replicas: max_utilization (0.6), as measured on the 2-GPU fleet
    assert utilization_cap(1, CFG) == utilization_cap(2, CFG) == 0.6
    # beyond: 1 - 0.4 x sqrt(2 / n), at most max_utilization_pooled (default 0.65)
    assert utilization_cap(3, CFG) == 0.65
    wide = CFG.model_copy(update={"max_utilization_pooled": 0.85})
    assert utilization_cap(8, wide) == pytest.approx(0.8)
    assert utilization_cap(50, wide) == 0.85
    assert utilization_cap(50, CFG.model_copy(update={"max_utilization_pooled": None})) == 0.6


def test_twenty_replicas_at_0_58_busy_scale_down_to_the_pooled_limit():
    # 20 replicas each finishing 5.8 req/s of 100 ms: 11.6 replicas busy. At 0.6 the guard needs 20
    # (11.6 / 19 = 0.61); at 0.65, 18 carry it (0.644), the most one step (10%: 2) removes.
    snap = fleet(20, 5.8, 100.0)
    calm = PolicyState(low_since=0.0)
    d, _ = decide(snap, calm, CFG.model_copy(update={"max_utilization_pooled": None}), 1000.0)
    assert (d.direction, d.reason) == ("hold", "downscale_would_saturate")
    d, _ = decide(snap, calm, CFG, 1000.0)
    assert (d.direction, d.target_replicas) == ("down", 18)
    assert d.inputs["utilization_after"] == pytest.approx(11.6 / 18, abs=1e-4)


def test_scale_downs_repeat_within_one_low_period():
    cfg = CFG.model_copy(update={"downscale_repeat_s": 15.0})
    snap = lambda n: fleet(n, 1.0, 117.0)   # noqa: E731  (0.117 busy each: far under the guard)
    st = PolicyState(low_since=0.0)
    d, st = decide(snap(40), st, cfg, 100.0)
    assert (d.direction, d.target_replicas) == ("down", 36) and st.low_since == 0.0
    d, st = decide(snap(36), st, cfg, 114.0)
    assert (d.direction, d.reason) == ("hold", "downscale_cooldown")
    d, st = decide(snap(36), st, cfg, 115.0)
    assert (d.direction, d.target_replicas) == ("down", 33)
    # without it: a fresh downscale_delay_s of low P99 after each scale-down
    d, st2 = decide(snap(40), PolicyState(low_since=0.0), CFG, 100.0)
    assert d.direction == "down" and st2.low_since is None
    d, _ = decide(snap(36), st2, CFG, 115.0)
    assert (d.direction, d.reason) == ("hold", "low_waiting_delay")
    # a P99 out of the low band after the scale-down restarts the delay
    d, st = decide(fleet(33, 1.0, 117.0, p99=400.0), st, cfg, 120.0)
    assert d.reason == "within_band" and st.low_since is None
    d, st = decide(snap(33), st, cfg, 140.0)
    assert d.reason == "low_waiting_delay"


def test_guard_reads_the_recent_completion_rate():
    # The windows still average 1 req/s each (the removed replicas' share is gone from the sum),
    # but the last 5 s finished 6 req/s each: 0.702 busy per replica, no room to scale down.
    quiet = fleet(10, 1.0, 117.0)
    busy_now = fleet(10, 1.0, 117.0, recent_samples=30.0)
    calm = PolicyState(low_since=0.0)
    assert decide(quiet, calm, CFG, 1000.0)[0].direction == "down"
    d, _ = decide(busy_now, calm, CFG, 1000.0)
    assert (d.direction, d.reason) == ("hold", "downscale_would_saturate")


def test_demand_counts_the_backlog_draining():
    # 10 saturated replicas (8.5 req/s of 117 ms each, 85 completions/s) with their ongoing requests
    # falling by 20/s: arrivals are 65/s -> 65 x 0.117 / 0.65 = 11.7 -> 12 replicas, not 16.
    snap = fleet(10, 8.5, 117.0, recent_samples=42.5)
    fs = fleet_stats(snap, CFG)
    assert demand_replicas(fs, PolicyState(ongoing_growth=-20.0), CFG) == 12
    assert demand_replicas(fs, PolicyState(ongoing_growth=0.0), CFG) == 16


def test_batched_replicas_count_busy_time_and_queue_per_kv_slot():
    # 32 slots, 20 streams in flight at 300 ms each, 40 req/s: 12 of 32 slots busy on average, no
    # queue for a slot. Read as batch 1 it would be 12 replicas' worth of work and a 5.7 s queue.
    slot = CFG.model_copy(update={"busy_per_slot": True})
    snap = fleet(1, 40.0, 300.0, max_batch=32.0, in_flight=20.0)
    fs = fleet_stats(snap, slot)
    assert fs.busy == pytest.approx(12.0 / 32)
    assert queue_ratio(snap, snap.replicas, slot) == 0.0
    # 40 in flight: 8 wait for a slot, one freeing every 300 / 32 ms -> the newest waits 75 ms
    full = fleet(1, 40.0, 300.0, max_batch=32.0, in_flight=40.0)
    assert queue_ratio(full, full.replicas, slot) == pytest.approx(75.0 / 500.0)
    # off (the default: max_ongoing_requests may be below the slots), or max_batch 1: batch 1
    assert fleet_stats(snap, CFG).busy == pytest.approx(12.0)
    one = fleet(1, 4.0, 117.0, max_batch=1.0, in_flight=3.0)
    assert fleet_stats(one, slot).busy == pytest.approx(0.468)
    assert queue_ratio(one, one.replicas, slot) == pytest.approx(2 * 117.0 / 500.0)
    assert ReplicaStats.from_snapshot("a", {"samples": 1.0, "max_batch": 32.0}).max_batch == 32.0


def test_batched_replicas_count_busy_time_at_full_batch():
    # A 32-slot replica costing 20 ms a request at full batch carries 50 req/s at most: at 50 req/s it
    # reads 1.0 busy, whether its window saw it run full (640 ms a request) or at a few rows (160 ms).
    slot = CFG.model_copy(update={"busy_per_slot": True})
    for service_ms in (640.0, 160.0):
        assert fleet_stats(fleet(1, 50.0, service_ms, max_batch=32.0, full_ms=20.0), slot).busy == pytest.approx(1.0)
    # The 10-replica simulation's low load: 2 replicas at 0.6 of that each, their requests 160 ms at a few
    # rows. Per slot 2 x 30 x 160 / 32 = 0.3 replicas busy: one replica passes the guard and then breaches.
    # At full batch 1.2: the two stay.
    calm = PolicyState(low_since=0.0)
    d, _ = decide(fleet(2, 30.0, 160.0, max_batch=32.0), calm, slot, 1000.0)
    assert (d.direction, d.target_replicas, d.inputs["busy_replicas"]) == ("down", 1, pytest.approx(0.3))
    d, _ = decide(fleet(2, 30.0, 160.0, max_batch=32.0, full_ms=20.0), calm, slot, 1000.0)
    assert (d.direction, d.reason, d.inputs["busy_replicas"]) == ("hold", "downscale_would_saturate",
                                                                   pytest.approx(1.2))
    # demand sizing and the queue signal at the same cost: 40 in flight, 8 wait, a slot frees every 20 ms
    full = fleet(1, 50.0, 160.0, max_batch=32.0, in_flight=40.0, full_ms=20.0)
    assert demand_replicas(fleet_stats(full, slot), PolicyState(ongoing_growth=0.0), slot) == 2   # 1.0 / 0.65
    assert queue_ratio(full, full.replicas, slot) == pytest.approx(8 * 20.0 / 500.0)
    # off, or batch 1: the cost at full batch is not read
    assert fleet_stats(fleet(1, 50.0, 160.0, max_batch=32.0, full_ms=20.0), CFG).busy == pytest.approx(8.0)
    assert fleet_stats(fleet(1, 4.0, 117.0, max_batch=1.0, full_ms=20.0), slot).busy == pytest.approx(0.468)
    # the window's 0.0 (no request with a cost) reads as not reported
    assert ReplicaStats.from_snapshot("a", {"samples": 1.0, "mean_full_batch_ms": 0.0}).mean_full_batch_ms is None
    assert ReplicaStats.from_snapshot("a", {"samples": 1.0, "mean_full_batch_ms": 20.0}).mean_full_batch_ms == 20.0


def test_the_ray_adapter_reads_the_engines_max_batch():
    from ray.serve._private.common import TimeStampedValue
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    from autoscale.ray_policy import snapshot_from_context

    stats = {"p99_ttft_ms": 20.0, "samples": 40.0, "mean_service_ms": 300.0, "max_batch": 32.0,
             "mean_full_batch_ms": 17.5}
    raw = {k: {"a": [TimeStampedValue(1000.0, v)]} for k, v in stats.items()}
    ctx = AutoscalingContext(
        deployment_id=None, deployment_name="Model", app_name="app", current_num_replicas=1,
        target_num_replicas=1, running_replicas=["a"], total_num_requests=0.0, total_queued_requests=0.0,
        aggregated_metrics=lambda: {}, raw_metrics=lambda: raw, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=4, policy_state={}, last_scale_up_time=None,
        last_scale_down_time=None, current_time=1000.0,
        config=AutoscalingConfig(min_replicas=1, max_replicas=4, upscale_delay_s=0, downscale_delay_s=0))
    rep = snapshot_from_context(ctx).replicas[0]
    assert rep.max_batch == 32.0 and rep.mean_full_batch_ms == 17.5


def test_mixture_fleet_p99_is_not_the_max_of_many_replica_p99s():
    # equal replicas: their P99
    assert mixture_p99([(200.0, 300.0)] * 50) == 300.0
    # one replica of 1,000 at twice the others' P99 barely moves the fleet's
    assert mixture_p99([(200.0, 300.0)] * 999 + [(200.0, 600.0)]) == pytest.approx(300.0, rel=0.01)
    # one of 10 at 4x (a tenth of the samples): the merged P99 sits between them, under the max
    assert 550.0 < mixture_p99([(180.0, 300.0)] * 9 + [(200.0, 1200.0)]) < 650.0
    # 1,000 replicas at 450 ms and 20 of them at 520: no breach of 500 ms; "max" breaches
    reps = tuple(ReplicaStats(f"r{i}", 520.0 if i < 20 else 450.0, 900.0, 8.0, 1.0, 240.0)
                 for i in range(1000))
    snap = FleetSnapshot(reps, 1000, 1000)
    assert fleet_stats(snap, CFG).ratio == pytest.approx(1.04)
    mix = CFG.model_copy(update={"fleet_p99": "mixture"})
    assert fleet_stats(snap, mix).ratio < 1.0


def test_mixture_queue_signal_is_the_p99_of_the_queued_requests():
    # n replicas with one request in flight, one with 8 (7 queued behind it at 117 ms each)
    def snap(n):
        reps = tuple(ReplicaStats(f"r{i}", 100.0, 200.0, 5.0, 8.0 if i == 0 else 1.0, 100.0,
                                  mean_service_ms=117.0) for i in range(n))
        return FleetSnapshot(reps, n, n)
    mix = CFG.model_copy(update={"fleet_p99": "mixture"})
    big, small = snap(1000), snap(20)
    assert queue_ratio(big, big.replicas, CFG) == pytest.approx(7 * 117.0 / 500.0)   # max: the newest's wait
    # 1,007 requests in flight, 7 waiting (0.7%): the 99th percentile one does not wait
    assert queue_ratio(big, big.replicas, mix) == 0.0
    # 27 in flight, 7 waiting: nearest rank 27 of 27, the newest
    assert queue_ratio(small, small.replicas, mix) == pytest.approx(7 * 117.0 / 500.0)


def test_scale_up_on_utilization_before_the_p99_shows_it():
    # 10 replicas at 0.9 busy in the window and the recent sub-window, P99 far under the objective
    cfg = CFG.model_copy(update={"scale_up_utilization": 0.85})
    hot = fleet(10, 9.0, 100.0, recent_samples=45.0)
    d, st = decide(hot, PolicyState(), cfg, 100.0)
    assert (d.direction, d.reason) == ("hold", "breach_waiting_delay")
    d, st = decide(hot, st, cfg, 105.0)
    assert (d.direction, d.reason, d.target_replicas) == ("up", "utilization_above_limit", 14)  # 9 / 0.65
    # a burst that has left the recent sub-window (its window still high) does not trigger it
    calm = fleet(10, 9.0, 100.0, recent_samples=25.0)
    assert decide(calm, PolicyState(breach_since=0.0), cfg, 105.0)[0].direction != "up"
    assert decide(hot, PolicyState(breach_since=0.0), CFG, 105.0)[0].direction != "up"   # off by default
