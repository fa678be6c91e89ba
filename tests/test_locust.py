"""A short headless Locust run (locustfiles/short_prompts.py, ~20 s) against the CPU app:
zero failures, and the stats CSV holds TTFT and end-to-end rows with percentiles. And
short_prompts.sse_lines / check_sse_response with both Locust HTTP clients against a local chunked
SSE server: each line is read as it arrives."""
from __future__ import annotations

import csv
import json
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


def _env(**extra: str) -> dict:
    env = {**os.environ, "HS_MAX_TOKENS": "16", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("PYTHONPATH", None)   # locustfiles import nothing of the project
    return env


# Run in a child process: importing locust gevent-patches the interpreter. A gevent server streams
# chunked SSE and sends chunk i+1 only after the client has yielded chunk i's first line (or after
# 3 s, noted as "late"): a reader that waits for more bytes (FastResponse.iter_content's 1 KiB blocks)
# shows up as late chunks.
SSE_CHILD = r"""
import json, socket, sys
sys.path.insert(0, sys.argv[1])
import short_prompts as sp          # imports locust, which gevent-patches this process
from gevent.event import Event
from gevent.server import StreamServer
from locust.clients import HttpSession
from locust.contrib.fasthttp import FastHttpSession
from locust.env import Environment

CHUNKS = [b'data: {"choices": [{"text": "a"}]}\n\n', b'data: {"choices": [{"text": "b"}]}\r\n\r\n',
          b"data: [DONE]\n\n", b": tail without newline"]
FIRST = [c.splitlines()[0] for c in CHUNKS[:3]]
state = {}


def handle(sock, addr):
    f = sock.makefile("rb")
    head = f.readline()
    length = 0
    while True:
        ln = f.readline()
        if ln in (b"\r\n", b""):
            break
        if ln.lower().startswith(b"content-length:"):
            length = int(ln.split(b":")[1])
    f.read(length)
    path = head.split()[1]
    if path == b"/err":
        body = b'{"error": "overloaded"}'
        sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    elif path == b"/json":
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                     b"Connection: close\r\n\r\n{}")
    else:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        for i, c in enumerate(CHUNKS):
            sock.sendall(b"%x\r\n%s\r\n" % (len(c), c))
            if i < len(FIRST) and not state["acks"][i].wait(timeout=3.0):
                state["late"].append(i)
        sock.sendall(b"0\r\n\r\n")
    sock.close()


server = StreamServer(("127.0.0.1", 0), handle)
server.start()
url = f"http://127.0.0.1:{server.server_port}"
env = Environment()
out = {}
for kind in ("fast", "requests"):
    def session(base):
        if kind == "fast":
            return FastHttpSession(base, env.events.request, None, network_timeout=10, connection_timeout=10)
        return HttpSession(base, env.events.request, None)
    state.update(acks=[Event() for _ in FIRST], late=[])
    lines, errors = [], {}
    with session(url).post("/sse", json={"x": 1}, stream=True, catch_response=True) as resp:
        sp.check_sse_response(resp)
        for line in sp.sse_lines(resp):
            lines.append(line.decode())
            if line in FIRST:
                state["acks"][FIRST.index(line)].set()
        resp.success()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"    # nothing listens there once closed
    for name, base, path in (("503", url, "/err"), ("json", url, "/json"), ("refused", dead, "/sse")):
        with session(base).post(path, json={"x": 1}, stream=True, catch_response=True) as resp:
            try:
                sp.check_sse_response(resp)
                errors[name] = None
            except sp.StreamError as e:
                errors[name] = str(e)
            resp.failure("expected")
    out[kind] = {"lines": lines, "late": state["late"], "errors": errors}
print("RESULT " + json.dumps(out))
"""


def test_sse_lines_yield_each_line_as_it_arrives_with_both_clients(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-c", SSE_CHILD, str(ROOT / "locustfiles")], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=120)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads(line[len("RESULT "):])
    want = ['data: {"choices": [{"text": "a"}]}', "", 'data: {"choices": [{"text": "b"}]}', "",
            "data: [DONE]", "", ": tail without newline"]
    for kind in ("fast", "requests"):
        r = res[kind]
        assert r["lines"] == want, (kind, r["lines"])
        assert r["late"] == [], (kind, "chunks sent only after a 3 s wait for the client", r["late"])
        assert r["errors"]["503"].startswith("HTTP 503") and "overloaded" in r["errors"]["503"], (kind, r)
        assert "is not text/event-stream" in r["errors"]["json"], (kind, r)
        assert r["errors"]["refused"].startswith("connection failed"), (kind, r)


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
