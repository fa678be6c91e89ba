"""The fleet benchmark's whole pipeline on CPU: seed the store, start the real app on a local Ray Serve,
drive it with Locust (steady, then a 5x step) and analyse the run, with the latency policy's queue
signal on. The figures mean nothing on 2 cores; what is tested is that bench/fleet.py runs to the end
and writes a complete result (a GPU lease must not be spent finding a crash in the analysis)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
if importlib.util.find_spec("locust") is None:   # not imported here: gevent patches the process
    pytest.skip("locust is not installed", allow_module_level=True)

from hs_serve import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


@pytest.mark.timeout(420)
def test_fleet_benchmark_runs_end_to_end_on_cpu(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "fleet.py"), "--device", "cpu", "--preset", "tiny",
           "--warmup-s", "4", "--steady-s", "8", "--steady-after-s", "12", "--seed-requests", "6",
           "--configs", "hybrid", "--queue-signal", "--out", str(tmp_path), "--port", str(free_port()),
           "--rps", "2"]   # a fixed rate: --util scales by the seed's service time, which a busy 2-core host can
                           # stretch 50x, leaving the 8 s steady window without a request
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    log = run.stdout[-3000:] + run.stderr[-3000:]
    assert run.returncode == 0, log
    [result] = tmp_path.glob("fleet-*.json")
    d = json.loads(result.read_text())
    assert not d["errors"], d["errors"]
    h = d["hybrid"]
    assert "error" not in h, h.get("error")
    assert h["app_args"]["autoscaling"]["policy"]["policy_kwargs"]["queue_signal"] is True
    assert h["requests_total"] > 0 and h["errors_total"] == 0
    assert 0.0 <= h["steady"]["warm_hit_rate"] <= 1.0
    assert h["steady"]["client_ttft_ms"]["p50"] > 0
    # every steady request's way, hop by hop, from its stamps (the client's and the app's)
    hops = h["steady"]["hops_ms"]
    n = h["steady"]["client_ttft_ms"]["n"]
    for hop in ("  client->ASGI app", "  ASGI app->handler (parse, validate, tokenize)", "  first SSE chunk->client"):
        assert hops[hop]["n"] == n and hops[hop]["p50"] >= 0, (hop, hops[hop])
    assert h["steady"]["slowest_tenth"]["requests"] >= 1
    step = h["step"]
    for key in ("recovery_s", "breached", "direction_changes", "seconds_at_step_load"):
        assert key in step, key
    assert step["seconds_at_step_load"] > 5
    assert (tmp_path / result.name.replace(".json", ".md")).exists()
    assert len(list(tmp_path.glob("*_stats.csv"))) == 1
