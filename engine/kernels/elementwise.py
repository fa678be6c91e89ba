"""RMSNorm, SiLU * up, and rope with the K/V write into a slot."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import _pdl, _pdl_start, _pdl_wait


@triton.jit(do_not_specialize=["eps"])
def _rms_norm_kernel(X, W, OUT, stride, n_cols, eps, BLOCK: tl.constexpr, HAS_W: tl.constexpr,
                     USE_PDL: tl.constexpr):
    """One program per row: OUT = W * (x * rstd), x * rstd rounded to the model dtype as the eager model
    rounds it (HAS_W False: the weight is folded into the next projection, OUT = x * rstd). Used where the
    GEMV does not take the norm into its loads (prefill: more than one row).
    n_cols (the hidden size, fixed per model) is specialised: its divisibility by 16 lets the masked
    loads and stores be 16-byte vectors."""
    _pdl_start(USE_PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0)
    _pdl_wait(USE_PDL)
    xf = tl.load(X + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    y = (xf * rstd).to(OUT.dtype.element_ty)
    if HAS_W:
        y = w * y
    tl.store(OUT + row * stride + cols, y, mask=mask)


def rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float, pdl: bool = False) -> torch.Tensor:
    out = torch.empty_like(x)
    n = x.shape[-1]
    pdl = _pdl(pdl, x.shape[0])
    _rms_norm_kernel[(x.shape[0],)](x, x if w is None else w, out, x.stride(0), n, eps,
                                    BLOCK=triton.next_power_of_2(n), HAS_W=w is not None,
                                    USE_PDL=pdl, launch_pdl=pdl, num_warps=8)
    return out


@triton.jit
def _silu_mul_kernel(GU, OUT, n_inter, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """silu(gate) * up of [gate | up] rows; n_inter (fixed per model) specialised, as in _rms_norm_kernel."""
    _pdl_start(USE_PDL)
    _pdl_wait(USE_PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_inter
    g = tl.load(GU + row * 2 * n_inter + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * 2 * n_inter + n_inter + cols, mask=mask, other=0.0)
    tl.store(OUT + row * n_inter + cols, (g / (1.0 + tl.exp(-g))).to(u.dtype) * u, mask=mask)


def silu_mul(gu: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    L, two_i = gu.shape
    n = two_i // 2
    out = torch.empty((L, n), device=gu.device, dtype=gu.dtype)
    BLOCK = 1024
    pdl = _pdl(pdl, L)
    _silu_mul_kernel[(L, triton.cdiv(n, BLOCK))](gu, out, n, BLOCK=BLOCK, USE_PDL=pdl, launch_pdl=pdl, num_warps=4)
    return out


@triton.jit(do_not_specialize=["L", "n_heads", "n_kv"])
def _rope_cache_kernel(QKV, POS, SLOT, COS, SIN, Q_OUT, K_OUT, K_CACHE, V_CACHE, L, stride_qkv, stride_kh, stride_slot,
                       n_heads, n_kv, HD: tl.constexpr, BLOCK_T: tl.constexpr, HAS_K_OUT: tl.constexpr,
                       USE_PDL: tl.constexpr):
    """One program per (BLOCK_T tokens, head) of one sequence in KV slot SLOT[0]: q heads rotate into Q_OUT,
    k heads rotate into K_CACHE[slot, kv, pos] (and K_OUT (L, n_kv, HD) when HAS_K_OUT: the prefill's
    attention reads its own rotated keys there, not from the slot), v heads copy into V_CACHE[slot, kv, pos]."""
    _pdl_start(USE_PDL)
    _pdl_wait(USE_PDL)
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    HALF: tl.constexpr = HD // 2
    tmask = (tok < L)[:, None]
    pos = tl.load(POS + tok, mask=tok < L, other=0).to(tl.int32)[:, None]      # int64 positions: 32-bit index math
    base = tl.load(SLOT).to(tl.int64) * stride_slot
    offs = tl.arange(0, HALF)[None, :]
    src = QKV + tok[:, None] * stride_qkv + head * HD + offs
    x1 = tl.load(src, mask=tmask, other=0.0)
    x2 = tl.load(src + HALF, mask=tmask, other=0.0)
    if head < n_heads + n_kv:
        c = tl.load(COS + pos * HD + offs, mask=tmask, other=0.0).to(tl.float32)
        s = tl.load(SIN + pos * HD + offs, mask=tmask, other=0.0).to(tl.float32)
        o1 = (x1.to(tl.float32) * c - x2.to(tl.float32) * s).to(x1.dtype)
        o2 = (x2.to(tl.float32) * c + x1.to(tl.float32) * s).to(x1.dtype)
        if head < n_heads:
            dst = Q_OUT + (tok[:, None] * n_heads + head) * HD + offs
        else:
            dst = K_CACHE + base + (head - n_heads) * stride_kh + pos * HD + offs
            if HAS_K_OUT:
                ko = K_OUT + (tok[:, None] * n_kv + head - n_heads) * HD + offs
                tl.store(ko, o1, mask=tmask)
                tl.store(ko + HALF, o2, mask=tmask)
        tl.store(dst, o1, mask=tmask)
        tl.store(dst + HALF, o2, mask=tmask)
    else:
        dst = V_CACHE + base + (head - n_heads - n_kv) * stride_kh + pos * HD + offs
        tl.store(dst, x1, mask=tmask)
        tl.store(dst + HALF, x2, mask=tmask)


ROPE_TOKENS = 16     # tokens per rope program


def _slot_view(cache: torch.Tensor, slot: torch.Tensor | None) -> tuple[torch.Tensor, int, int]:
    """(slot index tensor, kv-head stride, slot stride) of a cache laid out (slots, kv, T, hd), or (kv, T, hd)
    as one slot."""
    if cache.dim() == 3:
        return (slot if slot is not None else torch.zeros(1, dtype=torch.long, device=cache.device),
                cache.stride(0), 0)
    return slot, cache.stride(1), cache.stride(0)


def rope_and_cache(qkv, positions, cos, sin, k_cache, v_cache, n_heads, n_kv, hd, slot=None, want_k=False,
                   pdl=False):
    """q (L, H, hd) rotated; k, v into the cache of `slot` (a (1,) device tensor) at `positions`. want_k: also
    return the rotated k (L, n_kv, hd)."""
    L = qkv.shape[0]
    q = torch.empty((L, n_heads, hd), device=qkv.device, dtype=qkv.dtype)
    k_out = torch.empty((L, n_kv, hd), device=qkv.device, dtype=qkv.dtype) if want_k else q
    slot, stride_kh, stride_slot = _slot_view(k_cache, slot)
    pdl = _pdl(pdl, L)
    bt = min(ROPE_TOKENS, triton.next_power_of_2(L))
    _rope_cache_kernel[(triton.cdiv(L, bt), n_heads + 2 * n_kv)](
        qkv, positions, slot, cos, sin, q, k_out, k_cache, v_cache, L, qkv.stride(0), stride_kh, stride_slot,
        n_heads, n_kv, HD=hd, BLOCK_T=bt, HAS_K_OUT=want_k, USE_PDL=pdl, launch_pdl=pdl,
        num_warps=1 if bt == 1 else 4)
    return (q, k_out) if want_k else q
