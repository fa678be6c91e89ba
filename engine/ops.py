"""The model's operations under a KernelPlan. With plan.triton, CUDA tensors go to the Triton kernels in
engine/kernels.py (compiled once at start-up, lengths and slots passed at run time so one binary serves
every shape of a bucket); otherwise the PyTorch reference below runs, which is also the test oracle.

KV caches are (slots, kv_heads, positions, head_dim) per layer; `slot`/`slots` are device tensors, so one
CUDA graph serves every slot."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .plan import KernelPlan

_kernels = None


def _k(plan: KernelPlan, x: torch.Tensor):
    """The Triton kernel module when the plan runs Triton and x lives on CUDA; imported only there."""
    global _kernels
    if not (plan.triton and x.is_cuda):
        return None
    if _kernels is None:
        from . import kernels as _mod
        _kernels = _mod
    return _kernels


def _tile(plan: KernelPlan, x: torch.Tensor, decode: bool) -> int | None:
    """The skinny kernel's row tile for x, or None for cuBLAS / the reference. Decode rows share one tile at
    every batch size (plan.decode_tile), one row stays on the GEMV unless the plan is batch-invariant."""
    M = x.shape[0]
    if not (plan.skinny and _k(plan, x) is not None):
        return None
    if decode:
        return 1 if M == 1 and not plan.batch_invariant else plan.decode_tile
    return (1 if M == 1 else 0) if M <= plan.skinny_max_rows else None     # 0: the smallest tile holding M


def linear(plan: KernelPlan, x: torch.Tensor, w: torch.Tensor, decode: bool = False) -> torch.Tensor:
    if (t := _tile(plan, x, decode)) is not None:
        return _k(plan, x).skinny_matmul(x.contiguous(), w, block_m=t or None, pdl=plan.pdl)
    return x @ w.t()


def rms_norm(plan: KernelPlan, x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """w None: the norm's weight is folded into the next projection."""
    if (k := _k(plan, x)) is not None:
        return k.rms_norm(x, w, eps, pdl=plan.pdl)
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if w is None else w * y


def norm_linear(plan: KernelPlan, x: torch.Tensor, ln: torch.Tensor | None, eps: float, w: torch.Tensor,
                decode: bool = False) -> torch.Tensor:
    """rms_norm(x) * ln @ w.T. On the one-row GEMV (plan.fused_norm) the GEMV normalises x in its own loads;
    at more rows every program would redo that work, so an RMSNorm kernel runs first."""
    t = _tile(plan, x, decode)
    if t == 1 and plan.fused_norm:
        return _k(plan, x).skinny_matmul(x.contiguous(), w, ln=ln, eps=eps, norm=True, pdl=plan.pdl)
    return linear(plan, rms_norm(plan, x, ln, eps), w, decode)


def silu_mul(plan: KernelPlan, gu: torch.Tensor) -> torch.Tensor:
    """gu: (L, 2I) = [gate | up] -> silu(gate) * up, (L, I)."""
    if (k := _k(plan, gu)) is not None:
        return k.silu_mul(gu, pdl=plan.pdl)
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def linear_residual(plan: KernelPlan, x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, decode: bool = False) -> None:
    """r += x @ w.T in place (the residual stream): in the skinny kernel's epilogue, or one cuBLAS addmm."""
    if (t := _tile(plan, x, decode)) is not None:
        _k(plan, x).skinny_matmul(x.contiguous(), w, residual=r, block_m=t or None, pdl=plan.pdl)
    elif r.is_cuda:
        r.addmm_(x, w.t())
    else:
        r.add_(x @ w.t())


def mlp_residual(plan: KernelPlan, r: torch.Tensor, ln: torch.Tensor | None, eps: float, w13: torch.Tensor,
                 w2: torch.Tensor, decode: bool = False) -> None:
    """r += silu(g) * u @ w2.T, [g | u] = rms_norm(r) * ln @ w13.T. On the skinny kernel (up to 16 prefill rows,
    or decode) the gate/up matmul applies the SiLU in its epilogue; otherwise a SiLU kernel runs between."""
    t = _tile(plan, r, decode)
    if t is not None and (decode or r.shape[0] <= 16):
        k = _k(plan, r)
        if t == 1 and plan.fused_norm:
            act = k.skinny_matmul(r, w13, ln=ln, eps=eps, norm=True, swiglu=True, pdl=plan.pdl)
        else:
            act = k.skinny_matmul(rms_norm(plan, r, ln, eps), w13, swiglu=True, block_m=t or None, pdl=plan.pdl)
    else:
        act = silu_mul(plan, norm_linear(plan, r, ln, eps, w13, decode))
    linear_residual(plan, act, w2, r, decode)


