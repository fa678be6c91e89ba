"""OpenAI's response shapes from deployments/http/openai.py, as pure functions (no Ray, no HTTP)."""
from __future__ import annotations

import asyncio
import json

from deployments.http import openai as oa


def lp(token: str, logprob: float | None, top: list[tuple[str, float]] = ()) -> dict:
    one = lambda t, v: {"token_id": 0, "token": t, "logprob": v, "bytes": list(t.encode())}  # noqa: E731
    return {"chosen": one(token, logprob), "top": [one(t, v) for t, v in top]}


def test_completion_logprobs_hold_the_chosen_token_and_offsets():
    out = oa.format_logprobs([lp("He", None), lp("llo", -0.5, [("llo", -0.5), ("lp", -1.0)])], chat=False, offset=3)
    assert out == {"tokens": ["He", "llo"], "token_logprobs": [None, -0.5],
                   "top_logprobs": [None, {"llo": -0.5, "lp": -1.0}], "text_offset": [3, 5]}
    chat = oa.format_logprobs([lp("a", -0.1, [("a", -0.1)])], chat=True)
    assert chat["content"][0]["top_logprobs"] == [{"token": "a", "logprob": -0.1, "bytes": [97]}]


def test_best_of_keeps_the_highest_total_logprob_first():
    outs = [{"text": t, "logprobs": [lp("x", v)]} for t, v in (("a", -3.0), ("b", -1.0), ("c", -2.0))]
    assert [o["text"] for o in oa.best_of(outs, 2, keep_logprobs=False)] == ["b", "c"]
    assert "logprobs" not in oa.best_of(outs, 1, keep_logprobs=False)[0]


class _Gen:
    def __init__(self, items):
        self.items, self.cancelled = list(items), False

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self):
        self.cancelled = True


def _final(n_prompt: int, n_out: int) -> dict:
    return {"text": "", "finish_reason": "length", "meta": {},
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out}}


def test_sse_stream_interleaves_choices_counts_each_prompt_once_and_ends_with_done():
    a = _Gen([{"text": "y", "index": 1}, _final(5, 2)])
    b = _Gen([_final(5, 1)])
    streams = [({"text": "x", "index": 0, "meta": {}}, a), ({"text": "z", "index": 0, "meta": {}}, b)]

    async def collect():
        return [c async for c in oa.sse_stream(streams, [0, 0], {"id": "cmpl-1"}, False, True, lambda e: {})]
    chunks = asyncio.run(collect())
    assert chunks[-1] == oa.DONE and a.cancelled and b.cancelled
    events = [json.loads(c[len(b"data: "):]) for c in chunks[:-1]]
    text = {i: "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"][0]["index"] == i) for i in (0, 1)}
    assert text == {0: "xy", 1: "z"}
    assert events[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
