"""The warm-bucket routing policy as a pure function (no Ray)."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from deployments.router import ReplicaView, WarmBucketPolicy, bucket_of, choose_replicas
from engine.errors import PromptTooLongError
from engine.request import Request, bucket_for
from engine.api import SamplingParams

BUCKETS = [16, 32, 64, 128, 256]


def ids(order):
    return [r.id for r in order]


def test_bucket_for_matches_smallest_fitting_bucket():
    assert bucket_for(1, BUCKETS) == 16
    assert bucket_for(16, BUCKETS) == 16
    assert bucket_for(17, BUCKETS) == 32
    assert bucket_for(256, BUCKETS) == 256
    with pytest.raises(PromptTooLongError, match="largest bucket 256"):   # the one bucket function raises
        bucket_for(9999, BUCKETS)


def test_warm_replica_preferred_over_less_loaded_cold_one():
    reps = [ReplicaView("cold", load=0), ReplicaView("warm", load=1, warm=frozenset({32}))]
    for seed in range(20):
        assert ids(choose_replicas(32, reps, random.Random(seed)))[0] == "warm"


def test_other_buckets_do_not_count_as_warm():
    reps = [ReplicaView("a", load=1, warm=frozenset({16})), ReplicaView("b", load=0)]
    assert ids(choose_replicas(32, reps, random.Random(0)))[0] == "b"  # none warm -> least loaded


def test_power_of_two_choices_among_warm_replicas():
    # 3 warm replicas; the most loaded one can only win if it is not sampled with a lighter one,
    # which never happens with 2 of 3 sampled: the heaviest is never first.
    reps = [ReplicaView("w0", load=0, warm=frozenset({64})),
            ReplicaView("w1", load=1, warm=frozenset({64})),
            ReplicaView("w2", load=2, warm=frozenset({64})),
            ReplicaView("c", load=0)]
    firsts = Counter(ids(choose_replicas(64, reps, random.Random(s)))[0] for s in range(300))
    assert firsts["w2"] == 0 and firsts["c"] == 0
    # p2c: w0 wins whenever sampled (2/3), w1 when paired with w2 (1/3)
    assert 150 < firsts["w0"] < 250 and 50 < firsts["w1"] < 150
    order = ids(choose_replicas(64, reps, random.Random(1)))
    assert sorted(order) == ["c", "w0", "w1", "w2"] and order[-1] == "c"  # all listed, cold last


def test_warm_ties_are_broken_randomly():
    reps = [ReplicaView("a", load=0, warm=frozenset({16})), ReplicaView("b", load=0, warm=frozenset({16}))]
    firsts = Counter(ids(choose_replicas(16, reps, random.Random(s)))[0] for s in range(200))
    assert firsts["a"] > 50 and firsts["b"] > 50


def test_no_warm_replica_picks_least_loaded():
    reps = [ReplicaView("a", load=3), ReplicaView("b", load=1), ReplicaView("c", load=2)]
    assert ids(choose_replicas(128, reps, random.Random(0))) == ["b", "c", "a"]


def test_no_warm_ties_prefer_capturing_then_fewer_warm_buckets():
    reps = [ReplicaView("many", load=0, warm=frozenset({16, 32, 64})),
            ReplicaView("few", load=0, warm=frozenset({16})),
            ReplicaView("capt", load=0, warm=frozenset({16, 32, 64, 256}), capturing=frozenset({128}))]
    for seed in range(10):
        assert ids(choose_replicas(128, reps, random.Random(seed))) == ["capt", "few", "many"]
    # capturing never beats a lower load
    reps2 = [ReplicaView("capt", load=2, capturing=frozenset({128})), ReplicaView("idle", load=0)]
    assert ids(choose_replicas(128, reps2, random.Random(0)))[0] == "idle"


def test_spill_to_cold_replica_when_warm_one_is_overloaded():
    warm = ReplicaView("warm", load=5, warm=frozenset({32}))
    cold = ReplicaView("cold", load=0)
    assert ids(choose_replicas(32, [warm, cold], random.Random(0), imbalance_threshold=2)) == ["cold", "warm"]
    # within the threshold the warm replica keeps the request
    warm2 = ReplicaView("warm", load=2, warm=frozenset({32}))
    assert ids(choose_replicas(32, [warm2, cold], random.Random(0), imbalance_threshold=2)) == ["warm", "cold"]


def test_full_replicas_go_last():
    reps = [ReplicaView("warm_full", load=8, max_load=8, warm=frozenset({16})),
            ReplicaView("cold", load=3, max_load=8)]
    assert ids(choose_replicas(16, reps, random.Random(0))) == ["cold", "warm_full"]


def test_deterministic_for_same_rng_state_and_empty_input():
    reps = [ReplicaView(f"r{i}", load=i % 2, warm=frozenset({16} if i % 3 else {})) for i in range(6)]
    assert ids(choose_replicas(16, reps, random.Random(7))) == ids(choose_replicas(16, reps, random.Random(7)))
    assert choose_replicas(16, [], random.Random(0)) == []


def test_simulated_fleet_keeps_buckets_on_their_warm_replica():
    """A toy loop: replicas warm a bucket when they serve it; after warm-up nearly every prompt
    lands on a warm replica, and each bucket stays on few replicas."""
    rng = random.Random(3)
    warm = {f"r{i}": set() for i in range(3)}
    hits = total = 0
    placed: dict[int, set[str]] = {}
    for step in range(600):
        n = rng.randint(1, 256)
        b = bucket_for(n, BUCKETS)
        views = [ReplicaView(rid, load=0, warm=frozenset(w)) for rid, w in warm.items()]
        first = choose_replicas(b, views, rng)[0]
        if step >= 100:
            total += 1
            hits += b in warm[first.id]
            placed.setdefault(b, set()).add(first.id)
        warm[first.id].add(b)
    assert hits / total >= 0.99
    assert all(len(v) <= 2 for v in placed.values())


class _PR:
    def __init__(self, args):
        self.args = args


@pytest.mark.parametrize("args,expected", [
    ((Request(ids=(1, 2), params=SamplingParams(), bucket=16),), 16), ((), None), (("text",), None)])
def test_bucket_of_reads_the_request_the_call_carries(args, expected):
    assert bucket_of(_PR(args)) == expected
    assert bucket_of(None) is None


def test_pending_bucket_map_is_bounded_and_drops_the_oldest():
    # Requests whose on_request_routed never fires must not grow the map without bound, and a burst
    # of them must not drop the newest ones (the requests whose hook is about to fire).
    from deployments.router import MAX_PENDING_BUCKETS, WarmBucketRouter

    r = object.__new__(WarmBucketRouter)      # the bookkeeping needs no Ray router state
    r.initialize_state()
    n = MAX_PENDING_BUCKETS + 1000
    for i in range(n):
        r._remember_bucket(f"req-{i}", BUCKETS[i % len(BUCKETS)])
    assert len(r._bucket_of_request) == MAX_PENDING_BUCKETS
    assert "req-0" not in r._bucket_of_request and f"req-{n - MAX_PENDING_BUCKETS - 1}" not in r._bucket_of_request
    assert r._bucket_of_request[f"req-{n - MAX_PENDING_BUCKETS}"] == BUCKETS[(n - MAX_PENDING_BUCKETS) % len(BUCKETS)]
    assert r._bucket_of_request[f"req-{n - 1}"] == BUCKETS[(n - 1) % len(BUCKETS)]


def test_policy_hint_makes_the_next_miss_follow_a_cold_placement_until_it_expires():
    """The one policy object (Ray router and local-first replicas): after a cold placement on r1 the
    next prompt of that bucket goes to r1 too (the hint counts as capturing), not to the equally idle
    r0; once the hint is older than hint_ttl_s, or r1 is gone, it no longer counts."""
    pol = WarmBucketPolicy(hint_ttl_s=10.0, seed=0)
    stats = {"warm_buckets": [], "capturing_buckets": [], "queue_depth": 0}
    pol.placed("r1", 64, warm=False)
    for _ in range(10):
        views = [pol.view("r0", stats, 8), pol.view("r1", stats, 8)]
        assert pol.rank(64, views)[0].id == "r1"
    assert pol.view("r1", stats, 8, now=1e12).capturing == frozenset()   # expired
    pol.keep({"r0"})
    assert "r1" not in pol.hints
    full = [pol.view("r0", {**stats, "queue_depth": 8}, 8), pol.view("r1", {**stats, "queue_depth": 3}, 8)]
    assert pol.first_with_room(pol.rank(64, full)).id == "r1"
