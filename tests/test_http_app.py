"""The HTTP app's one request path in-process (the FastAPI app over httpx's ASGI transport, the model
replica's class in-process with a tiny CPU engine; no Ray): the gate middleware (API key, body bytes
counted on every route and content type), docs off by default, errors; the replica's autoscaling stats. The
same behaviours on real Ray Serve over real HTTP: tests/test_reliability.py."""
from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest

from deployments.colocated import Capacity, LocalHandle
from deployments.config import AppConfig
from deployments.http.app import build_http_app
from deployments.http.handle_api import HandleAPI
from deployments.http.service import OpenAIIngress
from deployments.server import ModelServer

ARGS = {"engine": {"model": "tiny", "device": "cpu", "buckets": [16, 32], "max_context": 128},
        "max_request_bytes": 4096, "api_key_env": "HS_TEST_HTTP_KEY"}
AUTH = {"authorization": "Bearer k1"}


class _Ingress(HandleAPI, OpenAIIngress):
    pass


class _Broken:
    """A model 'replica' whose every call fails with an error naming a server path."""

    async def generate(self, req):
        raise RuntimeError("cannot open /srv/secret/weights.bin")

    async def stream(self, req):
        raise RuntimeError("cannot open /srv/secret/weights.bin")
        yield  # pragma: no cover


@pytest.fixture(scope="module")
def server():
    return ModelServer(AppConfig.model_validate(ARGS))


def _call(server, requests, monkeypatch, args=None, target=None):
    monkeypatch.setenv("HS_TEST_HTTP_KEY", "k1")
    cfg = AppConfig.model_validate({**ARGS, **(args or {})})
    app = build_http_app(_Ingress(LocalHandle(target or server, capacity=Capacity(8)), cfg))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                     base_url="http://t") as c:
            return [await c.request(m, p, **kw) for m, p, kw in requests]
    return asyncio.run(main())


def test_key_is_checked_once_before_the_body_on_every_v1_route(server, monkeypatch):
    body = {"prompt": "hi", "max_tokens": 2}
    rs = _call(server, [("POST", "/v1/completions", {"json": body}),
                        ("POST", "/v1/completions", {"json": body, "headers": {"authorization": "Bearer k2"}}),
                        ("POST", "/v1/chat/completions", {"content": b"\xff{"}),
                        ("GET", "/v1/models", {}),
                        ("GET", "/healthz", {}),
                        ("POST", "/v1/completions", {"json": body, "headers": AUTH})], monkeypatch)
    assert [r.status_code for r in rs] == [401, 401, 401, 401, 200, 200]
    assert rs[0].json()["error"]["code"] == "invalid_api_key"


async def _chunks(n: int, size: int):
    for _ in range(n):
        yield b"x" * size


@pytest.mark.parametrize("path,content_type", [("/v1/completions", "text/plain"),
                                               ("/v1/completions", "application/json"),
                                               ("/v1/chat/completions", "application/octet-stream")])
def test_a_chunked_body_over_the_limit_is_413_whatever_its_type(server, monkeypatch, path, content_type):
    r, = _call(server, [("POST", path, {"content": _chunks(20, 1000),
                                        "headers": {**AUTH, "content-type": content_type}})], monkeypatch)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large" and "4096 bytes" in r.json()["error"]["message"]


def test_docs_are_off_unless_enabled(server, monkeypatch):
    rs = _call(server, [("GET", "/docs", {}), ("GET", "/openapi.json", {})], monkeypatch)
    assert [r.status_code for r in rs] == [404, 404]
    rs = _call(server, [("GET", "/docs", {}), ("GET", "/openapi.json", {})], monkeypatch, {"http_docs": True})
    assert [r.status_code for r in rs] == [200, 200] and "/v1/completions" in rs[1].json()["paths"]


def test_a_500_is_generic_with_a_request_id(server, monkeypatch, caplog):
    logging.getLogger("ray.serve").addHandler(caplog.handler)   # Ray's logger does not propagate
    r, s = _call(server, [("POST", "/v1/completions", {"json": {"prompt": "hi"}, "headers": AUTH}),
                          ("POST", "/v1/completions", {"json": {"prompt": "hi", "stream": True}, "headers": AUTH})],
                 monkeypatch, target=_Broken())
    for resp in (r, s):
        assert resp.status_code == 500
        err = resp.json()["error"]
        assert "/srv/secret" not in resp.text and err["code"] == "internal_error"
        rid = err["message"].split("request id ")[1].split(")")[0]
        assert rid.startswith("err-") and rid in caplog.text and "/srv/secret" in caplog.text


def test_counts_are_checked_before_tokenizing(server, monkeypatch):
    body = json.dumps({"prompt": ["a"] * 200_000}).encode()      # 800 KB; the limit is raised to let it in
    r, = _call(server, [("POST", "/v1/completions", {"content": body, "headers": {**AUTH, "content-type": "application/json"}})], monkeypatch,
               {"max_request_bytes": 2**21})
    assert r.status_code == 400 and "at most 64" in r.json()["error"]["message"]


def test_colocated_capacity_answers_503_when_full(server, monkeypatch):
    class Slow:
        async def generate(self, req):
            await asyncio.sleep(0.5)
            return await server.generate(req)
        stream = None
    cfg = AppConfig.model_validate(ARGS)
    app = build_http_app(_Ingress(LocalHandle(Slow(), capacity=Capacity(2)), cfg))
    monkeypatch.setenv("HS_TEST_HTTP_KEY", "k1")

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await asyncio.gather(*[c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                                                 headers=AUTH) for _ in range(4)])
    codes = sorted(r.status_code for r in asyncio.run(main()))
    assert codes == [200, 200, 503, 503]


def test_the_replica_reports_each_requests_cost_at_full_batch():
    """mean_full_batch_ms: each finished request's prefill (admission -> first token) plus its other tokens'
    decode steps at the engine's full batch (8 CPU slots, its step measured at start) / 8, averaged."""
    from engine import SamplingParams

    rep = ModelServer(AppConfig.model_validate(ARGS))
    seen = []
    rep.eng.add_listener(lambda e: seen.append((e["metrics"], e["output_tokens"])) if e["type"] == "request" else None)
    assert rep.record_autoscaling_stats()["mean_full_batch_ms"] == 0.0          # nothing finished: not reported
    for n in (3, 9):
        rep.eng.generate([1, 2, 3, 4], SamplingParams(max_tokens=n, ignore_eos=True))
    step = rep.eng.stats()["step_ms"][8]          # one stream at a time: the full batch's entry stays the start's
    want = [(m.ttft_s - m.queue_s) * 1e3 + (k - 1) * step / 8 for m, k in seen]
    stats = rep.record_autoscaling_stats()
    assert [k for _, k in seen] == [3, 9] and stats["max_batch"] == 8.0
    assert stats["mean_full_batch_ms"] == pytest.approx(sum(want) / 2, rel=1e-3)
    rep.eng.shutdown()
