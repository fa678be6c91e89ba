"""Every panel of the committed Grafana dashboard has data in a real Prometheus that scraped the
running app (real Ray metrics export, real Serve HTTP traffic, real `prometheus` binary).

Needs the `prometheus` binary on PATH (Debian/Ubuntu: `apt-get install -y prometheus`); the
test installs nothing and fails with that hint when it is missing.

Two event kinds cannot happen on the CPU engine: background CUDA-graph captures (no graphs on
CPU) and, unless the engine has an artifact store, store loads/publishes/rejections. So that
their panels are checked end to end too, a Ray actor in the same cluster feeds contract-shaped
``capture`` / ``store`` events through the same public entry point the replica uses
(deployments.metrics.observe_event); everything else comes from the app's own traffic.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from deployments import dashboards

from hs_serve import free_port, serve_app, wait_http

pytestmark = [
    pytest.mark.ray,
    pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning"),
]

PROM_PORT = 0      # picked by the test from a free port (hs_serve.free_port), like every port here
DEADLINE_S = 150

# The autoscaling panels need the latency policy running on the model deployment.
APP_ARGS = {
    "autoscaling": {
        "min_replicas": 1, "max_replicas": 2, "initial_replicas": 1,
        "metrics_interval_s": 1.0, "look_back_period_s": 5.0,
        "upscale_delay_s": 0, "downscale_delay_s": 0,
        "policy": {"policy_function": "autoscale.ray_policy:LatencyAutoscalingPolicy",
                   # a loose objective: the policy runs and exports its metrics, but holds at 1
                   "policy_kwargs": {"p99_ttft_ms": 5000.0, "max_replicas": 1}},
    },
}


def _prometheus_bin() -> str:
    path = shutil.which("prometheus")
    if not path:
        pytest.fail("the `prometheus` binary is not on PATH: apt-get install -y prometheus")
    return path


def _traffic(base: str, stop: threading.Event, errors: list) -> None:
    """Streaming and non-streaming completions of several prompt lengths (several buckets)."""
    lengths = [10, 40, 100, 200]
    i = 0
    with httpx.Client(base_url=base, timeout=60) as c:
        while not stop.is_set():
            n = lengths[i % len(lengths)]
            body = {"model": "tiny", "prompt": "x" * n, "max_tokens": 8, "temperature": 0}
            try:
                if i % 2:
                    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                        text = "".join(r.iter_text())
                        if r.status_code != 200 or "[DONE]" not in text:
                            errors.append(f"stream: HTTP {r.status_code} {text[:200]}")
                else:
                    r = c.post("/v1/completions", json=body)
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code} {r.text[:200]}")
            except httpx.HTTPError as e:
                errors.append(repr(e))
            i += 1
            stop.wait(0.05)


def _gpu_only_events(stop_after_s: float) -> None:
    """Runs in a Ray actor: capture + store events, exactly as the engine emits them."""
    import ray

    @ray.remote(num_cpus=0)
    class Feeder:
        def run(self, seconds: float) -> int:
            from deployments.metrics import observe_event
            n = 0
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                observe_event({"type": "capture", "bucket": 64, "seconds": 0.2 + 0.01 * (n % 5)},
                              "feeder", "tiny")
                action = ("load", "publish", "reject")[n % 3]
                observe_event({"type": "store", "action": action,
                               "reason": "fingerprint mismatch: dtype" if action == "reject" else ""},
                              "feeder", "tiny")
                n += 1
                time.sleep(1.0)
            return n

    return Feeder.remote().run.remote(stop_after_s)


def _query(expr: str) -> list:
    r = httpx.get(f"http://127.0.0.1:{PROM_PORT}/api/v1/query", params={"query": expr}, timeout=10)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def _has_finite(result: list) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in result)


def test_every_panel_has_data(tmp_path: Path):
    global PROM_PORT
    prom = _prometheus_bin()
    metrics_port = free_port()
    PROM_PORT = free_port()
    dash = json.loads(dashboards.JSON_PATH.read_text())    # the committed dashboard
    queries = [(title, dashboards.substitute(expr)) for title, expr in dashboards.panel_queries(dash)]
    assert len(queries) >= 20

    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: ray\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n")
    log = open(tmp_path / "prometheus.log", "w")

    with serve_app(free_port(), metrics_port=metrics_port, app_args=APP_ARGS) as base:
        proc = subprocess.Popen(
            [prom, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{PROM_PORT}", "--storage.tsdb.retention.time=1h"],
            stdout=log, stderr=subprocess.STDOUT)
        stop = threading.Event()
        errors: list = []
        th = threading.Thread(target=_traffic, args=(base, stop, errors), daemon=True)
        try:
            wait_http(f"http://127.0.0.1:{PROM_PORT}/-/ready", timeout_s=60)
            th.start()
            feeder = _gpu_only_events(DEADLINE_S)  # noqa: F841 (the ref keeps the feeding task alive)
            deadline = time.monotonic() + DEADLINE_S
            missing = queries
            t0 = time.monotonic()
            while time.monotonic() < deadline:
                missing = [(t, q) for t, q in queries if not _has_finite(_query(q))]
                if not missing:
                    print(f"all {len(queries)} panel queries had data after {time.monotonic() - t0:.0f} s")
                    break
                time.sleep(1)     # Prometheus scrapes every second
            targets = httpx.get(f"http://127.0.0.1:{PROM_PORT}/api/v1/targets", timeout=10).json()
        finally:
            stop.set()
            th.join(timeout=60)
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()

    health = [t["health"] for t in targets["data"]["activeTargets"]]
    assert health == ["up"], targets
    assert not errors, errors[:5]
    assert not missing, "panels without data after traffic:\n" + "\n".join(
        f"  {t}: {q}" for t, q in missing)
