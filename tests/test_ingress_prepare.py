"""The ingress tokenizes a prompt once and sends the replica its token ids: they must be exactly the ids
the engine would make from the same prompt (BOS included), for a checkpoint's HF tokenizer and for the
presets' byte tokenizer, for text, token-id and chat prompts; echo still returns the prompt as sent.
No Ray: OpenAIIngress over an in-process handle, the engine loaded through the real checkpoint path."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from deployments.colocated import LocalHandle
from deployments.config import AppConfig
from deployments.http.schemas import ChatCompletionRequest, CompletionRequest
from deployments.http.service import OpenAIIngress
from engine import EngineConfig, HybridEngine

TEXTS = ["Hello there, how are you?", "  two  spaces\nand a newline", "unicode: café ✓"]


def _ingress(model: str) -> OpenAIIngress:
    cfg = AppConfig.model_validate({"engine": {"model": model, "device": "cpu"}})
    return OpenAIIngress(LocalHandle(SimpleNamespace(generate=None, stream=None)), cfg)


@pytest.mark.parametrize("which", ["checkpoint", "preset"])
def test_ingress_sends_the_engines_own_token_ids(which, checkpoints):
    model = str(checkpoints["gqa"]) if which == "checkpoint" else "tiny"
    ing = _ingress(model)
    eng = HybridEngine(EngineConfig(model=model, device="cpu"))
    for prompt in [*TEXTS, [1, 5, 7]]:
        [req] = ing.prepare(CompletionRequest(prompt=prompt, max_tokens=4))
        assert list(req.ids) == eng.prompt_ids(prompt), prompt
        assert all(type(t) is int for t in req.ids)
        assert req.bucket == eng.bucket_for(req.n_tokens)           # the engine's own bucket
    batch = ing.prepare(CompletionRequest(prompt=TEXTS[:2], max_tokens=4))
    assert [list(r.ids) for r in batch] == [eng.prompt_ids(t) for t in TEXTS[:2]]
    messages = [{"role": "user", "content": "Hi!"}]
    [req] = ing.prepare(ChatCompletionRequest(messages=messages, max_tokens=4))
    assert list(req.ids) == eng.chat_prompt(messages)
    assert ing.vocab_size == eng.args.vocab_size


def test_echo_returns_the_prompt_as_sent(checkpoints):
    ing = _ingress(str(checkpoints["gqa"]))
    req = CompletionRequest(prompt=TEXTS[1], max_tokens=2, echo=True)
    [one] = ing.prepare(req)
    assert all(type(t) is int for t in one.ids)           # ids go to the replica...
    text, _ = ing.text_and_logprobs(req, req.prompts()[0], {"text": "!"})
    assert text == TEXTS[1] + "!"                         # ...and the client gets its own text back
