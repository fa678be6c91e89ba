"""bench/fleet.py's recovery figure, on series shaped like the 2xH100 run's (which first reported
1.0 s for a P99 that was over the objective until second 50)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("fleet", Path(__file__).resolve().parents[1] / "bench" / "fleet.py")
fleet = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fleet)


def series(p99s, failures=None):
    failures = failures or {}
    return [(float(i + 1), p, 50, failures.get(i + 1, 0)) for i, p in enumerate(p99s)]


def test_recovery_counts_from_the_last_breach_not_the_first_good_stretch():
    # good for 12 s, over the objective from 13 to 50 s, good after: recovered at 51 s
    roll = series([500] * 12 + [800] * 38 + [100] * 40)
    assert fleet.recovery(roll, 710, 10) == (True, 51.0)


def test_never_breached_is_zero_and_still_breached_is_none():
    assert fleet.recovery(series([100] * 30), 710, 10) == (False, 0.0)
    assert fleet.recovery(series([100] * 30 + [900]), 710, 10) == (True, None)
    assert fleet.recovery(series([900] * 25 + [100] * 5), 710, 10) == (True, None)   # good tail < hold


def test_failures_and_empty_windows_count_as_bad():
    assert fleet.recovery(series([100] * 40, failures={20: 1}), 710, 10) == (True, 21.0)
    assert fleet.recovery(series([100] * 15 + [None] + [100] * 20), 710, 10) == (True, 17.0)


def test_hop_breakdown_splits_the_overhead_and_names_the_tail_hop():
    # 20 requests: 19 with a 0.5 ms ASGI-app -> handler hop, one whose 9 ms overhead sits in that hop
    recs = []
    for i in range(20):
        slow = i == 7
        t = 1000.0 + i
        tl = {"client_send": t, "http_in": t + 0.001, "ingress_in": t + (0.0095 if slow else 0.0015),
              "replica_in": t + (0.0096 if slow else 0.0016)}
        tl["replica_first"] = tl["replica_in"] + 0.005
        tl["ingress_first"] = tl["replica_first"] + 0.0001
        tl["sse_first"] = tl["ingress_first"] + 0.0002
        tl["client_first"] = tl["sse_first"] + 0.0004
        ttft = (tl["client_first"] - tl["client_send"]) * 1e3
        recs.append({"ttft_ms": ttft, "engine_ttft_ms": 5.0, "timeline": tl})
    recs.append({"ttft_ms": 9.0, "engine_ttft_ms": 5.0, "timeline": None})    # an old replica: no stamps
    out = fleet.hop_breakdown(recs)
    app = "  ASGI app->handler (parse, validate, tokenize)"
    assert out["hops_ms"][app]["n"] == 20 and abs(out["hops_ms"][app]["p50"] - 0.5) < 1e-6
    tail = out["slowest_tenth"]
    assert tail["requests"] == 2 and tail["overhead_ms_min"] > 2.0
    # the slow request is in the tail, and the tail's mean of that hop shows it: (8.5 + 0.5) / 2
    assert abs(tail["hops_mean_ms"][app] - 4.5) < 1e-6
    assert abs(tail["hops_mean_ms"]["  first SSE chunk->client"] - 0.4) < 1e-6
    assert fleet.hop_breakdown([{"ttft_ms": 9.0, "engine_ttft_ms": 5.0}]) == {}
