"""Public request/response types of the engine."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import InvalidSamplingParams

MAX_LOGPROBS = 20                     # alternatives per token (OpenAI chat allows 0..20; vLLM's default cap)
LOGPROB_FLOOR = -9999.0               # what a -inf logprob is reported as (JSON has no -inf; OpenAI's value)
MAX_STOP = 4                          # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 256                  # characters per stop string
MAX_STOP_TOKEN_IDS = 64               # stop token ids per request


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None       # None: off; k: each token's logprob and the k likeliest alternatives
    prompt_logprobs: int | None = None   # the same for each prompt token after the first (prompt scoring)
    presence_penalty: float = 0.0     # OpenAI's: minus this from each token already in the output
    frequency_penalty: float = 0.0    # OpenAI's: minus this times the token's count in the output
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> added to its logit

    @property
    def shapes_logits(self) -> bool:
        """Whether the logits are changed before a token is picked (then greedy picks outside the graph)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise InvalidSamplingParams(msg)

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        for name in ("temperature", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(f"{name} must be a finite number, got {v!r}")
        if self.temperature < 0:
            bad(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop must be a list of non-empty strings")
        if len(self.stop) > MAX_STOP:
            bad(f"stop has {len(self.stop)} strings; at most {MAX_STOP} are allowed")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            bad(f"each stop string must be at most {MAX_STOP_CHARS} characters")
        if not isinstance(self.stop_token_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            bad("stop_token_ids must be a list of integers")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            bad(f"stop_token_ids has {len(self.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2 <= v <= 2:
                bad(f"{name} must be a number in [-2, 2], got {v!r}")
        if not isinstance(self.logit_bias, dict) or not all(
                isinstance(k, int) and not isinstance(k, bool) and k >= 0 and not isinstance(v, bool)
                and isinstance(v, (int, float)) and -100 <= v <= 100 for k, v in self.logit_bias.items()):
            bad("logit_bias must map token ids (integers >= 0) to biases in [-100, 100]")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_LOGPROBS):
                bad(f"{name} must be an integer in [0, {MAX_LOGPROBS}] (alternatives per token), got {v!r}")


@dataclass
class Logprob:
    token_id: int
    token: str                        # its text; "bytes:\\xe6\\x97" when it is part of a multi-byte character
    logprob: float | None             # log-softmax of the model's raw logits (before temperature/top-k/top-p);
                                      # None for the first prompt token (nothing before it scores it)
    bytes: list[int]                  # the token's UTF-8 bytes: join a token run's bytes to rebuild its text


@dataclass
class TokenLogprobs:
    chosen: Logprob                   # the token the engine emitted
    top: list[Logprob]                # the k likeliest tokens at that step, likeliest first


@dataclass
class RequestMetrics:
    prompt_tokens: int
    bucket: int                       # prefill bucket of the prompt
    path: str                         # "graph" (CUDA-graph replay of its bucket), "padded" (replay of a
                                      # larger warm bucket's graph), "jit" (dynamic kernels), "eager" (CPU)
    ttft_s: float = 0.0               # request start -> first token on host
    token_times_s: list[float] = field(default_factory=list)  # gap before each token after the first
    e2e_s: float = 0.0
    queue_s: float = 0.0              # time waiting for the engine (batch 1: one request at a time)
    graph_bucket: int | None = None   # bucket whose graph ran the prefill (differs from bucket if "padded")
    mixed: bool = False               # its prompt rode in a decode step (a mixed step), not a prefill of its own
    rode_s: float = 0.0               # mixed: that decode step's time without the prompt (the batch's anyway)

    @property
    def tpot_s(self) -> float:
        return sum(self.token_times_s) / len(self.token_times_s) if self.token_times_s else 0.0


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str                # "stop" | "length" | "cancelled"
    metrics: RequestMetrics
    logprobs: list[TokenLogprobs] | None = None   # one per token_ids entry when params.logprobs is set
    prompt_logprobs: list[TokenLogprobs] | None = None   # one per prompt token when params.prompt_logprobs is set

    @property
    def prompt_tokens(self) -> int:
        return self.metrics.prompt_tokens


@dataclass
class StreamChunk:
    token_id: int | None              # None on a final chunk that carries no token
    text: str                         # new text since the previous chunk
    index: int                        # position of this token in the output
    finish_reason: str | None = None  # set on the last chunk
    metrics: RequestMetrics | None = None  # set on the last chunk
    logprobs: TokenLogprobs | None = None  # this chunk's token, when params.logprobs is set
