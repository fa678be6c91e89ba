"""Load traces: open-loop arrivals (non-homogeneous Poisson) and prompt lengths users see.

``diurnal_step``: steady low load, a 5x step held, then a compressed diurnal swing back down with
bursts. Rates are in units of one replica's capacity so one trace shape serves every fleet size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Phase:
    name: str
    t0: float
    t1: float
    steady: bool          # counts toward "direction changes at steady load"


def diurnal_step_rate(n: int, capacity_rps: float, util: float = 0.6, low_s: float = 300.0,
                      step_s: float = 480.0, diurnal_s: float = 600.0, burst_every_s: float = 150.0,
                      burst_s: float = 20.0, burst_x: float = 1.5):
    """(rate(t) vectorised, duration, phases, step time): peak = ``n`` replicas' worth of load at
    ``util``; low = peak / 5; after the step the load swings down to low and halfway back up
    (a day compressed into ``diurnal_s``) with ``burst_x`` bursts of ``burst_s`` every ``burst_every_s``."""
    hi = n * capacity_rps * util
    lo = hi / 5.0
    t_step = low_s
    t_diur = low_s + step_s
    dur = t_diur + diurnal_s

    def rate(t):
        t = np.asarray(t, dtype=float)
        r = np.where(t < t_step, lo, hi)
        x = (t - t_diur) / diurnal_s
        swing = lo + (hi - lo) * (0.5 + 0.5 * np.cos(2 * math.pi * 0.75 * np.clip(x, 0, 1)))
        r = np.where(t >= t_diur, swing, r)
        burst = (t >= t_diur) & (((t - t_diur) % burst_every_s) < burst_s)
        return np.where(burst, r * burst_x, r)

    phases = [Phase("low", 0.0, t_step, True), Phase("step", t_step, t_diur, False),
              Phase("step_steady", t_step + 120.0, t_diur, True), Phase("diurnal", t_diur, dur, False)]
    return rate, dur, phases, t_step


def arrivals(rate, duration: float, rate_max: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times of a Poisson process of intensity rate(t) on [0, duration), by thinning."""
    n = rng.poisson(rate_max * duration)
    t = np.sort(rng.uniform(0.0, duration, n))
    keep = rng.uniform(0.0, rate_max, n) < rate(t)
    return t[keep]


def lengths_uniform(n: int, rng: np.random.Generator, lo: int = 10, hi: int = 500) -> np.ndarray:
    return rng.integers(lo, hi + 1, n)


def lengths_long_tail(n: int, rng: np.random.Generator, median: float = 150.0, sigma: float = 1.0,
                      lo: int = 10, hi: int = 2000) -> np.ndarray:
    """Log-normal prompt lengths (median 150 tokens; ~11% over 512, ~2% over 1024), clipped to [lo, hi]."""
    return np.clip(np.round(rng.lognormal(math.log(median), sigma, n)), lo, hi).astype(int)


def oracle_replicas(rate_t: np.ndarray, mean_service_s: float, util: float, lo: int = 1) -> np.ndarray:
    """Replicas an oracle that knows the load runs: the load in replicas' worth of work at ``util``."""
    return np.maximum(lo, np.ceil(rate_t * mean_service_s / util))
