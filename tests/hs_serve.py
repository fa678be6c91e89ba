"""Test helper (not a test module): run the real hybridserve app on a short-lived local Ray.

Used by test_prometheus.py and test_locust.py. Ray gets a fixed metrics export port so a real
Prometheus can scrape it; Serve's HTTP proxy listens on 127.0.0.1:``http_port``.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
import time
from typing import Any, Iterator

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_APP_ARGS: dict[str, Any] = {
    "engine": {"model": "tiny", "device": "cpu", "max_context": 1024},
    "num_cpus": 1,
    "default_max_tokens": 16,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s}s: {last}")


@contextlib.contextmanager
def ray_start_lock() -> Iterator[None]:
    """Held while a local Ray cluster starts, so that two never start at once on this host (the test
    command's two xdist workers): ray.init gives its raylet 30 s to register with the GCS, which two
    clusters starting together on a busy 2-core host can miss ("The current node timed out during
    startup"). A file lock: released when its holder's file closes, also when that process dies."""
    with open(os.path.join(tempfile.gettempdir(), "hybridserve-ray-start.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def serve_app(http_port: int, metrics_port: int | None = None, app_args: dict | None = None,
              app_name: str = "hybridserve", env: dict[str, str] | None = None) -> Iterator[str]:
    """Start Ray (num_cpus=4, no dashboard) + Serve + the app; yield its base URL; tear down.
    ``env``: variables for every Ray process started here (restored afterwards)."""
    import ray
    from ray import serve

    from deployments.app import build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    init_kw: dict[str, Any] = dict(num_cpus=4, include_dashboard=False, log_to_driver=False,
                                   configure_logging=False)
    if metrics_port is not None:
        init_kw["_metrics_export_port"] = metrics_port
    # Ray puts the driver's working directory on the workers' sys.path: the replicas and the
    # Serve controller (autoscaling policy) import engine/, deployments/ and autoscale/ from it.
    old_cwd = os.getcwd()
    os.chdir(REPO)
    try:
        with ray_start_lock():
            ray.init(**init_kw)
    finally:
        os.chdir(old_cwd)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        args = {**TINY_APP_ARGS, **(app_args or {})}
        serve.run(build_app(args), name=app_name, route_prefix="/")
        base = f"http://127.0.0.1:{http_port}"
        wait_http(base + "/v1/models")
        yield base
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def wait_haproxy_up(stats_port: int, n_replicas: int, backend_suffix: str = "", timeout_s: float = 60.0) -> None:
    """Block until HAProxy's stats CSV lists ``n_replicas`` replica servers UP in a backend whose name
    ends with ``backend_suffix``, then 2 s more (so the routers have the replicas' routing stats).
    Right after the app is RUNNING, HAProxy may still be health-checking a replica."""
    deadline = time.monotonic() + timeout_s
    rows: list = []
    while time.monotonic() < deadline:
        try:
            csv = httpx.get(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=2).text
            rows = [ln.split(",") for ln in csv.splitlines() if ln and not ln.startswith("#")]
            up = {r[1] for r in rows if r[0].endswith(backend_suffix) and r[1].startswith("SERVE_REPLICA_")
                  and r[17] == "UP"}
            if len(up) >= n_replicas:
                time.sleep(2.0)
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"HAProxy's backend not UP after {timeout_s}s: {[r[:2] + r[17:18] for r in rows]}")


@contextlib.contextmanager
def haproxy_app(app_args: dict, env: dict[str, str], n_replicas: int, backend_suffix: str = "") -> Iterator[str]:
    """serve_app behind Ray Serve's HAProxy ingress (``env`` must set RAY_SERVE_ENABLE_HA_PROXY=1);
    yields HAProxy's base URL once ``n_replicas`` replicas are UP in it (wait_haproxy_up)."""
    import pytest
    from ray.serve._private import build_app, constants

    # Ray reads RAY_SERVE_ENABLE_HA_PROXY when ray.serve is imported; in a pytest process that happened
    # before env was set (other test modules import it), so the driver's copy of the flag is set here to
    # what the Ray processes started by serve_app read from env.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "RAY_SERVE_ENABLE_HA_PROXY", True)
        mp.setattr(build_app, "RAY_SERVE_ENABLE_HA_PROXY", True)
        stats_port = free_port()
        with serve_app(free_port(), app_args=app_args,
                       env={**env, "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port)}) as base:
            wait_haproxy_up(stats_port, n_replicas, backend_suffix)
            yield base


def bucket_prompts(base_url: str, lengths: tuple[int, ...] = (15, 40, 200), rounds: int = 6,
                   settle_s: float = 0.5) -> Iterator[tuple[int, httpx.Response]]:
    """(bucket, response) for prompts of these byte lengths (byte tokenizer: BOS + n tokens; by default
    buckets 16, 64 and 256), one at a time, ``rounds`` times over, each answered 200. After each, a pause
    of ``settle_s`` lets the replicas' routing stats (every 0.2 s in the tests) show the bucket warm."""
    from engine.config import DEFAULT_BUCKETS
    from engine.request import bucket_for

    buckets = {n: bucket_for(n + 1, DEFAULT_BUCKETS) for n in lengths}
    assert len(set(buckets.values())) == len(lengths)
    with httpx.Client(base_url=base_url, timeout=60) as c:
        for _ in range(rounds):
            for n in lengths:
                r = c.post("/v1/completions", json={"prompt": "x" * n, "max_tokens": 2, "temperature": 0})
                assert r.status_code == 200, r.text
                yield buckets[n], r
                time.sleep(settle_s)
