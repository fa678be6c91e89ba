"""topology: colocated on a real local Ray Serve (CPU, tiny preset), over real HTTP: the OpenAI API
served inside the model replica, reached through the Ray proxy and, with
RAY_SERVE_ENABLE_DIRECT_INGRESS=1, on the replica's own port with no proxy in between."""
from __future__ import annotations

import json

import pytest
import requests

from tests.hs_serve import free_port, serve_app, wait_http

pytestmark = pytest.mark.ray

APP = "hybridserve"
APP_ARGS = {"engine": {"model": "tiny", "device": "cpu", "buckets": [16, 32, 64], "max_context": 1024},
            "topology": "colocated", "user_code_thread": False, "num_replicas": 1, "num_cpus": 1, "router": {"stats_period_s": 0.5},
            "max_ongoing_requests": 2, "max_queued_requests": 2, "retry_after_s": 3,   # 4 engine calls at once
            # 900 tokens take >= 4.5 s, so the disconnect test's request outlasts a stall of the replica's loop
            "engine_factory": "tests.slow_engine:SlowEngine", "engine_factory_args": {"step_ms": 5}}
GREEDY = {"temperature": 0, "ignore_eos": True}
ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


@pytest.fixture(scope="module")
def urls():
    """(proxy URL, the replica's own direct-ingress URL, app handle)."""
    from ray import serve

    direct_port = free_port()
    env = {**ENV, "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(direct_port),
           "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(direct_port + 50)}
    with serve_app(free_port(), app_args=APP_ARGS, app_name=APP, env=env) as proxy:
        direct = f"http://127.0.0.1:{direct_port}"
        wait_http(direct + "/healthz", 60)
        yield proxy, direct, serve.get_app_handle(APP)


def _sse(resp: requests.Response) -> list:
    out = []
    for block in resp.text.split("\n\n"):
        if block.strip():
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_one_deployment_serves_http_on_proxy_and_direct_port(urls):
    from ray import serve

    proxy, direct, _ = urls
    st = serve.status().applications[APP].deployments
    assert set(st) == {"ModelServer"}, st            # no separate Ingress deployment
    req = {"prompt": "Colocated", "max_tokens": 6, **GREEDY}
    texts = set()
    for base in (proxy, direct):
        r = requests.post(base + "/v1/completions", json=req, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 6
        texts.add(r.json()["choices"][0]["text"])
        ev = _sse(requests.post(base + "/v1/completions", json={**req, "stream": True}, timeout=60))
        assert ev[-1] == "[DONE]"
        texts.add("".join(c["choices"][0]["text"] for c in ev[:-1]))
        meta = ev[-2]["hybridserve"]
        tl = meta["timeline"]                          # stages of the request, in order
        assert tl["ingress_in"] <= tl["replica_in"] <= tl["replica_first"] <= tl["ingress_first"]
    assert len(texts) == 1                             # proxy, direct, streamed or not: same greedy text


def test_choices_and_batches_on_the_replica_own_engine(urls):
    """n and batched prompts in the colocated topology: the choices queue on the replica's one
    engine (no Ray handle in between) and come back complete, streamed or not."""
    _, direct, _ = urls
    req = {"prompt": ["Colocated", "batch"], "max_tokens": 3, "n": 2, **GREEDY}
    b = requests.post(direct + "/v1/completions", json=req, timeout=60).json()
    texts = [c["text"] for c in b["choices"]]
    assert len(texts) == 4 and texts[0] == texts[1] and texts[2] == texts[3]
    assert b["usage"]["completion_tokens"] == 12
    ev = _sse(requests.post(direct + "/v1/completions", json={**req, "stream": True}, timeout=60))
    assert ev[-1] == "[DONE]"
    for i, t in enumerate(texts):
        assert "".join(c["choices"][0]["text"] for c in ev[:-1] if c["choices"][0]["index"] == i) == t


def test_a_full_replica_answers_503_with_retry_after(urls):
    """The replica's engine takes max_ongoing_requests + max_queued_requests calls at once (4 here): a
    request needing 5 (n=5) is refused with 503 + Retry-After on the direct port and through the proxy,
    and the replica then serves the next request."""
    proxy, direct, _ = urls
    for base in (direct, proxy):
        r = requests.post(base + "/v1/completions", json={"prompt": "full", "max_tokens": 50, "n": 5}, timeout=60)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "overloaded" and r.headers["retry-after"] == "3"
    r = requests.post(direct + "/v1/completions", json={"prompt": "ok", "max_tokens": 2, "n": 4}, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 4


def test_bad_request_is_400_and_replica_keeps_serving(urls):
    _, direct, _ = urls
    r = requests.post(direct + "/v1/completions", json={"prompt": "x", "max_tokens": 0}, timeout=30)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = requests.post(direct + "/v1/completions", json={"prompt": "y" * 1100, "max_tokens": 4}, timeout=30)
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    assert requests.post(direct + "/v1/completions", json={"prompt": "ok", "max_tokens": 2},
                         timeout=30).status_code == 200


def test_python_handle_and_replica_stats(urls):
    from ray import serve

    _, _, handle = urls
    out = handle.remote("Hello there", max_tokens=5, **GREEDY).result()
    chunks = list(handle.options(stream=True).remote("Hello there", stream=True, max_tokens=5, **GREEDY))
    assert "".join(c["text"] for c in chunks) == out["text"] and out["usage"]["completion_tokens"] == 5
    stats = serve.get_deployment_handle("ModelServer", APP).stats.remote().result()
    assert stats["warm_source"] == "cpu_served_standin" and stats["requests"] >= 2
    assert stats["user_code_thread"] is False     # AppConfig.user_code_thread reached the replica's env


def test_client_disconnect_cancels_the_engine_request(urls):
    """A streaming client that hangs up after its first token ends the engine request as "cancelled", well before
    its 900 tokens."""
    import time

    from ray import serve

    _, direct, _ = urls
    h = serve.get_deployment_handle("ModelServer", APP)
    t0 = time.time()
    with requests.post(direct + "/v1/completions", stream=True, timeout=60,
                       json={"prompt": "long", "max_tokens": 900, "stream": True, **GREEDY}) as r:
        next(r.iter_content(chunk_size=None))        # first token arrived: hang up
    fin, deadline = None, time.time() + 20
    while fin is None and time.time() < deadline:    # this request's finish record
        last = h.stats.remote().result()["finishes"]
        fin = last[-1] if last and last[-1]["at"] >= t0 else None
        time.sleep(0.1)
    assert fin is not None and fin["finish_reason"] == "cancelled" and fin["output_tokens"] < 900, fin
