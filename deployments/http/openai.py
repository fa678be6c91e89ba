"""Pure builders of OpenAI's response shapes: logprobs, choices, bodies, SSE chunks. No Ray, no I/O
except :class:`SSEResponse`, the streaming response that sends them."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Callable

from starlette.responses import StreamingResponse

from .errors import error_body


def finish(reason: str) -> str:
    return "stop" if reason == "cancelled" else reason


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def format_logprobs(items: list[dict], chat: bool, offset: int = 0) -> dict:
    """The engine's per-token logprobs (dicts of engine.TokenLogprobs) in OpenAI's shape: chat
    ``{"content": [{token, logprob, bytes, top_logprobs}]}``; completions ``{tokens, token_logprobs,
    top_logprobs, text_offset}`` whose top_logprobs holds the chosen token too (up to N + 1 entries).
    offset: characters of the completion before these tokens (a stream's earlier chunks)."""
    if chat:
        def one(x: dict) -> dict:
            return {"token": x["token"], "logprob": x["logprob"], "bytes": x["bytes"]}
        return {"content": [{**one(it["chosen"]), "top_logprobs": [one(a) for a in it["top"]]} for it in items],
                "refusal": None}
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for it in items:
        c = it["chosen"]
        out["tokens"].append(c["token"])
        out["token_logprobs"].append(c["logprob"])
        top: dict[str, float] | None = None
        if c["logprob"] is not None:            # None: an echoed prompt's first token
            top = {}
            for a in [*it["top"], c]:           # tokens of the same text: the likeliest one's value
                top.setdefault(a["token"], a["logprob"])
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(c["token"])
    return out


def chunk_logprobs(item: dict, chat: bool, offset: int) -> tuple[dict | None, int]:
    """A stream item's logprobs in OpenAI's shape (None without) and the completion's character
    offset after its token."""
    if "logprobs" not in item:
        return None, offset
    return format_logprobs([item["logprobs"]], chat, offset), offset + len(item["logprobs"]["chosen"]["token"])


def choice(i: int, text: str, lp: dict | None, finish_reason: str, chat: bool) -> dict:
    if chat:
        return {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                "finish_reason": finish_reason}
    return {"text": text, "index": i, "logprobs": lp, "finish_reason": finish_reason}


def best_of(outs: list[dict], n: int, keep_logprobs: bool) -> list[dict]:
    """best_of: the n outputs with the highest total logprob, best first."""
    ranked = sorted(outs, key=lambda o: -sum(t["chosen"]["logprob"] for t in o["logprobs"]))[:n]
    return ranked if keep_logprobs else [{k: v for k, v in o.items() if k != "logprobs"} for o in ranked]


def completion_body(rid: str, created: int, model: str, chat: bool, choices: list[dict],
                    prompt_tokens: int, outs: list[dict]) -> dict:
    completion = sum(o["usage"]["completion_tokens"] for o in outs)    # best_of's unreturned ones too
    body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion},
            "hybridserve": outs[0]["meta"]}
    if len(outs) > 1:
        body["hybridserve"] = {**outs[0]["meta"], "choices": [o["meta"] for o in outs]}
    return body


def response_headers(meta: dict | None) -> dict:
    if not meta:
        return {}
    return {"x-hybridserve-replica": str(meta.get("replica")), "x-hybridserve-bucket": str(meta.get("bucket")),
            "x-hybridserve-warm": "1" if meta.get("warm") else "0"}


