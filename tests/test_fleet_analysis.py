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
