"""A short headless Locust run (locustfiles/short_prompts.py, ~20 s) against the CPU app:
zero failures, and the stats CSV holds TTFT and end-to-end rows with percentiles."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hs_serve import free_port, serve_app

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]

def _locust_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("locust")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "locust"]


def _env() -> dict:
    env = {**os.environ, "HS_MAX_TOKENS": "16", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)   # locustfiles import nothing of the project
    return env


@pytest.fixture(scope="module")
def app_url():
    with serve_app(free_port()) as base:
        yield base


def test_headless_short_prompts(app_url: str, tmp_path: Path):
    prefix = tmp_path / "short"
    proc = subprocess.run(
        [*_locust_cmd(), "-f", str(ROOT / "locustfiles" / "short_prompts.py"), "--headless",
         "-u", "4", "-r", "2", "-t", "20s", "--csv", str(prefix), "--host", app_url,
         "--only-summary", "--stop-timeout", "10", "--exit-code-on-error", "1"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]

    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    with open(f"{prefix}_failures.csv", newline="") as f:
        failures = list(csv.DictReader(f))
    assert failures == [], failures

    post = rows[("POST", "/v1/completions")]
    total = rows[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0, out[-4000:]
    assert int(post["Request Count"]) >= 10, post
    for name in ("ttft", "e2e", "tpot"):
        r = rows[("SSE", name)]
        assert int(r["Failure Count"]) == 0
        assert int(r["Request Count"]) >= 10, r
        for col in ("50%", "99%"):
            assert col in r and r[col] not in ("", "N/A"), (name, col, r)
            assert float(r[col]) > 0, (name, col, r)
    ttft, e2e = rows[("SSE", "ttft")], rows[("SSE", "e2e")]
    # every finished request has one e2e entry; a request cut by the end of the run may have
    # recorded its TTFT only (at most one per user)
    assert int(e2e["Request Count"]) == int(post["Request Count"])
    assert 0 <= int(ttft["Request Count"]) - int(e2e["Request Count"]) <= 4
    assert float(ttft["50%"]) <= float(e2e["50%"])


def test_shape_runs_steady_step_spike_phases(app_url: str, tmp_path: Path):
    """The LoadTestShape drives the user count through its phases, then stops the run."""
    prefix = tmp_path / "shape"
    shape = "steady:4:1,step:6:1-3:3,spike:4:5,steady:4:1"
    proc = subprocess.run(
        [*_locust_cmd(), "-f", str(ROOT / "locustfiles" / "shapes.py"), "--headless",
         "--shape", shape, "--csv", str(prefix), "--csv-full-history", "--host", app_url,
         "--only-summary", "--stop-timeout", "10", "--exit-code-on-error", "1"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    with open(f"{prefix}_stats_history.csv", newline="") as f:
        users = [int(r["User Count"]) for r in csv.DictReader(f) if r["Name"] == "Aggregated"]
    # 1 user, then 1 -> 2 -> 3, a spike to 5, back to 1
    assert users and max(users) == 5, users
    seen = [u for i, u in enumerate(users) if i == 0 or u != users[i - 1]]
    for level in (1, 2, 3, 5):
        assert level in seen, seen
    assert seen.index(3) < seen.index(5) < len(seen) - 1 and seen[-1] == 1, seen
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0, out[-4000:]
    assert int(rows[("SSE", "ttft")]["Request Count"]) > 0