async def merged(streams: list[tuple[dict, Any]]) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, item) from every stream as items arrive, each stream up to its final or error
    item; a stream's exception (a replica died mid-stream) comes as the item."""
    async def one(i: int, first: dict, gen) -> AsyncIterator[tuple[int, Any]]:
        item = first
        while True:
            yield i, item
            if "finish_reason" in item or "error" in item:
                return
            try:
                item = await gen.__anext__()
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                yield i, e
                return

    if len(streams) == 1:           # the common case: no queue, no extra task
        async for x in one(0, *streams[0]):
            yield x
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, first: dict, gen) -> None:
        try:
            async for x in one(i, first, gen):
                await q.put(x)
        finally:
            await q.put((i, None))
    tasks = [asyncio.ensure_future(pump(i, f, g)) for i, (f, g) in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await q.get()
            if item is None:
                left -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def sse_stream(streams: list[tuple[dict, Any]], prompt_of: list[int], base: dict, chat: bool,
                     include_usage: bool, on_failure: Callable[[BaseException], dict]) -> AsyncIterator[bytes]:
    """SSE chunks of every stream (choice index = stream index), then one usage total (each prompt's
    tokens counted once), then [DONE]. ``base``: id, object, created, model of every chunk;
    ``on_failure(exc)``: the error body for a stream that failed mid-way."""
    first = streams[0][0]
    metas = [f.get("meta") for f, _ in streams]
    role_sent = [False] * len(streams)
    offset = [0] * len(streams)                 # completion characters of the tokens sent so far
    usage: dict | None = None
    prompts_counted: set[int] = set()
    finished = 0
    try:
        async for i, item in merged(streams):
            if isinstance(item, BaseException):  # the replica died mid-stream: a clean error event, no hang
                yield sse(on_failure(item))
                break
            if "error" in item:
                yield sse(error_body(item["error"]["message"], code=item["error"].get("code")))
                break
            done = "finish_reason" in item
            lp, offset[i] = chunk_logprobs(item, chat, offset[i])
            reason = finish(item["finish_reason"]) if done else None
            if chat:
                delta: dict = {"content": item["text"]} if (item["text"] or not done) else {}
                if not role_sent[i]:  # the first chunk carries the role (and the first token)
                    delta = {"role": "assistant", "content": item["text"]}
                    role_sent[i] = True
                ch = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}
            else:
                ch = {"text": item["text"], "index": i, "logprobs": lp, "finish_reason": reason}
            chunk = {**base, "choices": [ch]}
            if done:
                chunk["hybridserve"] = {**(metas[i] or {}), **item.get("meta", {})}
                if i == 0 and "timeline" in first:
                    chunk["hybridserve"]["timeline"] = {**first["timeline"],
                                                        **chunk["hybridserve"].get("timeline", {})}
                if include_usage:
                    chunk["usage"] = None
                u = item["usage"]
                usage = usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
                if prompt_of[i] not in prompts_counted:
                    prompts_counted.add(prompt_of[i])
                    usage["prompt_tokens"] += u["prompt_tokens"]
                    usage["total_tokens"] += u["prompt_tokens"]
                usage["completion_tokens"] += u["completion_tokens"]
                usage["total_tokens"] += u["completion_tokens"]
                finished += 1
            if item is first and "timeline" in first:
                first["timeline"]["sse_first"] = time.time()
            yield sse(chunk)
        if include_usage and finished == len(streams) and usage is not None:
            yield sse({**base, "choices": [], "usage": usage})
        yield DONE
    finally:
        for _, gen in streams:  # client gone or done: stop the replicas' generators (no-op when finished)
            gen.cancel()


async def _close(body: Any) -> None:
    """Close a body generator now: one parked at its yield (the cancel landed in ``send``) would else run
    its ``finally`` (which cancels the replica streams) only when the garbage collector finds it."""
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        await asyncio.shield(aclose())


class SSEResponse(StreamingResponse):
    """Starlette's StreamingResponse without its anyio task group per response: the body is sent from
    the request's own task, and a plain asyncio task waits for http.disconnect and cancels it, so a
    client that goes away still stops the stream (and the engine request) at once. A cancellation
    from anyone else (Ray's disconnect handling, a shut-down) propagates as usual."""

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        gone = False

        async def watch() -> None:
            nonlocal gone
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            except Exception:       # no disconnect to wait for (the server's receive failed): stream on
                return
            gone = True
            task.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not gone or task.cancelling() > 1:
                raise
            task.uncancel()         # only our own cancel: the client left, the response ends here
        finally:
            watcher.cancel()
            await _close(self.body_iterator)
        if self.background is not None:
            await self.background()
