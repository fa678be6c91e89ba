"""LLaMA-family decoder over KV slots: LLaMA-2/3 (MHA, GQA, rope scaling, tied or untied embeddings), Mistral,
Qwen2/2.5 (QKV bias) and Qwen3 (per-head QK RMSNorm): one model, the differences are ModelArgs options.

Written for CUDA-graph capture: every buffer it writes is static (the KV slots, the engine's
input/output buffers), lengths, positions and slots live in device tensors, and nothing syncs with
the host. The same code runs eagerly on CPU (torch reference ops) and on CUDA (Triton ops).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import ops
from .errors import ModelLoadError
from .kv import KVSlots
from .plan import KernelPlan


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position: int
    tie_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    model_type: str = "llama"
    qkv_bias: bool = False              # Qwen2: bias on the q, k, v projections
    qk_norm: bool = False               # Qwen3: RMSNorm over each q and k head before rope
    sliding_window: int | None = None   # Mistral (and Qwen with use_sliding_window): attention span

    @classmethod
    def from_hf(cls, d: dict) -> "ModelArgs":
        mt = d.get("model_type", "llama")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(f"unsupported model_type {mt!r}: supported model types are "
                                 f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        if d.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"unsupported hidden_act {d['hidden_act']!r}: only 'silu' (SwiGLU MLP) loads")
        if d.get("mlp_bias"):
            raise ModelLoadError("unsupported mlp_bias: true (bias on the MLP projections)")
        if d.get("attention_bias") and mt != "qwen2":
            raise ModelLoadError(f"unsupported attention_bias: true for model_type {mt!r} (bias on the output "
                                 "projection); only qwen2's q/k/v bias loads")
        try:
            n_heads = d["num_attention_heads"]
            rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
            theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            eos = d.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            if mt == "mistral":       # HF's MistralConfig default when the key is absent
                window = d.get("sliding_window", 4096)
            elif mt in ("qwen2", "qwen3"):   # as HF: only with use_sliding_window, on the layers that slide
                n_layers = d["num_hidden_layers"]
                types = d.get("layer_types") or ["sliding_attention" if i >= d.get("max_window_layers", 28)
                                                 else "full_attention" for i in range(n_layers)]
                slides = d.get("use_sliding_window") and "sliding_attention" in types
                window = d.get("sliding_window") if slides else None
            else:
                window = None
            return cls(
                vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"], n_layers=d["num_hidden_layers"],
                n_heads=n_heads, n_kv_heads=d.get("num_key_value_heads") or n_heads,
                head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
                rms_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
                max_position=d.get("max_position_embeddings", 4096),
                tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                bos_token_id=d.get("bos_token_id"), eos_token_ids=eos_ids,
                model_type=mt, qkv_bias=mt == "qwen2", qk_norm=mt == "qwen3", sliding_window=window,
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks required field {e.args[0]!r}") from None

    def hash_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def check_context(a: ModelArgs, max_context: int) -> None:
    """Refuse a KV cache longer than the model's positions, or than its sliding window (attention over the
    whole cache equals sliding-window attention only while every position fits in the window)."""
    if max_context > a.max_position:
        raise ModelLoadError(f"max_context {max_context} exceeds the model's max_position_embeddings "
                             f"{a.max_position}; set max_context to at most {a.max_position}")
    if a.sliding_window is not None and max_context > a.sliding_window:
        raise ModelLoadError(f"max_context {max_context} exceeds the model's sliding_window {a.sliding_window} "
                             f"(sliding-window attention is not implemented); set max_context to at most "
                             f"{a.sliding_window}")


def rope_inv_freq(a: ModelArgs) -> torch.Tensor:
    """Inverse frequencies, with HF's 'linear' and 'llama3' scaling."""
    inv = 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.int64).float() / a.head_dim))
    sc = a.rope_scaling
    if not sc:
        return inv
    kind = sc["rope_type"]
    if kind == "linear":
        return inv / sc["factor"]
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        scaled = torch.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wl < hi_wl) & ~(wl > lo_wl)
        return torch.where(medium, smoothed, scaled)
    raise ModelLoadError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")


