"""HF transformers baseline at its best: LlamaForCausalLM with a StaticCache, the forward compiled for decode
and for each prefill bucket, driven by a short loop of our own (not generate(), whose per-token Python
work is what the older "torch.compile" row of bench/latency.py measured).

Written against transformers 5.x: StaticCache(config=, max_cache_len=) with one position per cache layer
(``cumulative_length``, shared by the batch rows), the forward's cache argument named ``cache`` (5.2x) or
``past_key_values`` (5.1x). A prompt is right-padded to its bucket; afterwards every layer's length is
set back to the prompt's, so the padding rows are overwritten by the decode steps and masked until then.

    python -m bench.baselines.hf_static --out /tmp/hf_static.json      # LLaMA-2-7B shapes, CUDA
"""
from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.baselines.common import (DTYPES, StepTimer, baseline_parser, hf_dict, pad_to_bucket, random_weights,  # noqa: E402
                                    run_baseline)


def build_hf_model(a):
    """LlamaForCausalLM of the preset's shapes holding the engine's random weights (same seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = hf_dict(a.preset, a.layers)
    cfg = LlamaConfig(**hf)
    cfg._attn_implementation = "sdpa"
    dev, dtype = torch.device(a.device), DTYPES[a.dtype]
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.load_state_dict(random_weights(hf, dev, dtype, a.seed), strict=False, assign=True)
    # non-persistent buffers (rope inverse frequencies) were made on meta: rebuild the rotary module
    rot = type(model.model.rotary_emb)
    with torch.device(dev):
        model.model.rotary_emb = rot(config=cfg)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"parameters left on meta after loading: {missing[:4]}")
    return model.eval().requires_grad_(False), cfg, hf


def cache_kwarg(model) -> str:
    """The forward's name for the cache: 'cache' from transformers 5.2x, 'past_key_values' before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


class HFStatic:
    def __init__(self, a):
        from transformers import StaticCache

        self.model, self.cfg, hf = build_hf_model(a)
        self.device, self.dtype = torch.device(a.device), DTYPES[a.dtype]
        self.kw = cache_kwarg(self.model)
        self.vocab = hf["vocab_size"]
        self.max_context = a.max_context
        self.buckets = sorted(b for b in a.buckets if b <= a.max_context)
        self.batches = sorted(set([1] + list(a.batches)))
        nh = hf["num_attention_heads"]
        self.nkv, self.hd = hf.get("num_key_value_heads") or nh, hf.get("head_dim") or hf["hidden_size"] // nh
        self._StaticCache = StaticCache
        self.caches: dict[int, object] = {}
        if a.compile_backend == "none":
            self.fwd_decode, self.fwd_prefill = self._decode_fwd, self._prefill_fwd
        else:
            from torch._dynamo import config as dynamo_config
            dynamo_config.cache_size_limit = 64
            # static shapes: one compile per prefill bucket and per decode batch size (docs/benchmarks.md)
            kw = {"backend": a.compile_backend, "fullgraph": True, "dynamic": False}
            dm = {"mode": a.decode_mode} if a.compile_backend == "inductor" else {}
            pm = {"mode": a.prefill_mode} if a.compile_backend == "inductor" else {}
            self.fwd_decode = torch.compile(self._decode_fwd, **kw, **dm)
            self.fwd_prefill = torch.compile(self._prefill_fwd, **kw, **pm)
        self.cudagraphs = a.compile_backend == "inductor" and self.device.type == "cuda"

    def _forward(self, ids: torch.Tensor, keep: torch.Tensor, cache) -> torch.Tensor:
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=keep, **{self.kw: cache})
        return out.logits[:, -1].argmax(-1)

    # two code objects, so the decode and prefill compiles keep separate caches
    def _prefill_fwd(self, ids, keep, cache):
        return self._forward(ids, keep, cache)

    def _decode_fwd(self, ids, keep, cache):
        return self._forward(ids, keep, cache)

    def cache(self, batch: int):
        if batch not in self.caches:
            c = self._StaticCache(config=self.cfg, max_cache_len=self.max_context)
            c.early_initialization(batch_size=batch, num_heads=self.nkv, head_dim=self.hd, dtype=self.dtype,
                                   device=self.device)
            self.caches[batch] = c
        return self.caches[batch]

    @staticmethod
    def set_length(cache, n: int) -> None:
        for layer in cache.layers:
            layer.cumulative_length.fill_(n)

    def _step_begin(self):
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()

    def _prefill(self, ids: list[int], cache) -> torch.Tensor:
        n = len(ids)
        x = pad_to_bucket(ids, self.buckets, self.device)
        keep = torch.tensor([n - 1], device=self.device)
        self.set_length(cache, 0)
        self._step_begin()
        tok = self.fwd_prefill(x, keep, cache)
        self.set_length(cache, n)
        return tok

    @torch.no_grad()
    def generate(self, ids: list[int], n: int) -> tuple[list[int], float, list[float]]:
        cache = self.cache(1)
        keep = torch.tensor([0], device=self.device)
        t0 = time.perf_counter()
        tok = int(self._prefill(ids, cache).item())
        t1 = time.perf_counter()
        toks, times = [tok], [t1]
        cur = torch.tensor([[tok]], device=self.device)
        for _ in range(n - 1):
            self._step_begin()
            nxt = self.fwd_decode(cur, keep, cache)
            tok = int(nxt.item())
            times.append(time.perf_counter())
            toks.append(tok)
            cur = nxt.view(1, 1).clone()
        return toks, t1 - t0, [b - a for a, b in zip(times, times[1:])]

    @torch.no_grad()
    def warm(self) -> dict:
        per = {}
        cache = self.cache(1)
        for b in self.buckets:
            t0 = time.perf_counter()
            for _ in range(3):   # cudagraph trees record on the second call
                self._prefill([1] * b, cache).item()
            per[f"prefill_{b}"] = round(time.perf_counter() - t0, 2)
            print(f"    warm prefill {b}: {per[f'prefill_{b}']} s", flush=True)
        keep = torch.tensor([0], device=self.device)
        for B in self.batches:
            cache = self.cache(B)
            cur = torch.ones((B, 1), dtype=torch.long, device=self.device)
            t0 = time.perf_counter()
            for _ in range(3):
                self.set_length(cache, min(300, self.max_context - 1))
                self._step_begin()
                self.fwd_decode(cur, keep, cache).tolist()
            per[f"decode_b{B}"] = round(time.perf_counter() - t0, 2)
            print(f"    warm decode B={B}: {per[f'decode_b{B}']} s", flush=True)
        return per

    @torch.no_grad()
    def time_decode(self, batch: int, context: int, steps: int) -> list[tuple[float, float]]:
        cache = self.cache(batch)
        cur = torch.randint(3, self.vocab, (batch, 1), device=self.device)
        keep = torch.tensor([0], device=self.device)
        out = []
        for _ in range(steps):
            self.set_length(cache, context)
            with StepTimer(self.device) as t:
                self._step_begin()
                self.fwd_decode(cur, keep, cache).tolist()
            out.append((t.gpu_s, t.wall_s))
        return out


def main(argv=None) -> None:
    p = baseline_parser(__doc__, compiled=True)
    a = p.parse_args(argv)
    run_baseline("hf_static", a, HFStatic)


if __name__ == "__main__":
    main()
