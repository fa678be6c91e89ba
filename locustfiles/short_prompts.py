"""Locust: chat-like OpenAI-API users streaming short prompts from hybridserve.

Each user POSTs ``/v1/completions`` with ``stream: true`` and reads the SSE stream. Besides the
HTTP entry (``POST /v1/completions``), three entries of type ``SSE`` go into Locust's stats and
CSV, so P50/P99 of each show separately:

- ``ttft`` — request sent -> first SSE chunk with a choice (time to first token),
- ``e2e``  — request sent -> ``data: [DONE]`` (end to end),
- ``tpot`` — mean gap between chunks after the first (time per output token).

A request fails (on the HTTP entry and on ``e2e``) on a non-200 status, a non-SSE content type,
an undecodable or error chunk, a connection broken mid-stream, or a stream without ``[DONE]``.

Prompt lengths are drawn from a weighted mix of token ranges (default skewed short, as in chat)::

    --prompt-mix "10-50:50,51-150:30,151-300:15,301-500:5"     # env HS_PROMPT_MIX

The prompt is text of ``tokens * chars_per_token`` characters (``--chars-per-token``, default 1:
the byte-level tokenizer of the tiny CPU model; about 4 for LLaMA tokenizers), or with
``--prompt-format ids`` a list of token ids (which the OpenAI completions API accepts).
Other options: ``--max-tokens`` (HS_MAX_TOKENS), ``--model`` (HS_MODEL; default: the first id of
GET /v1/models), ``--api-key`` (HS_API_KEY / OPENAI_API_KEY), ``--temperature``.

HTTP client: Locust's ``FastHttpUser`` (geventhttpclient) by default; ``HS_LOCUST_CLIENT=requests``
selects ``HttpUser`` (python-requests) for an A/B. The client's own per-request cost lands in the
measured TTFT, and so in the "HTTP overhead" (client TTFT - the engine's TTFT); under gevent the
requests stack costs about 1 ms more per request than a lean client, so the fast client is the
default. The variable is read at import, because Locust picks the user class when it loads the
locustfile (a ``--option`` is parsed only afterwards). ``sse_lines`` reads the SSE body line by line
as the bytes arrive, with either client (not ``FastResponse.iter_content``, which waits for 1 KiB).

Run headless (see docs/observability.md)::

    locust -f locustfiles/short_prompts.py --headless -u 8 -r 2 -t 60s \
        --host http://127.0.0.1:8000 --csv results/short
    HS_LOCUST_CLIENT=requests locust -f locustfiles/short_prompts.py ...   # the python-requests client

Imports only locust and the standard library (no project code).
"""
from __future__ import annotations

import json
import os
import random
import time
from typing import Iterator

from locust import HttpUser, between, events, task
from locust.contrib.fasthttp import FastHttpUser

# the load generator's HTTP client, fixed at import (Locust picks the user classes when it loads the file)
CLIENT_ENV = "HS_LOCUST_CLIENT"
CLIENTS = {"fast": FastHttpUser, "requests": HttpUser}
CLIENT = (os.environ.get(CLIENT_ENV) or "fast").strip().lower()
if CLIENT not in CLIENTS:
    raise ValueError(f"{CLIENT_ENV}={CLIENT!r}: choose one of {sorted(CLIENTS)}")
BaseHttpUser = CLIENTS[CLIENT]
# FastHttpUser's socket timeout (send, connect wait, each read); its default of 60 s can cut a long
# prompt on CPU. The requests client keeps its default (no timeout).
NETWORK_TIMEOUT_S = 600.0

DEFAULT_MIX = "10-50:50,51-150:30,151-300:15,301-500:5"
_WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing "
          "matches near old stone bridges and river banks under pale morning light").split()


