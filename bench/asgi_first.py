"""Time from an ASGI response's call to its first body message: Starlette's StreamingResponse vs
deployments.ingress.SSEResponse, in one process, alternating, no network.

Below ASGI spec 2.4 (uvicorn says 2.3, so Ray's replica HTTP server does too) Starlette streams the
body from a second task in an anyio task group beside a disconnect listener; SSEResponse sends it
from the request's own task with a plain asyncio task watching for the disconnect. The figure is
what each costs on the way to the first SSE byte, per request (it is on every streaming request's
TTFT).

  python bench/asgi_first.py [--rounds 3000] [--tag cpu]
Writes bench/results/asgi-first-<date>[-<tag>].json (medians and P99 in microseconds).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from starlette.responses import StreamingResponse  # noqa: E402

from deployments.http.openai import SSEResponse  # noqa: E402


async def _body():
    yield b"data: {}\n\n"
    yield b"data: [DONE]\n\n"


async def first_byte_us(cls, spec: str) -> float:
    never = asyncio.Event()

    async def receive():            # a client that stays: the disconnect never comes
        await never.wait()
        return {"type": "http.disconnect"}
    first = None

    async def send(m):
        nonlocal first
        if m["type"] == "http.response.body" and first is None:
            first = time.perf_counter()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec}}
    t0 = time.perf_counter()
    await cls(_body(), media_type="text/event-stream")(scope, receive, send)
    return (first - t0) * 1e6


async def run(rounds: int) -> dict:
    variants = {"starlette_spec2.3": (StreamingResponse, "2.3"), "starlette_spec2.4": (StreamingResponse, "2.4"),
                "sse_response_spec2.3": (SSEResponse, "2.3")}
    xs: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(rounds + 200):                   # the first 200 rounds warm up
        for k, (cls, spec) in variants.items():
            v = await first_byte_us(cls, spec)
            if i >= 200:
                xs[k].append(v)
    return {k: {"p50_us": round(statistics.median(v), 2),
                "p99_us": round(sorted(v)[int(0.99 * len(v))], 2), "n": len(v)} for k, v in xs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3000)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--tag", default="", help="suffix of the result file name (a leading '-' is added)")
    a = ap.parse_args()
    res = asyncio.run(run(a.rounds))
    import starlette
    out = {"benchmark": "asgi_first", "date": dt.datetime.now().isoformat(timespec="seconds"),
           "host": platform.node(), "cpu": platform.processor() or platform.machine(),
           "python": platform.python_version(), "starlette": starlette.__version__,
           "what": "ASGI call -> first http.response.body message, one process, variants alternating",
           "results": res}
    print(json.dumps(out, indent=1))
    tag = f"-{a.tag.lstrip('-')}" if a.tag else ""
    path = Path(a.out) / f"asgi-first-{dt.date.today().isoformat()}{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
