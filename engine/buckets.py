"""Prefill bucket edges chosen from measured cost, not powers of two.

A prompt of n tokens runs the graph of the smallest bucket >= n, so it pays that bucket's prefill time.
Given each candidate bucket's measured time (``bench/bucket_edges.py`` replays a graph per candidate on
the GPU) and the prompt lengths to expect (a sample of traffic, or the benchmark's mix), pick at most k
edges that minimise the mean prefill time over those lengths: dynamic programming over the sorted
candidates, exact, O(k * m^2) for m candidates. The result goes into ``engine.buckets``.
"""
from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence


def expected_cost(buckets: Sequence[int], costs: Mapping[int, float], lengths: Sequence[int]) -> float:
    """Mean cost over ``lengths`` when each runs at the smallest of ``buckets`` that holds it."""
    edges = sorted(buckets)
    if not lengths:
        raise ValueError("no prompt lengths given")
    total = 0.0
    for n in lengths:
        i = bisect.bisect_left(edges, n)
        if i == len(edges):
            raise ValueError(f"a prompt of {n} tokens fits no bucket (largest {edges[-1]})")
        total += costs[edges[i]]
    return total / len(lengths)


def choose_buckets(costs: Mapping[int, float], lengths: Sequence[int], k: int) -> list[int]:
    """At most ``k`` buckets from the candidates ``costs`` (bucket size -> measured prefill time) that
    minimise ``expected_cost`` over ``lengths``. The largest chosen bucket is the smallest candidate that
    holds the longest length. Costs need not be monotone (a measured larger bucket can be faster)."""
    if k < 1:
        raise ValueError("k must be >= 1")
    if not lengths:
        raise ValueError("no prompt lengths given")
    cand = sorted(costs)
    top = bisect.bisect_left(cand, max(lengths))
    if top == len(cand):
        raise ValueError(f"no candidate bucket holds {max(lengths)} tokens (largest {cand[-1]})")
    cand = cand[:top + 1]
    m = len(cand)
    # count[j]: lengths that land in (cand[j-1], cand[j]] (cand[-1] := 0)
    count = [0] * m
    for n in lengths:
        count[bisect.bisect_left(cand, n)] += 1
    prefix = [0]
    for c in count:
        prefix.append(prefix[-1] + c)

    def held(lo: int, hi: int) -> int:     # lengths in (cand[lo], cand[hi]]; lo = -1: from 0
        return prefix[hi + 1] - prefix[lo + 1]

    inf = float("inf")
    # best[i][j]: least total cost of the lengths <= cand[j] with i edges, the last one cand[j]
    best = [[inf] * m for _ in range(k + 1)]
    back = [[-1] * m for _ in range(k + 1)]
    for j in range(m):
        best[1][j] = costs[cand[j]] * held(-1, j)
    for i in range(2, k + 1):
        for j in range(m):
            for lo in range(j):
                if best[i - 1][lo] == inf:
                    continue
                v = best[i - 1][lo] + costs[cand[j]] * held(lo, j)
                if v < best[i][j]:
                    best[i][j], back[i][j] = v, lo
    last = m - 1
    i = min(range(1, k + 1), key=lambda i: (best[i][last], i))    # fewest edges among the cheapest
    out, j = [], last
    while i >= 1 and j >= 0:
        out.append(cand[j])
        j = back[i][j]
        i -= 1
    # the fewest edges among the cheapest sets has no empty bucket (dropping one costs nothing)
    return sorted(out)
