"""engine.buckets: bucket edges from measured cost. The DP's answer is checked against brute force over
every admissible set of edges, on random costs (monotone or not) and random length mixes."""
from __future__ import annotations

import itertools
import random

import pytest

from engine.buckets import choose_buckets, expected_cost


def _brute(costs, lengths, k):
    cand = sorted(costs)
    top = next(c for c in cand if c >= max(lengths))
    below = [c for c in cand if c < top]
    best = None
    for r in range(0, k):
        for combo in itertools.combinations(below, r):
            edges = [*combo, top]
            v = expected_cost(edges, costs, lengths)
            if best is None or v < best[0] - 1e-12 or (abs(v - best[0]) <= 1e-12 and len(edges) < len(best[1])):
                best = (v, edges)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_choice_is_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    cand = sorted(rng.sample(range(8, 400, 8), 9))
    base = rng.uniform(3, 6)
    monotone = seed % 2 == 0
    costs = {c: base + c * rng.uniform(0.002, 0.02) + (0 if monotone else rng.uniform(-0.3, 0.3)) for c in cand}
    lengths = [rng.randint(1, cand[-1]) for _ in range(rng.randint(1, 60))]
    k = rng.randint(1, 5)
    got = choose_buckets(costs, lengths, k)
    v, edges = _brute(costs, lengths, k)
    assert len(got) <= k and got == sorted(got) and got[-1] >= max(lengths)
    assert expected_cost(got, costs, lengths) == pytest.approx(v, abs=1e-9), (got, edges)
    assert len(got) == len(edges)          # no bucket that holds nothing


def test_finer_edges_where_the_lengths_are():
    # cost grows with the rows; every prompt is 200 tokens: one bucket, exactly the smallest that holds 200
    costs = {b: 5.0 + 0.01 * b for b in range(16, 513, 16)}
    assert choose_buckets(costs, [200] * 30, 8) == [208]
    # the uniform 10-500 mix with 10 buckets beats powers of two on the same measured costs
    lengths = list(range(10, 501))
    ten = choose_buckets(costs, lengths, 10)
    assert len(ten) == 10 and ten[-1] == 512
    assert expected_cost(ten, costs, lengths) < expected_cost([16, 32, 64, 128, 256, 384, 512], costs, lengths)


def test_bad_inputs_name_the_problem():
    costs = {16: 1.0, 32: 2.0}
    with pytest.raises(ValueError, match="holds 40"):
        choose_buckets(costs, [40], 2)
    with pytest.raises(ValueError, match="k must be"):
        choose_buckets(costs, [10], 0)
    with pytest.raises(ValueError, match="no prompt lengths"):
        choose_buckets(costs, [], 2)
