"""gpt-fast-style baseline: a plain LLaMA in PyTorch, static KV cache with a batch dimension, the whole
decode step (forward + greedy pick) compiled with torch.compile(fullgraph=True), prefill compiled per bucket.

Follows github:meta-pytorch/gpt-fast (model.py / generate.py): fused wqkv, KV cache buffers
(B, H_kv, S, hd) written at ``input_pos``, SDPA under a boolean causal mask indexed by ``input_pos``
(attention reads the whole static cache), greedy sampling inside the compiled step. Two changes, both in
the baseline's favour or neutral: HF's rotate-half rope (so HF-named weights load unpermuted and greedy
tokens match HF's), and prefill projects only the last real row onto the vocabulary.

    python -m bench.baselines.gptfast --out /tmp/gptfast.json            # LLaMA-2-7B shapes, CUDA
    python -m bench.baselines.gptfast --preset tiny --device cpu --dtype float32 --compile-backend eager \
        --requests 2 --out /tmp/g.json                                   # CPU dry run
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.baselines.common import (DTYPES, baseline_parser, hf_dict, pad_to_bucket, random_weights,  # noqa: E402
                                    run_baseline)


class KVCache(nn.Module):
    def __init__(self, batch: int, max_seq: int, n_kv: int, hd: int, dtype: torch.dtype, device):
        super().__init__()
        shape = (batch, n_kv, max_seq, hd)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Rows [:B] of the cache for a step of B streams (one buffer serves every batch size)."""
        B = k.shape[0]
        self.k_cache[:B, :, input_pos] = k
        self.v_cache[:B, :, input_pos] = v
        return self.k_cache[:B], self.v_cache[:B]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Attention(nn.Module):
    def __init__(self, D: int, nh: int, nkv: int, hd: int):
        super().__init__()
        self.nh, self.nkv, self.hd = nh, nkv, hd
        self.wqkv = nn.Linear(D, (nh + 2 * nkv) * hd, bias=False)
        self.wo = nn.Linear(nh * hd, D, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        B, S, _ = x.shape
        q, k, v = self.wqkv(x).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q = q.view(B, S, self.nh, self.hd).transpose(1, 2)
        k = k.view(B, S, self.nkv, self.hd).transpose(1, 2)
        v = v.view(B, S, self.nkv, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = self.kv_cache.update(input_pos, k, v)
        k = k.repeat_interleave(self.nh // self.nkv, dim=1)
        v = v.repeat_interleave(self.nh // self.nkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, S, self.nh * self.hd))


class FeedForward(nn.Module):
    def __init__(self, D: int, I: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(D, I, bias=False), nn.Linear(D, I, bias=False)
        self.w2 = nn.Linear(I, D, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, D, I, nh, nkv, hd, eps):
        super().__init__()
        self.attention, self.feed_forward = Attention(D, nh, nkv, hd), FeedForward(D, I)
        self.attention_norm, self.ffn_norm = RMSNorm(D, eps), RMSNorm(D, eps)

    def forward(self, x, cos, sin, mask, input_pos):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """LLaMA with static KV caches of ``setup_caches(max_batch)`` rows; a step of B streams uses rows [:B].
    Parameters are made on the meta device and come from ``load_hf``; rope tables and mask on ``device``."""

    def __init__(self, hf: dict, max_seq: int, dtype: torch.dtype, device):
        super().__init__()
        with torch.device("meta"):
            self._build(hf)
        D, nh = hf["hidden_size"], hf["num_attention_heads"]
        hd = hf.get("head_dim") or D // nh
        self.max_seq, self.dtype, self.device = max_seq, dtype, device
        inv = 1.0 / (hf["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        freqs = torch.outer(torch.arange(max_seq).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos().to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("sin", emb.sin().to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("causal_mask", torch.tril(torch.ones(max_seq, max_seq, dtype=torch.bool, device=device)),
                             persistent=False)

    def _build(self, hf: dict) -> None:
        D, nh = hf["hidden_size"], hf["num_attention_heads"]
        nkv, hd = hf.get("num_key_value_heads") or nh, hf.get("head_dim") or D // nh
        self.nkv, self.hd = nkv, hd
        self.tok_embeddings = nn.Embedding(hf["vocab_size"], D)
        self.layers = nn.ModuleList(Block(D, hf["intermediate_size"], nh, nkv, hd, hf["rms_norm_eps"])
                                    for _ in range(hf["num_hidden_layers"]))
        self.norm = RMSNorm(D, hf["rms_norm_eps"])
        self.output = nn.Linear(D, hf["vocab_size"], bias=False)

    def load_hf(self, w: dict[str, Tensor]) -> None:
        """HF LLaMA names -> this model (q, k, v fused into wqkv as gpt-fast's load hook does)."""
        sd = {"tok_embeddings.weight": w["model.embed_tokens.weight"], "norm.weight": w["model.norm.weight"],
              "output.weight": w.get("lm_head.weight", w["model.embed_tokens.weight"])}
        for i in range(len(self.layers)):
            p, q = f"model.layers.{i}.", f"layers.{i}."
            sd[q + "attention.wqkv.weight"] = torch.cat([w[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
            sd[q + "attention.wo.weight"] = w[p + "self_attn.o_proj.weight"]
            sd[q + "feed_forward.w1.weight"] = w[p + "mlp.gate_proj.weight"]
            sd[q + "feed_forward.w3.weight"] = w[p + "mlp.up_proj.weight"]
            sd[q + "feed_forward.w2.weight"] = w[p + "mlp.down_proj.weight"]
            sd[q + "attention_norm.weight"] = w[p + "input_layernorm.weight"]
            sd[q + "ffn_norm.weight"] = w[p + "post_attention_layernorm.weight"]
        self.load_state_dict(sd, strict=True, assign=True)

    def setup_caches(self, max_batch: int) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch, self.max_seq, self.nkv, self.hd, self.dtype, self.device)

    def forward(self, idx: Tensor, input_pos: Tensor, last: Tensor | None = None) -> Tensor:
        mask = self.causal_mask[None, None, input_pos]
        cos, sin = self.cos[input_pos], self.sin[input_pos]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        if last is not None:                       # prefill: only the last real row reaches lm_head
            x = x.index_select(1, last)
        return self.output(self.norm(x))


def prefill(model: Transformer, idx: Tensor, input_pos: Tensor, last: Tensor) -> Tensor:
    return model(idx, input_pos, last)[:, -1].argmax(-1)


def decode_one_token(model: Transformer, cur: Tensor, input_pos: Tensor) -> Tensor:
    return model(cur, input_pos)[:, -1].argmax(-1)


class GptFast:
    def __init__(self, a):
        self.device, self.dtype = torch.device(a.device), DTYPES[a.dtype]
        hf = hf_dict(a.preset, a.layers)
        self.model = Transformer(hf, a.max_context, self.dtype, self.device)
        self.model.load_hf(random_weights(hf, self.device, self.dtype, a.seed))
        self.model.eval().requires_grad_(False)
        self.model.setup_caches(max(a.batches + [1]))
        self.buckets = sorted(b for b in a.buckets if b <= a.max_context)
        self.batches = sorted(set([1] + list(a.batches)))
        self.max_context, self.vocab = a.max_context, hf["vocab_size"]
        if a.compile_backend == "none":
            self.prefill, self.decode = prefill, decode_one_token
        else:
            from torch._dynamo import config as dynamo_config
            from torch._inductor import config as inductor_config
            dynamo_config.cache_size_limit = 64
            inductor_config.coordinate_descent_tuning = a.coordinate_descent_tuning
            inductor_config.fx_graph_cache = True
            # static shapes: one compile per prefill bucket and per decode batch size (symbolic shapes compiled
            # slower than all of them together: docs/benchmarks.md)
            kw = {"backend": a.compile_backend, "fullgraph": True, "dynamic": False}
            dm = {"mode": a.decode_mode} if a.compile_backend == "inductor" else {}
            pm = {"mode": a.prefill_mode} if a.compile_backend == "inductor" else {}
            self.decode = torch.compile(decode_one_token, **kw, **dm)
            self.prefill = torch.compile(prefill, **kw, **pm)
        self.cudagraphs = a.compile_backend == "inductor" and self.device.type == "cuda"

    def _step_begin(self):
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()

    @torch.no_grad()
    def _prefill(self, ids: list[int]) -> Tensor:
        idx = pad_to_bucket(ids, self.buckets, self.device)
        pos = torch.arange(idx.shape[1], device=self.device)
        last = torch.tensor([len(ids) - 1], device=self.device)
        self._step_begin()
        return self.prefill(self.model, idx, pos, last)

    @torch.no_grad()
    def generate(self, ids: list[int], n: int) -> tuple[list[int], float, list[float]]:
        """n greedy tokens at batch 1, each read on the host as it is made (as streaming needs)."""
        t0 = time.perf_counter()
        tok = int(self._prefill(ids).item())
        t1 = time.perf_counter()
        toks, times = [tok], [t1]
        cur = torch.tensor([[tok]], device=self.device)
        pos = torch.tensor([len(ids)], device=self.device)
        for _ in range(n - 1):
            self._step_begin()
            nxt = self.decode(self.model, cur, pos)
            tok = int(nxt.item())
            times.append(time.perf_counter())
            toks.append(tok)
            cur = nxt.view(1, 1).clone()
            pos += 1
        return toks, t1 - t0, [b - a for a, b in zip(times, times[1:])]

    @torch.no_grad()
    def warm(self) -> dict:
        """Compile (and capture) every shape the run uses: a prefill per bucket, a decode step per batch size."""
        per = {}
        for b in self.buckets:
            t0 = time.perf_counter()
            for _ in range(3):   # cudagraph trees record on the second call
                self._prefill([1] * b).item()
            per[f"prefill_{b}"] = round(time.perf_counter() - t0, 2)
            print(f"    warm prefill {b}: {per[f'prefill_{b}']} s", flush=True)
        for B in self.batches:
            t0 = time.perf_counter()
            cur = torch.ones((B, 1), dtype=torch.long, device=self.device)
            pos = torch.tensor([min(300, self.max_context - 1)], device=self.device)
            for _ in range(3):
                self._step_begin()
                self.decode(self.model, cur, pos).tolist()
            per[f"decode_b{B}"] = round(time.perf_counter() - t0, 2)
            print(f"    warm decode B={B}: {per[f'decode_b{B}']} s", flush=True)
        return per

    @torch.no_grad()
    def time_decode(self, batch: int, context: int, steps: int) -> list[tuple[float, float]]:
        """Seconds per decode step at ``batch`` streams, every one at position ``context``."""
        from bench.baselines.common import StepTimer
        cur = torch.randint(3, self.vocab, (batch, 1), device=self.device)
        pos = torch.tensor([context], device=self.device)
        out = []
        for _ in range(steps):
            with StepTimer(self.device) as t:
                self._step_begin()
                nxt = self.decode(self.model, cur, pos)
                nxt.tolist()
            out.append((t.gpu_s, t.wall_s))
        return out


def main(argv=None) -> None:
    p = baseline_parser(__doc__, compiled=True)
    p.add_argument("--coordinate-descent-tuning", action="store_true",
                   help="Inductor's coordinate-descent kernel tuning (gpt-fast turns it on; costs compile time)")
    a = p.parse_args(argv)
    run_baseline("gptfast", a, GptFast)


if __name__ == "__main__":
    main()
