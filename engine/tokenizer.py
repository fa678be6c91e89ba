"""Tokenizers: HF checkpoints use the one they ship (tokenizer.json or a SentencePiece tokenizer.model, via
transformers); presets use a byte-level one."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")   # SentencePiece byte fallback


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character byte-level BPE pieces spell it with."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Tokenizer:
    """The interface the engine uses (and what HF tokenizers are wrapped into)."""

    bos_token_id: int | None
    eos_token_ids: frozenset[int]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def token_bytes(self, t: int) -> bytes:
        """The UTF-8 bytes token t stands for on its own (a leading space included; part of a
        multi-byte character for a byte token): what OpenAI's logprobs report per token."""
        raise NotImplementedError

    @property
    def eos_token_id(self) -> int | None:
        return min(self.eos_token_ids) if self.eos_token_ids else None

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat, ending where the assistant's reply begins. Plain fallback format."""
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
        return self.encode(text, add_special_tokens=True)


class IncrementalText:
    """The text of a growing list of output tokens, decoding a short window per new token instead of
    the whole list (O(1) per token, not O(n): a 2,000-token reply would otherwise re-decode ~2M tokens).
    The window runs from the token before the last emitted piece (vLLM's prefix/read offsets): decoding
    with that context keeps the spaces a tokenizer strips at a sequence start. A token that ends inside
    a multi-byte character adds nothing until the character is complete. `ids` is the caller's list,
    read, never copied: call update() after each append."""

    def __init__(self, tokenizer: "Tokenizer", ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = ids
        self.text = ""
        self._prefix = self._read = 0

    def update(self) -> str:
        """The whole text of self.ids so far (call once per appended token)."""
        dec = self.tokenizer.decode
        before = dec(self.ids[self._prefix:self._read]) if self._read > self._prefix else ""
        after = dec(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self.text


class ByteTokenizer(Tokenizer):
    """Byte-level tokenizer of the presets: 0 unk, 1 bos, 2 eos, 3..258 the bytes. Ids past the
    bytes (a random model emits them) decode to printable ASCII so outputs stay readable."""

    OFFSET = 3

    def __init__(self, vocab_size: int):
        if vocab_size < 259:
            raise ValueError("a byte tokenizer needs vocab_size >= 259")
        self.vocab_size = vocab_size
        self.bos_token_id = 1
        self.eos_token_ids = frozenset({2})

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b + self.OFFSET for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int]) -> str:
        out = bytearray()
        for i in ids:
            if i < self.OFFSET:
                continue
            out.append(i - self.OFFSET if i < 256 + self.OFFSET else 32 + i % 95)
        return out.decode("utf-8", errors="replace")

    def token_bytes(self, t: int) -> bytes:
        return self.decode([t]).encode() if t < self.OFFSET or t >= 256 + self.OFFSET else bytes([t - self.OFFSET])


def _tokenizer_config(path: Path) -> dict:
    f = path / "tokenizer_config.json"
    if not f.exists():
        return {}
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON: {e}") from None
    return d if isinstance(d, dict) else {}


def load_hf_tokenizer(path: Path):
    """The checkpoint's tokenizer as it ships: tokenizer.json (or whatever tokenizer_config.json names) through
    AutoTokenizer; a SentencePiece tokenizer.model alone (LLaMA-2 era) through transformers' LlamaTokenizer,
    which converts it, with LLaMA's BOS unless tokenizer_config.json says otherwise (AutoTokenizer would
    build a generic converter without BOS that collapses repeated spaces). Chat templates come along from
    tokenizer_config.json or chat_template.jinja."""
    from transformers import AutoTokenizer

    tc = _tokenizer_config(path)
    has = {n: (path / n).exists() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")}
    if not any(has.values()):
        raise ValueError(f"{str(path)!r} has no tokenizer: add tokenizer.json (or a SentencePiece tokenizer.model)")
    if has["tokenizer.model"] and not has["tokenizer.json"] and not tc.get("tokenizer_class"):
        if importlib.util.find_spec("sentencepiece") is None:
            raise ValueError(f"{str(path)!r} ships only a SentencePiece tokenizer.model: pip install sentencepiece")
        from transformers import LlamaTokenizer

        return LlamaTokenizer.from_pretrained(str(path), **({} if "add_bos_token" in tc else {"add_bos_token": True}))
    return AutoTokenizer.from_pretrained(str(path))


class HFTokenizer(Tokenizer):
    def __init__(self, path: Path, eos_ids: tuple[int, ...]):
        self.tok = load_hf_tokenizer(Path(path))
        self.bos_token_id = self.tok.bos_token_id
        ids = set(eos_ids)
        if self.tok.eos_token_id is not None:
            ids.add(self.tok.eos_token_id)
        self.eos_token_ids = frozenset(ids)
        self._special = set(self.tok.all_special_ids)
        backend = getattr(self.tok, "backend_tokenizer", None)
        decoder = backend.decoder if backend is not None else None
        # byte-level BPE (LLaMA-3, GPT-2): pieces spell bytes in GPT-2's printable alphabet; else
        # SentencePiece-style (LLaMA-2): '▁' is a space and <0xNN> pieces are single bytes
        byte_level = decoder is not None and b'"ByteLevel"' in decoder.__getstate__()
        self._byte_decoder = {c: b for b, c in _gpt2_bytes_to_unicode().items()} if byte_level else None

    def token_bytes(self, t: int) -> bytes:
        piece = self.tok.convert_ids_to_tokens(t)
        if piece is None:
            return b""
        if t in self._special:
            return piece.encode()
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        if self._byte_decoder is not None and all(c in self._byte_decoder for c in piece):
            return bytes(self._byte_decoder[c] for c in piece)
        return piece.replace("\u2581", " ").encode()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(out, dict) or hasattr(out, "input_ids"):
                out = out["input_ids"]
            return list(out)
        return super().chat_prompt(messages)


def load_tokenizer(model: str, eos_ids: tuple[int, ...] = ()) -> Tokenizer:
    """The one tokenizer choice: a preset's byte tokenizer, or a checkpoint dir's HF tokenizer.
    Loads no weights (the HTTP app tokenizes with it; the engine loads the same one)."""
    from .errors import ModelLoadError
    from .presets import PRESETS

    if model in PRESETS:
        return ByteTokenizer(PRESETS[model]["vocab_size"])
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"unknown model {model!r}: not a preset ({', '.join(PRESETS)}) "
                             "and no such checkpoint directory")
    tok = HFTokenizer(path, tuple(eos_ids))
    try:   # token ids are checked against the model's vocabulary, which may be larger than the tokenizer's
        import json
        tok.vocab_size = int(json.loads((path / "config.json").read_text())["vocab_size"])
    except (OSError, KeyError, ValueError, TypeError):
        tok.vocab_size = len(tok.tok)
    return tok
