"""OpenAI request bodies (pydantic, strict): every list and string a client sends has a bound, so no
request can make the app parse or tokenize without limit."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.api import MAX_LOGPROBS

MAX_CHOICES = 16           # n / best_of: each choice is one engine call, run in parallel
MAX_CALLS = 64             # engine calls one request may fan out to (batched prompts x choices)
MAX_PROMPT_IDS = 1 << 17   # token ids in one prompt (longer than any context)
MAX_MESSAGES = 1024
MAX_NAME = 256             # model, user, message name

TokenIds = Annotated[list[int], Field(min_length=0, max_length=MAX_PROMPT_IDS)]
Bounded = Annotated[str, Field(max_length=MAX_NAME)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class Common(_Strict):
    model: Bounded | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="extension: 0 = off")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices, generated in parallel (one engine call each)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    # the count and length caps are SamplingParams.validate's (one message for HTTP and Python)
    stop: str | Annotated[list[str], Field(max_length=64)] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    user: Bounded | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: Annotated[dict[str, float], Field(max_length=1024)] | None = Field(
        None, description="token id (as a string) -> bias in [-100, 100]")
    ignore_eos: bool = Field(False, description="extension: keep generating past EOS")
    request_timeout_s: float | None = Field(
        None, ge=0.1, le=3600, description="extension: give up (HTTP 504) if the answer is not complete by then")


class CompletionRequest(Common):
    prompt: str | TokenIds | Annotated[list[str], Field(max_length=MAX_CALLS)] \
        | Annotated[list[TokenIds], Field(max_length=MAX_CALLS)]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="logprob of each token and of the N likeliest alternatives")
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES,
                                description="generate this many, return the n with the highest total logprob")
    suffix: str | None = None

    @property
    def is_batch(self) -> bool:
        """A list of strings or of token-id lists (one token-id list is one prompt)."""
        return isinstance(self.prompt, list) and bool(self.prompt) and not isinstance(self.prompt[0], int)

    def prompts(self) -> list:
        """The prompts as the client sent them: one, or a batch."""
        return list(self.prompt) if self.is_batch else [self.prompt]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)]
    name: Bounded | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None


def logprobs_k(req: Common) -> int | None:
    """Alternatives per token the engine computes (None: no logprobs)."""
    if isinstance(req, ChatCompletionRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return getattr(req, "logprobs", None)


def choices_per_prompt(req: Common) -> int:
    return max(req.n, getattr(req, "best_of", None) or 1)
