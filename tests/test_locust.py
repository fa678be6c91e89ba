"""A short headless Locust run (locustfiles/short_prompts.py, ~20 s) against the CPU app:
zero failures, and the stats CSV holds TTFT and end-to-end rows with percentiles."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hs_serve import serve_app

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
HTTP_PORT = 38000


def _locust_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("locust")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "locust"]


def test_headless_short_prompts(tmp_path: Path):
    prefix = tmp_path / "short"
    with serve_app(HTTP_PORT) as base:
        env = {**os.environ, "HS_MAX_TOKENS": "16", "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)   # locustfiles import nothing of the project
        proc = subprocess.run(
            [*_locust_cmd(), "-f", str(ROOT / "locustfiles" / "short_prompts.py"), "--headless",
             "-u", "4", "-r", "2", "-t", "20s", "--csv", str(prefix), "--host", base,
             "--only-summary", "--stop-timeout", "10", "--exit-code-on-error", "1"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
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