class Llama:
    """Weights (fused QKV and gate/up, RMSNorm weights folded into the projections after them), rope tables
    and the static forward functions over the KV slots."""

    def __init__(self, args: ModelArgs, weights: dict[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype, kv: KVSlots, plan: KernelPlan):
        self.args, self.device, self.dtype, self.kv, self.plan = args, device, dtype, kv, plan
        a = args
        check_context(a, kv.max_context)

        def w(name: str) -> torch.Tensor:
            if name not in weights:
                raise ModelLoadError(f"checkpoint lacks tensor {name!r}")
            return weights[name].to(device=device, dtype=dtype)

        self.embed = w("model.embed_tokens.weight")
        self.norm = w("model.norm.weight")
        self.lm_head = self.embed if a.tie_embeddings or "lm_head.weight" not in weights else w("lm_head.weight")
        self.layers = []
        # rms_norm(x) * ln @ W.T == rms_norm(x) @ (W * ln).T: each layer's two norm weights scale the projection
        # they feed, so no kernel loads them; the final norm stays (the LM head may be the tied embedding)
        for i in range(a.n_layers):
            p = f"model.layers.{i}."
            self.layers.append(dict(
                wqkv=torch.cat([w(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
                .mul_(w(p + "input_layernorm.weight")[None, :]),
                wo=w(p + "self_attn.o_proj.weight"),
                w13=torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")])
                .mul_(w(p + "post_attention_layernorm.weight")[None, :]),
                w2=w(p + "mlp.down_proj.weight"),
            ))
            lw = self.layers[-1]
            # Qwen2: the q, k, v biases fused like the weights (added after the matmul); Qwen3: the per-head
            # RMSNorm weights of q and k (head_dim each)
            lw["bqkv"] = torch.cat([w(p + f"self_attn.{x}_proj.bias") for x in "qkv"]) if a.qkv_bias else None
            lw["q_norm"] = w(p + "self_attn.q_norm.weight") if a.qk_norm else None
            lw["k_norm"] = w(p + "self_attn.k_norm.weight") if a.qk_norm else None
            for x in ("q", "k", "v", "gate", "up"):   # free the unfused copies as we go
                weights.pop(p + (f"self_attn.{x}_proj.weight" if len(x) == 1 else f"mlp.{x}_proj.weight"), None)
                if len(x) == 1:
                    weights.pop(p + f"self_attn.{x}_proj.bias", None)
        t = torch.arange(kv.max_context, dtype=torch.float32)
        freqs = torch.outer(t, rope_inv_freq(a))
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().to(device=device, dtype=dtype).contiguous()
        self.sin = emb.sin().to(device=device, dtype=dtype).contiguous()
        self.sm_scale = 1.0 / math.sqrt(a.head_dim)
        self.attn_scratch = None
        if plan.triton and device.type == "cuda":
            from .kernels import attention_scratch
            self.attn_scratch = attention_scratch(kv.slots + 1, a.n_heads, a.head_dim, device)

    def weight_bytes(self) -> int:
        ts = [self.embed, self.norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        ts += [t for layer in self.layers for t in layer.values() if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    def qkv_proj(self, lw: dict, r: torch.Tensor, decode: bool) -> torch.Tensor:
        """The fused q|k|v rows (L, (H + 2 KV) hd) of one layer: norm + QKV projection, then the family's
        extras: Qwen2's bias, Qwen3's RMSNorm over each q and k head (in place, on head-sized views)."""
        a, plan = self.args, self.plan
        qkv = ops.norm_linear(plan, r, None, a.rms_eps, lw["wqkv"], decode)
        if lw["bqkv"] is not None:
            qkv.add_(lw["bqkv"])
        if lw["q_norm"] is not None:
            heads = qkv.view(qkv.shape[0], -1, a.head_dim)
            for part, w in ((heads[:, :a.n_heads], lw["q_norm"]),
                            (heads[:, a.n_heads:a.n_heads + a.n_kv_heads], lw["k_norm"])):
                part.copy_(ops.rms_norm(plan, part.reshape(-1, a.head_dim), w, a.rms_eps).view(part.shape))
        return qkv

    def _layers(self, r: torch.Tensor, prefill: tuple | None, decode: tuple | None) -> torch.Tensor:
        """Every decoder layer over the rows of the residual stream r (R, D), updated in place and returned.
        prefill (positions (L,), slot (1,)): the first L rows are one prompt into that slot, causal from position 0;
        decode (pos (B,), slots (B,)): the last B rows are decode rows, row b at pos[b] of slot slots[b], attending
        to pos[b] + 1 cached positions. Both: a mixed step (a prompt riding in a decode step: the projections read
        every weight once for all R rows)."""
        a, plan, kv = self.args, self.plan, self.kv
        R = r.shape[0]
        L = 0 if prefill is None else prefill[0].shape[0]
        tile = prefill is None        # decode rows alone: the decode tiles (the GEMV at one row)
        if decode is not None:
            pos, slots = decode
            kv_len = pos + 1          # once per pass, not one add kernel per layer
        for i, lw in enumerate(self.layers):
            qkv = self.qkv_proj(lw, r, tile)
            parts = []
            if prefill is not None:
                parts.append(ops.prefill_rope_attention(plan, qkv[:L], prefill[0], prefill[1], self.cos, self.sin,
                                                        kv.k[i], kv.v[i], a.n_heads, a.n_kv_heads, a.head_dim,
                                                        self.sm_scale))
            if decode is not None:
                parts.append(ops.decode_rope_attention(plan, qkv[L:], pos, kv_len, slots, self.cos, self.sin,
                                                       kv.k[i], kv.v[i], a.n_heads, a.n_kv_heads, a.head_dim,
                                                       self.sm_scale, self.attn_scratch))
            attn = parts[0].reshape(R, -1) if len(parts) == 1 else torch.cat([p.reshape(p.shape[0], -1)
                                                                              for p in parts])
            ops.linear_residual(plan, attn, lw["wo"], r, tile)                         # r += attn @ wo.T
            ops.mlp_residual(plan, r, None, a.rms_eps, lw["w13"], lw["w2"], tile)    # r += silu(g)*u @ w2.T
        return r

    def _logits(self, r: torch.Tensor, decode: bool = False) -> torch.Tensor:
        """The final norm and the LM head for the rows given: (rows, V) float32."""
        return ops.norm_linear(self.plan, r, self.norm, self.args.rms_eps, self.lm_head, decode).float()

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, seq_len: torch.Tensor,
                slot: torch.Tensor) -> torch.Tensor:
        """ids/positions: (L,) (padded past seq_len); seq_len, slot: (1,) device tensors. Logits (1, V) of the
        last real token."""
        r = self._layers(self.embed.index_select(0, ids), (positions, slot), None)
        return self._logits(r.index_select(0, seq_len - 1))

    def decode(self, tok: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """tok, pos, slots: (B,) device tensors. Writes each row's KV at pos in its slot, attends to pos + 1
        positions. Logits (B, V)."""
        return self._logits(self._layers(self.embed.index_select(0, tok), None, (pos, slots)), True)

    def mixed(self, ids: torch.Tensor, positions: torch.Tensor, seq_len: torch.Tensor, slot: torch.Tensor,
              tok: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """A prefill (as prefill()) and a decode step (as decode()) in one pass over L + B rows. Logits (1 + B, V):
        the prompt's last real token, then the decode rows."""
        L = ids.shape[0]
        r = self._layers(self.embed.index_select(0, torch.cat([ids, tok])), (positions, slot), (pos, slots))
        return self._logits(torch.cat([r.index_select(0, seq_len - 1), r[L:]]))

    def prompt_logprobs(self, ids: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor, k: int,
                        n: int | None = None, rows: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For prompt scoring (echo + logprobs): a causal pass over ids (L,) into `slot`, of which the first n are
        the prompt (the rest padding to a bucket length, so the kernels run at a warm shape); the log-softmax at
        position i scores ids[i+1]. Returns (chosen (n-1,), top values (n-1, k), top ids (n-1, k)). The LM head
        runs `rows` positions at a time (n x vocab float32 logits never exist at once). Rewrites the slot's KV
        exactly as a prefill of the same ids does."""
        n = ids.numel() if n is None else n
        r = self._layers(self.embed.index_select(0, ids), (positions, slot), None)
        chosen, vals, idx = [], [], []
        for s in range(0, n - 1, rows):
            e = min(s + rows, n - 1)
            lp = torch.log_softmax(self._logits(r[s:e]), -1)
            chosen.append(lp.gather(1, ids[s + 1:e + 1, None])[:, 0])
            top = lp.topk(k, dim=-1)
            vals.append(top.values)
            idx.append(top.indices)
        if not chosen:
            empty = torch.zeros(0, k, device=ids.device)
            return empty[:, 0], empty, empty.long()
        return torch.cat(chosen), torch.cat(vals), torch.cat(idx)


def load_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json + *.safetensors of an HF checkpoint dir, as (config dict, CPU tensors). The config's
    eos_token_id also holds generation_config.json's (chat models end turns with those)."""
    from safetensors.torch import load_file

    if not path.is_dir():
        raise ModelLoadError(f"model {str(path)!r} is neither a preset nor a checkpoint directory")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ModelLoadError(f"checkpoint dir {str(path)!r} has no config.json")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"checkpoint dir {str(path)!r} has no *.safetensors weights "
                             "(save with save_pretrained(..., safe_serialization=True))")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from None
    _merge_generation_eos(path, cfg)
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except Exception as e:  # truncated / not safetensors
            raise ModelLoadError(f"cannot read weights file {f.name}: {e}") from None
    return cfg, weights


def _merge_generation_eos(path: Path, cfg: dict) -> None:
    """Add generation_config.json's eos_token_id(s) to cfg['eos_token_id'] (a list after the merge)."""
    f = path / "generation_config.json"
    if not f.exists():
        return
    try:
        gen = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{f} is not valid JSON: {e}") from None
    ids: list[int] = []
    for v in (cfg.get("eos_token_id"), gen.get("eos_token_id") if isinstance(gen, dict) else None):
        for t in (v if isinstance(v, list) else [] if v is None else [v]):
            if not isinstance(t, int) or isinstance(t, bool):
                raise ModelLoadError(f"eos_token_id {t!r} in {path} is not a token id (an integer)")
            if t not in ids:
                ids.append(t)
    if ids:
        cfg["eos_token_id"] = ids


def random_weights(a: ModelArgs, device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in HF names, made directly on the device (latency does not depend on values)."""
    g = torch.Generator(device=device).manual_seed(seed)
    D, I, hd = a.hidden_size, a.intermediate_size, a.head_dim

    def rnd(*shape: int) -> torch.Tensor:
        return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=g)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=dtype)

    wts = {"model.embed_tokens.weight": rnd(a.vocab_size, D), "model.norm.weight": ones(D)}
    if not a.tie_embeddings:
        wts["lm_head.weight"] = rnd(a.vocab_size, D)
    for i in range(a.n_layers):
        p = f"model.layers.{i}."
        wts.update({
            p + "self_attn.q_proj.weight": rnd(a.n_heads * hd, D),
            p + "self_attn.k_proj.weight": rnd(a.n_kv_heads * hd, D),
            p + "self_attn.v_proj.weight": rnd(a.n_kv_heads * hd, D),
            p + "self_attn.o_proj.weight": rnd(D, a.n_heads * hd),
            p + "mlp.gate_proj.weight": rnd(I, D), p + "mlp.up_proj.weight": rnd(I, D),
            p + "mlp.down_proj.weight": rnd(D, I),
            p + "input_layernorm.weight": ones(D), p + "post_attention_layernorm.weight": ones(D),
        })
        if a.qkv_bias:
            for x, n in (("q", a.n_heads), ("k", a.n_kv_heads), ("v", a.n_kv_heads)):
                wts[p + f"self_attn.{x}_proj.bias"] = rnd(n * hd)
        if a.qk_norm:
            wts[p + "self_attn.q_norm.weight"], wts[p + "self_attn.k_norm.weight"] = ones(hd), ones(hd)
    return wts
