"""The engine's one request contract: validate a prompt and its params once, pick its bucket once.

The HTTP app builds a :class:`Request` with :func:`build`; the replica and the engine trust it
(they do not validate again). Pure: no torch, no Ray.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

from .api import SamplingParams
from .errors import EmptyPromptError, EngineInputError, PromptTooLongError

CONTEXT_LENGTH_CODE = "context_length_exceeded"   # OpenAI's error code for a prompt over the context


def check_ids(ids: object, vocab_size: int) -> list[int]:
    """``ids`` as a list of token ids, each an int in [0, vocab_size); EngineInputError otherwise."""
    if not isinstance(ids, (list, tuple)) or not ids:
        raise EmptyPromptError("prompt is empty: send at least one character or token id")
    # one C-speed pass each; type(t) is int also rejects bools
    if set(map(type, ids)) != {int} or min(ids) < 0 or max(ids) >= vocab_size:
        t = next(t for t in ids if type(t) is not int or not 0 <= t < vocab_size)
        raise EngineInputError(f"prompt token id {t!r} is not an integer in [0, {vocab_size})")
    return list(ids)


def check_context(n: int, max_tokens: int, max_context: int) -> None:
    """The one context check (prompt + max_tokens must fit the KV cache) and its message."""
    if n >= max_context:
        raise PromptTooLongError(f"prompt has {n} tokens but the context holds {max_context} "
                                 "(prompt + max_tokens); shorten the prompt")
    if n + max_tokens > max_context:
        raise PromptTooLongError(
            f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the context of "
            f"{max_context} tokens; lower max_tokens to at most {max_context - n}")


def validate(ids: object, params: SamplingParams, vocab_size: int, max_context: int) -> list[int]:
    """Every check a request gets, in one place: token ids, sampling params, logit_bias ids, context."""
    if not isinstance(params, SamplingParams):
        raise EngineInputError("params must be a SamplingParams")
    params.validate()
    out = check_ids(ids, vocab_size)
    bad = [t for t in params.logit_bias if t >= vocab_size]
    if bad:
        raise EngineInputError(f"logit_bias token id {bad[0]} is out of range [0, {vocab_size})")
    check_context(len(out), params.max_tokens, max_context)
    return out


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest prefill bucket holding ``n`` tokens (``buckets`` sorted ascending)."""
    if not buckets:
        raise ValueError("no buckets")
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise PromptTooLongError(f"prompt of {n} tokens exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


@dataclass(frozen=True)
class Request:
    """A validated request: what the replica and the engine run without checking again."""

    ids: tuple[int, ...]
    params: SamplingParams
    bucket: int

    @property
    def n_tokens(self) -> int:
        return len(self.ids)


def build(ids: object, params: SamplingParams, *, vocab_size: int, max_context: int,
          buckets: Sequence[int]) -> Request:
    """Validate once and freeze: :func:`validate` then :func:`bucket_for`."""
    out = validate(ids, params, vocab_size, max_context)
    return Request(ids=tuple(out), params=params, bucket=bucket_for(len(out), buckets))
