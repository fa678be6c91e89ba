"""The engine's one request contract (engine/request.py) and SamplingParams' bounds, without a model."""
from __future__ import annotations

import dataclasses

import pytest

from engine.api import MAX_STOP, MAX_STOP_CHARS, SamplingParams
from engine.errors import EmptyPromptError, EngineInputError, InvalidSamplingParams, PromptTooLongError
from engine.request import Request, bucket_for, build, validate

V, CTX, BUCKETS = 300, 64, [16, 32, 64]


def test_validate_returns_the_ids_and_checks_each_rule_with_one_message():
    assert validate((1, 5, 7), SamplingParams(max_tokens=4), V, CTX) == [1, 5, 7]
    with pytest.raises(EmptyPromptError):
        validate([], SamplingParams(), V, CTX)
    with pytest.raises(EngineInputError, match=r"token id 300 is not an integer in \[0, 300\)"):
        validate([1, 300], SamplingParams(), V, CTX)
    with pytest.raises(EngineInputError, match="token id True"):
        validate([1, True], SamplingParams(), V, CTX)
    with pytest.raises(EngineInputError, match="logit_bias token id 999"):
        validate([1], SamplingParams(logit_bias={999: 1.0}), V, CTX)
    with pytest.raises(PromptTooLongError, match="shorten the prompt"):
        validate([1] * CTX, SamplingParams(max_tokens=1), V, CTX)
    with pytest.raises(PromptTooLongError, match="lower max_tokens to at most 54"):
        validate([1] * 10, SamplingParams(max_tokens=60), V, CTX)
    with pytest.raises(InvalidSamplingParams, match="max_tokens"):
        validate([1], SamplingParams(max_tokens=0), V, CTX)


def test_stop_strings_are_capped_in_count_and_length():
    SamplingParams(stop=["a"] * MAX_STOP).validate()
    with pytest.raises(InvalidSamplingParams, match=f"at most {MAX_STOP}"):
        SamplingParams(stop=["a"] * (MAX_STOP + 1)).validate()
    with pytest.raises(InvalidSamplingParams, match=f"at most {MAX_STOP_CHARS} characters"):
        SamplingParams(stop=["x" * (MAX_STOP_CHARS + 1)]).validate()
    with pytest.raises(InvalidSamplingParams, match="stop_token_ids"):
        SamplingParams(stop_token_ids=list(range(1000))).validate()


def test_bucket_for_is_the_smallest_that_holds_and_raises_past_the_largest():
    assert [bucket_for(n, BUCKETS) for n in (1, 16, 17, 64)] == [16, 16, 32, 64]
    with pytest.raises(PromptTooLongError, match="largest bucket 64"):
        bucket_for(65, BUCKETS)


def test_build_freezes_a_validated_request():
    req = build([1, 2, 3], SamplingParams(max_tokens=2), vocab_size=V, max_context=CTX, buckets=BUCKETS)
    assert req == Request(ids=(1, 2, 3), params=SamplingParams(max_tokens=2), bucket=16) and req.n_tokens == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.bucket = 32
