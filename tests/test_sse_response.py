"""SSEResponse (deployments/ingress.py): the streaming response without Starlette's task group must
still stop the stream when the client goes away, and must not swallow anyone else's cancellation.
Plain ASGI calls, no server: the HTTP end to end (a client that disconnects cancels the engine
request) is tests/test_app.py's cancel test."""
from __future__ import annotations

import asyncio

import pytest

from deployments.http.openai import SSEResponse

SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}


def _endless(state: dict):
    async def gen():
        try:
            while True:
                state["sent"] += 1
                yield b"data: tok\n\n"
                await asyncio.sleep(0.005)      # a decode step
        finally:
            state["closed"] = True              # where the ingress cancels the engine stream
    return gen()


def test_client_disconnect_stops_the_stream_and_returns():
    state = {"sent": 0, "closed": False}
    left = asyncio.Event()
    bodies = []

    async def receive():
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(m):
        if m["type"] == "http.response.body":
            bodies.append(m["body"])
            if len(bodies) == 3:
                left.set()                      # the client goes away after three chunks

    async def main():
        await asyncio.wait_for(SSEResponse(_endless(state), media_type="text/event-stream")(SCOPE, receive, send), 5)
        return asyncio.current_task().cancelling()

    assert asyncio.run(main()) == 0             # the response's own cancel does not leak to the caller
    assert state["closed"] and 3 <= state["sent"] <= 4, state
    assert bodies[:3] == [b"data: tok\n\n"] * 3


def test_a_cancel_from_outside_propagates():
    state = {"sent": 0, "closed": False}

    async def receive():
        await asyncio.Event().wait()            # the client stays
        return {"type": "http.disconnect"}

    async def send(m):
        pass

    async def main():
        t = asyncio.ensure_future(SSEResponse(_endless(state))(SCOPE, receive, send))
        await asyncio.sleep(0.03)
        t.cancel()                              # e.g. Ray's own disconnect handling or a shut-down
        with pytest.raises(asyncio.CancelledError):
            await t

    asyncio.run(main())
    assert state["closed"] and state["sent"] >= 2


def test_a_stream_that_ends_sends_the_final_empty_body():
    msgs = []

    async def body():
        yield b"data: a\n\n"
        yield b"data: [DONE]\n\n"

    async def receive():
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(m):
        msgs.append(m)

    asyncio.run(SSEResponse(body(), media_type="text/event-stream")(SCOPE, receive, send))
    assert msgs[0]["type"] == "http.response.start" and msgs[0]["status"] == 200
    assert [m.get("body") for m in msgs[1:]] == [b"data: a\n\n", b"data: [DONE]\n\n", b""]
    assert msgs[-1]["more_body"] is False


@pytest.mark.parametrize("who", ["client", "outside"])
def test_a_cancel_that_lands_in_send_closes_the_body_at_once(who):
    """The cancel arrives while the response awaits ``send`` (the body generator is parked at its
    yield, not running): the body must be closed then and there, not when the garbage collector
    gets to it, or the engine request behind it runs to max_tokens."""
    state = {"sent": 0, "closed": False}
    left = asyncio.Event()
    in_send = asyncio.Event()

    async def receive():
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(m):
        if m["type"] == "http.response.body" and state["sent"] >= 3:
            in_send.set()
            await asyncio.Event().wait()        # a slow client: the socket buffer is full

    async def main():
        t = asyncio.ensure_future(SSEResponse(_endless(state))(SCOPE, receive, send))
        await in_send.wait()
        if who == "client":
            left.set()
            await asyncio.wait_for(t, 5)
        else:
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
        return state["closed"]                  # before asyncio.run's own clean-up closes generators

    assert asyncio.run(main()), state
