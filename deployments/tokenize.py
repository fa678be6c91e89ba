"""The engine's tokenizer without the model: what the ingress needs to count tokens for routing.

Mirrors ``HybridEngine._load``'s tokenizer choice (presets: the byte tokenizer; checkpoint
dirs: the HF tokenizer) and ``HybridEngine.prompt_ids``/``count_tokens`` (BOS included), but
loads no weights.
"""
from __future__ import annotations

from pathlib import Path

from engine.config import EngineConfig
from engine.errors import ModelLoadError
from engine.presets import PRESETS
from engine.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer


def load_tokenizer(cfg: EngineConfig) -> Tokenizer:
    if cfg.model in PRESETS:
        return ByteTokenizer(PRESETS[cfg.model]["vocab_size"])
    path = Path(cfg.model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"unknown model {cfg.model!r}: not a preset ({', '.join(PRESETS)}) "
                             "and no such checkpoint directory")
    return HFTokenizer(path, ())


def prompt_ids(tok: Tokenizer, prompt: str | list[int]) -> list[int]:
    """The prompt's token ids as the engine would make them (``HybridEngine.prompt_ids``: BOS included).
    The ingress sends these, not the text, so a prompt is tokenized once per request."""
    if isinstance(prompt, str):
        return tok.encode(prompt, add_special_tokens=True)
    return list(prompt)


def count_tokens(tok: Tokenizer, prompt: str | list[int]) -> int:
    """Token count as the engine will see it (``HybridEngine.count_tokens``)."""
    return len(prompt_ids(tok, prompt))
