"""handle_transport: grpc (Ingress -> ModelServer over Ray Serve's gRPC transport) on a real local
Ray Serve (CPU, tiny preset), over real HTTP: same results as the default transport, engine errors
still 400, back-pressure still a fast 503 with Retry-After."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.hs_serve import free_port, serve_app

pytestmark = pytest.mark.ray

APP_ARGS = {"engine": {"model": "tiny", "device": "cpu", "buckets": [16, 32, 64], "max_context": 128},
            "handle_transport": "grpc", "num_replicas": 1, "num_cpus": 1, "max_ongoing_requests": 2,
            "max_queued_requests": 2, "engine_factory": "tests.slow_engine:SlowEngine",
            "engine_factory_args": {"ms": 150}, "retry_after_s": 2,
            "router": {"stats_period_s": 0.5}}
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def base():
    with serve_app(free_port(), app_args=APP_ARGS) as url:
        yield url


def test_stream_and_plain_agree_and_errors_are_400(base):
    req = {"prompt": "over grpc", "max_tokens": 6, **GREEDY}
    plain = requests.post(base + "/v1/completions", json=req, timeout=60)
    assert plain.status_code == 200, plain.text
    ev = [b[6:] for b in requests.post(base + "/v1/completions", json={**req, "stream": True},
                                       timeout=60).text.split("\n\n") if b.strip()]
    assert ev[-1] == "[DONE]"
    chunks = [json.loads(e) for e in ev[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain.json()["choices"][0]["text"]
    assert chunks[-1]["hybridserve"]["timeline"]["replica_in"] >= chunks[-1]["hybridserve"]["timeline"]["ingress_in"]
    # prompt + max_tokens over the context: still a 400 with the fix in the message
    r = requests.post(base + "/v1/completions", json={"prompt": [1] * 100, "max_tokens": 100}, timeout=60)
    assert r.status_code == 400 and "context" in r.json()["error"]["message"], r.text


def test_backpressure_is_a_fast_503(base):
    def one(i: int) -> tuple[int, dict, str]:
        r = requests.post(base + "/v1/completions", timeout=60,
                          json={"prompt": f"burst {i}", "max_tokens": 4, "stream": i % 2 == 0})
        return r.status_code, dict(r.headers), r.text

    with ThreadPoolExecutor(16) as pool:
        out = list(pool.map(one, range(16)))
    codes = [c for c, _, _ in out]
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    for c, h, t in out:
        if c == 503:
            assert h.get("retry-after") == "2" and json.loads(t)["error"]["code"] == "overloaded", (h, t)