def parse_mix(spec: str) -> list[tuple[int, int, float]]:
    """'10-50:50,51-150:30' -> [(10, 50, 50.0), (51, 150, 30.0)]; a bare 'N:w' is N-N."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        rng, _, weight = part.partition(":")
        lo, _, hi = rng.partition("-")
        lo_i, hi_i = int(lo), int(hi or lo)
        w = float(weight) if weight else 1.0
        if lo_i < 1 or hi_i < lo_i or w < 0:
            raise ValueError(f"bad prompt-mix part {part!r}: want LO-HI:WEIGHT with 1 <= LO <= HI")
        out.append((lo_i, hi_i, w))
    if not out or sum(w for *_, w in out) <= 0:
        raise ValueError(f"prompt-mix {spec!r} has no positive weight")
    return out


def draw_length(mix: list[tuple[int, int, float]], rng: random.Random) -> int:
    lo, hi, _ = rng.choices(mix, weights=[w for *_, w in mix])[0]
    return rng.randint(lo, hi)


def make_text(n_chars: int, rng: random.Random) -> str:
    """ASCII text of exactly n_chars characters (n_chars tokens under a byte tokenizer)."""
    parts: list[str] = []
    size = 0
    while size < n_chars:
        w = rng.choice(_WORDS)
        parts.append(w)
        size += len(w) + 1
    return " ".join(parts)[:n_chars]


def make_prompt(n_tokens: int, fmt: str, chars_per_token: float, rng: random.Random,
                id_range: tuple[int, int] = (3, 258)):
    if fmt == "ids":
        return [rng.randint(*id_range) for _ in range(n_tokens)]
    return make_text(max(1, round(n_tokens * chars_per_token)), rng)


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    if "--prompt-mix" in getattr(parser, "_option_string_actions", {}):
        return   # this module was loaded twice (imported by another locustfile)
    g = parser
    g.add_argument("--prompt-mix", env_var="HS_PROMPT_MIX", default=DEFAULT_MIX,
                   help="weighted prompt-length ranges in tokens, LO-HI:WEIGHT,... (default %(default)s)")
    g.add_argument("--prompt-format", env_var="HS_PROMPT_FORMAT", choices=["text", "ids"], default="text",
                   help="send the prompt as text or as a list of token ids")
    g.add_argument("--chars-per-token", env_var="HS_CHARS_PER_TOKEN", type=float, default=1.0,
                   help="text characters per token (1 for the byte-level tiny model, ~4 for LLaMA)")
    g.add_argument("--max-tokens", env_var="HS_MAX_TOKENS", type=int, default=32,
                   help="max_tokens of each request")
    g.add_argument("--temperature", env_var="HS_TEMPERATURE", type=float, default=0.0)
    g.add_argument("--model", env_var="HS_MODEL", default="",
                   help="model id (default: first id of GET /v1/models)")
    g.add_argument("--api-key", env_var="HS_API_KEY", default=os.environ.get("OPENAI_API_KEY", ""),
                   is_secret=True, help="sent as Authorization: Bearer KEY")


def _fire(env, name: str, start: float, elapsed_s: float, length: int = 0, exc: BaseException | None = None) -> None:
    env.events.request.fire(request_type="SSE", name=name, response_time=elapsed_s * 1000.0,
                            response_length=length, exception=exc, context={}, start_time=start,
                            url=None, response=None)


class StreamError(Exception):
    pass


def response_text(resp, limit: int = 200) -> str:
    """The start of a response body as text, for an error message; never raises."""
    try:
        text = resp.text
    except Exception as exc:   # noqa: BLE001 - e.g. a body cut off on a failed connection
        return f"<body unreadable: {exc!r}>"
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return (text or "")[:limit]


def check_sse_response(resp) -> None:
    """Raise StreamError unless ``resp`` (HttpUser or FastHttpUser, ``stream=True``) is a 200
    ``text/event-stream``. Both clients report a failed connection as status 0 with ``resp.error``;
    FastHttpUser also sets ``resp.error`` on a non-2xx/3xx status, and has no headers without a response."""
    status = resp.status_code or 0
    if status == 0:
        raise StreamError(f"connection failed: {getattr(resp, 'error', None)!r}")
    if status != 200:
        raise StreamError(f"HTTP {status}: {response_text(resp)}")
    headers = resp.headers or {}
    ctype = headers.get("content-type") or ""
    if not ctype.startswith("text/event-stream"):
        raise StreamError(f"content-type {ctype!r} is not text/event-stream")


def sse_lines(resp) -> Iterator[bytes]:
    """The body lines (bytes, without the line ending) of a streamed response, each yielded as soon as
    it has arrived.

    - FastHttpUser (geventhttpclient): ``readline(b"\\n")`` on the raw response returns a line as soon
      as it is in the receive buffer, and b"" at the end of the message. (``FastResponse.iter_content``
      reads 1024-byte blocks: a short SSE chunk would wait for the next ones, which is wrong for TTFT.)
      A body left unread (the caller stopped early) closes the connection instead of reusing it.
    - HttpUser (python-requests): ``iter_lines``, which for a chunked body yields each chunk's lines
      as the chunk arrives.
    """
    raw = getattr(resp, "_response", None)
    if raw is None or not hasattr(raw, "readline") or hasattr(resp, "iter_lines"):
        yield from resp.iter_lines(decode_unicode=False)
        return
    enc = ((resp.headers or {}).get("content-encoding") or "identity").lower()
    if enc != "identity":   # readline reads the raw body; the server does not compress SSE
        raise StreamError(f"content-encoding {enc!r}: cannot read SSE lines from a compressed body")
    try:
        while True:
            line = raw.readline(b"\n")
            if not line:                   # end of the message (or of the bytes after the last newline)
                break
            if line.endswith(b"\n"):
                line = line[:-1]
            yield line[:-1] if line.endswith(b"\r") else line
        rest = raw.read()                  # at message end: what followed the last newline, if anything
        if rest:
            yield rest[:-1] if rest.endswith(b"\r") else rest
    finally:
        raw.release()   # a message read to its end was released already; else close the connection


class ShortPromptUser(BaseHttpUser):
    """One chat-like client: think 0.1-1 s, then stream one completion (FastHttpUser unless
    HS_LOCUST_CLIENT=requests)."""

    wait_time = between(0.1, 1.0)
    network_timeout = NETWORK_TIMEOUT_S      # FastHttpUser only

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.mix = parse_mix(getattr(opts, "prompt_mix", DEFAULT_MIX) if opts else DEFAULT_MIX)
        self.fmt = getattr(opts, "prompt_format", "text") if opts else "text"
        self.chars_per_token = getattr(opts, "chars_per_token", 1.0) if opts else 1.0
        self.max_tokens = getattr(opts, "max_tokens", 32) if opts else 32
        self.temperature = getattr(opts, "temperature", 0.0) if opts else 0.0
        self.model = (getattr(opts, "model", "") if opts else "") or ""
        key = (getattr(opts, "api_key", "") if opts else "") or ""
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.rng = random.Random()
        if not self.model:
            self.model = self._discover_model()

    def _discover_model(self) -> str:
        with self.client.get("/v1/models", headers=self.headers, name="/v1/models",
                             catch_response=True) as resp:
            try:
                data = resp.json()["data"]
                return str(data[0]["id"])
            except Exception as exc:   # noqa: BLE001
                resp.failure(f"GET /v1/models: cannot read a model id ({exc!r}); pass --model")
                return "default"

    @task
    def stream_completion(self) -> None:
        n_tokens = draw_length(self.mix, self.rng)
        body = {
            "model": self.model,
            "prompt": make_prompt(n_tokens, self.fmt, self.chars_per_token, self.rng),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": True,
        }
        env = self.environment
        start_wall = time.time()
        t0 = time.perf_counter()
        first: float | None = None
        last: float | None = None
        chunks = 0
        nbytes = 0
        with self.client.post("/v1/completions", json=body, headers=self.headers, stream=True,
                              catch_response=True, name="/v1/completions") as resp:
            try:
                check_sse_response(resp)
                done = False
                for raw in sse_lines(resp):
                    nbytes += len(raw) + 1
                    line = raw.decode("utf-8", errors="replace").strip()
                    if not line or line.startswith(":"):
                        continue
                    if done:
                        raise StreamError(f"data after [DONE]: {line[:100]!r}")
                    if not line.startswith("data:"):
                        continue          # event:/id:/retry: fields
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        continue
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        raise StreamError(f"undecodable SSE chunk: {data[:100]!r}") from None
                    if "error" in obj:
                        raise StreamError(f"error chunk: {str(obj['error'])[:200]}")
                    if obj.get("choices"):
                        now = time.perf_counter()
                        if first is None:
                            first = now
                            _fire(env, "ttft", start_wall, first - t0, nbytes)
                        last = now
                        chunks += 1
                if not done:
                    raise StreamError(f"stream ended without [DONE] after {chunks} chunks")
                if first is None:
                    raise StreamError("stream had no completion chunk")
            except Exception as exc:    # noqa: BLE001 - any failure fails the request
                resp.failure(exc if isinstance(exc, StreamError) else StreamError(repr(exc)))
                _fire(env, "e2e", start_wall, time.perf_counter() - t0, nbytes,
                      exc if isinstance(exc, StreamError) else StreamError(repr(exc)))
                return
            resp.success()
            end = time.perf_counter()
            _fire(env, "e2e", start_wall, end - t0, nbytes)
            if chunks > 1 and last is not None:
                _fire(env, "tpot", start_wall, (last - first) / (chunks - 1), 0)
