"""Shared fixtures: tiny real HF checkpoints (save_pretrained + a tokenizer trained with
`tokenizers`), loaded by the engine through the real checkpoint path."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "the quick brown fox jumps over the lazy dog", "hybrid engines replay graphs and compile kernels",
    "ray serve routes requests to replicas", "latency matters for chat", "hello world, hello tokens",
] * 20

VARIANTS = {
    # name: LlamaConfig overrides
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "llama3-rope": dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=64)),
    "tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def make_tokenizer(out: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out)
    return fast


# the tiny checkpoints' shape; max_position_embeddings covers EngineConfig's default max_context (2048),
# which the engine refuses to exceed
BASE = dict(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            max_position_embeddings=2048, rms_norm_eps=1e-5, initializer_range=0.2,
            bos_token_id=1, eos_token_id=2)


def make_checkpoint(out: Path, variant: str, seed: int = 0, **sizes) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**BASE, **VARIANTS[variant], **sizes})
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # RMSNorm weights away from 1 (HF initialises them to 1; trained models are not)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    make_tokenizer(out, cfg.vocab_size)
    return out


FAMILIES = {
    # name: (transformers config class, overrides): the non-LLaMA families the engine loads
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0,
                                  rms_norm_eps=1e-6)),
    "qwen2-tied": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
    # head_dim 32, not hidden / heads = 16: the explicit head_dim Qwen3 configs carry
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1000000.0,
                                  rms_norm_eps=1e-6)),
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=256)),
}


def make_family_checkpoint(out: Path, family: str, seed: int = 0, dtype: str = "float32", **sizes) -> Path:
    """A tiny random Qwen2 / Qwen3 / Mistral checkpoint via save_pretrained, with the BPE tokenizer. Norm
    weights (QK norms included) and Qwen2's q/k/v biases away from HF's init (1 and 0)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cls_name, over = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**BASE, **over, **sizes})
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("_proj.bias"):
                p.copy_(0.5 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    make_tokenizer(out, cfg.vocab_size)
    return out


def make_sentencepiece_model(vocab_size: int = 320) -> bytes:
    """A LLaMA-style SentencePiece model (BPE, byte fallback, ids 0 unk / 1 <s> / 2 </s>, no normalization)
    trained on CORPUS: the bytes of a tokenizer.model."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
    return buf.getvalue()


def make_sentencepiece_checkpoint(out: Path, seed: int = 0) -> Path:
    """A LLaMA-2-era checkpoint: the "gqa" model with only a SentencePiece tokenizer.model beside it (no
    tokenizer.json, no tokenizer_config.json)."""
    make_checkpoint(out, "gqa", seed=seed)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (out / f).unlink(missing_ok=True)
    (out / "tokenizer.model").write_bytes(make_sentencepiece_model())
    return out


# On two workers (addopts) a module runs whole on one worker, its Ray cluster with it, in this order: the long
# modules first, so neither worker ends running one alone; test_autoscale_ray (timing-sensitive) beside modules
# of one core or less (the Triton interpreter, the fleet dry run); no module that starts Ray in-process before
# test_app on its worker. Unlisted modules follow in collection order; one process keeps the collection order.
MODULE_ORDER = [
    "test_autoscale_ray", "test_kernels_interpret", "test_reliability", "test_fleet_dryrun", "test_app",
    "test_bench_batched_cpu", "test_locust", "test_store", "test_local_first", "test_prometheus",
    "test_store_attacks", "test_autoscale_policy", "test_colocated",
]


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """The GPU tests (`pytest -m gpu`, on the device) run in one process: two workers would share the GPU
    and its timings."""
    if getattr(config.option, "numprocesses", None) and re.search(r"(?<!not )\bgpu\b", config.option.markexpr or ""):
        config.option.numprocesses = 0


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):     # an xdist worker's collection: the controller hands out modules
        rank = {name: i for i, name in enumerate(MODULE_ORDER)}
        items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))   # stable: each module's own order


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {v: make_checkpoint(root / v, v, seed=i) for i, v in enumerate(VARIANTS)}


@pytest.fixture(autouse=True, scope="module")
def _ray_isolation():
    """Each test module that starts Ray gets its own session: shut it down after the module."""
    yield
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            try:
                from ray import serve

                serve.shutdown()
            except Exception:
                pass
            ray.shutdown()