def _rot(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    hd = x.shape[-1]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * c + torch.cat([-x2, x1], dim=-1) * s


def rope_and_cache(plan: KernelPlan, qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   n_heads: int, n_kv: int, hd: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: rotate q and k of L tokens by their positions, write k and v into k_cache[slots[i], :,
    positions[i]] (slots: (L,) or (1,) broadcast), return (q (L, H, hd), rotated k (L, KV, hd))."""
    L = qkv.shape[0]
    q, kk, v = qkv.view(L, n_heads + 2 * n_kv, hd).split([n_heads, n_kv, n_kv], dim=1)
    c, s = cos.index_select(0, positions)[:, None], sin.index_select(0, positions)[:, None]
    kr = _rot(kk, c, s)
    slots = slots.expand(L)
    k_cache[slots, :, positions] = kr
    v_cache[slots, :, positions] = v
    return _rot(q, c, s), kr


def prefill_rope_attention(plan: KernelPlan, qkv: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
                           cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           n_heads: int, n_kv: int, hd: int, sm_scale: float) -> torch.Tensor:
    """A prefill's attention from its fused qkv rows (positions 0..L-1) into KV slot `slot` ((1,) tensor): rope of
    q and k, K and V into the slot, causal attention over the prompt's own K and V. A short bucket on CUDA: one
    Triton kernel for all of it. Returns (L, H, hd)."""
    L = qkv.shape[0]
    k = _k(plan, qkv)
    if k is not None and L <= k.SHORT_PREFILL:
        return k.short_prefill_attention(qkv, positions, cos, sin, k_cache, v_cache, n_heads, n_kv, hd, sm_scale,
                                         slot=slot, pdl=plan.pdl)
    if k is not None:
        q, kr = k.rope_and_cache(qkv, positions, cos, sin, k_cache, v_cache, n_heads, n_kv, hd, slot=slot,
                                 want_k=True, pdl=plan.pdl)
    else:
        q, kr = rope_and_cache(plan, qkv, positions, slot, cos, sin, k_cache, v_cache, n_heads, n_kv, hd)
    v = qkv[:, (n_heads + n_kv) * hd:].view(L, n_kv, hd)
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kr.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       is_causal=True, scale=sm_scale, enable_gqa=n_kv != n_heads)
    return o[0].transpose(0, 1)                                              # (L, H, hd)


def decode_rope_attention(plan: KernelPlan, qkv: torch.Tensor, pos: torch.Tensor, kv_len: torch.Tensor,
                          slots: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, n_heads: int, n_kv: int, hd: int, sm_scale: float,
                          scratch=None) -> torch.Tensor:
    """B decode rows' attention from their fused qkv rows (B, (H + 2 KV) hd): row b at position pos[b] of slot
    slots[b] (device tensors): rope, K/V into the slot, attention over kv_len[b] = pos[b] + 1 positions. On CUDA
    the split attention kernel does the rope and the KV write itself, its partial results in `scratch`
    (kernels.attention_scratch). Returns (B, H, hd)."""
    if (k := _k(plan, qkv)) is not None:
        return k.decode_rope_attention(qkv, cos, sin, k_cache, v_cache, kv_len, n_heads, hd, sm_scale, slots=slots,
                                       pdl=plan.pdl, scratch=scratch, shape=plan.attention_shape(qkv.shape[0], n_kv))
    q, _ = rope_and_cache(plan, qkv, pos, slots, cos, sin, k_cache, v_cache, n_heads, n_kv, hd)
    return decode_attention(q, k_cache, v_cache, kv_len, slots, sm_scale)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: torch.Tensor,
                     slots: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Reference: B query rows (B, H, hd), row b over the first kv_len[b] positions of slot slots[b]."""
    H, n_kv, T = q.shape[1], k_cache.shape[1], k_cache.shape[2]
    kk = k_cache[slots].repeat_interleave(H // n_kv, dim=1)                  # (B, H, T, hd)
    vv = v_cache[slots].repeat_interleave(H // n_kv, dim=1)
    s = torch.einsum("bhd,bhtd->bht", q.float(), kk.float()) * sm_scale
    valid = torch.arange(T, device=q.device)[None, :] < kv_len[:, None]
    p = torch.softmax(s.masked_fill(~valid[:, None, :], float("-inf")), dim=-1)
    return torch.einsum("bht,bhtd->bhd", p, vv.float()).to(q.dtype)
