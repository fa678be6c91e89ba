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

Run headless (see docs/observability.md)::

    locust -f locustfiles/short_prompts.py --headless -u 8 -r 2 -t 60s \
        --host http://127.0.0.1:8000 --csv results/short

Imports only locust and the standard library (no project code).
"""
from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, events, task

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


class ShortPromptUser(HttpUser):
    """One chat-like client: think 0.1-1 s, then stream one completion."""

    wait_time = between(0.1, 1.0)

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
                if resp.status_code == 0:
                    raise StreamError(f"connection failed: {resp.error!r}")
                if resp.status_code != 200:
                    raise StreamError(f"HTTP {resp.status_code}: {resp.text[:200]}")
                ctype = resp.headers.get("content-type", "")
                if not ctype.startswith("text/event-stream"):
                    raise StreamError(f"content-type {ctype!r} is not text/event-stream")
                done = False
                for raw in resp.iter_lines(decode_unicode=False):
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
