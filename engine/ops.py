"""The model's non-matmul operations. CUDA tensors go to the Triton kernels in engine/kernels.py
(compiled once at start-up, lengths passed at run time so one binary serves every length); CPU
tensors, or `use_triton(False)`, take the PyTorch reference below, which is also the test oracle.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_kernels = None
_enabled = True
_skinny = True
_fused = True
GATE_IN_GEMV = True   # one row: silu(gate) * up computed in the down GEMV's loads (no SiLU kernel)
SHORT_PREFILL_KERNEL = True   # short buckets: rope + KV write + attention in one kernel (A/B: False)
# silu(gate) * up in the gate/up GEMV's epilogue, the down GEMV plain (H100, 2026-11-27, bench/NOTES.md step 24:
# decode step 4,986 -> 4,957 us against the SiLU in the down GEMV's loads; bucket-16 graph 5,399 -> 5,353 us
# against a SiLU kernel). Off: those (A/B).
SWIGLU_DECODE = True    # one row (decode)
SWIGLU_PREFILL = True   # 2-16 rows (the bucket-16 prefill)
# Up to how many rows the Triton skinny kernel runs the projections (above: cuBLAS): the decode step, the bucket-16
# prefill and bucket 32 (kernels._ROWS64_CONFIGS' tile; the SiLU as its own kernel above 16 rows). bench/NOTES.md
# step 39, 2026-11-27: bucket-32 graph 5,667 -> 5,516 us on an H100 (4,386 -> 4,103 on an H200); bucket 64 on the
# same tile was no faster (5,877 -> 5,890 us H100, 4,422 -> 4,668 H200), so 64 rows stay on cuBLAS.
# A/B: bench/profile_decode.py --variant skinny-16 / skinny-64.
SKINNY_MAX_ROWS = 32
# Decode: rope + KV write inside the split attention kernel instead of a rope kernel before it (bench/NOTES.md
# steps 26 and 30). Session 11's first form (every split program roped q and the new k, with tl.join/tl.reshape
# shuffles) won at 100 positions but lost ~40 us at ~500. The form here ropes q over the full head width without
# shuffles and ropes k only in the program whose chunk holds the new token. Same H100, 2026-11-27: decode step
# 4,962 -> 4,830 us at 100 positions, 5,035 -> 5,022 at 500; TPOT (10- and 500-token prompts) 4.94 -> 4.89-4.91 ms.
# A/B: bench/profile_decode.py --variant rope-kernel-decode (the separate rope kernel).
DECODE_ROPE_IN_ATTN = True
# The attention and MLP RMSNorms' weights folded into the projections after them at load (model.py: wqkv and
# w13 scaled by ln1 / ln2 along K; rms_norm(x) * ln @ W.T == rms_norm(x) @ (W * ln).T): the one-row GEMV's
# in-loop norm no longer loads and multiplies ln per chunk. Same H100, 2026-11-27 (bench/NOTES.md step 32):
# decode step 4,907-4,940 -> 4,845-4,853 us at 100 positions; the bucket-16 graph unchanged. Off: the norm
# weights stay separate (A/B: bench/profile_decode.py --variant unfolded-norm).
FOLD_NORM = True


def use_triton(flag: bool, skinny_matmul: bool | None = None, fused_gemv_norm: bool | None = None) -> None:
    """Triton kernels on/off for CUDA tensors; skinny_matmul: Triton GEMV for M <= SKINNY_MAX_ROWS vs cuBLAS;
    fused_gemv_norm: the GEMV applies the RMSNorm of its input in its own loads (norm_linear) vs an
    RMSNorm kernel first."""
    global _enabled, _skinny, _fused
    _enabled = flag
    if skinny_matmul is not None:
        _skinny = skinny_matmul
    if fused_gemv_norm is not None:
        _fused = fused_gemv_norm


def _k(x: torch.Tensor):
    """The Triton kernel module when x lives on CUDA and Triton is on; imported only there."""
    global _kernels
    if not (_enabled and x.is_cuda):
        return None
    if _kernels is None:
        from . import kernels as _mod
        _kernels = _mod
    return _kernels


def _gemv(x: torch.Tensor):
    """The kernel module when x is short enough for the Triton GEMV (decode, buckets <= SKINNY_MAX_ROWS rows)."""
    return _k(x) if x.shape[0] <= SKINNY_MAX_ROWS and _skinny else None


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ w (N, K).T. Short M (decode, small buckets) on CUDA: the Triton skinny matmul."""
    if (k := _gemv(x)) is not None:
        return k.skinny_matmul(x.contiguous(), w)
    return x @ w.t()


def rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """w None: the norm's weight is folded into the next projection (FOLD_NORM)."""
    if (k := _k(x)) is not None:
        return k.rms_norm(x, w, eps)
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if w is None else w * y


def norm_linear(x: torch.Tensor, ln: torch.Tensor | None, eps: float, w: torch.Tensor) -> torch.Tensor:
    """rms_norm(x) * ln @ w.T (ln None: its weight folded into w). One row (decode) on CUDA (fused_gemv_norm):
    one GEMV that normalises x in its own loads; otherwise an RMSNorm, then the matmul (the reference). Only
    at one row: every GEMV program re-reads all of x, so the per-element norm work grows with M while the
    weight work does not (at 16 rows it would cost more than the norm kernel it saves)."""
    if _fused and x.shape[0] == 1 and (k := _gemv(x)) is not None:
        return k.skinny_matmul(x.contiguous(), w, ln=ln, eps=eps, norm=True)
    return linear(rms_norm(x, ln, eps), w)


def linear_residual(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, gated: bool = False) -> None:
    """r += act(x) @ w.T in place (the residual stream), act = silu(gate) * up of x = [gate | up] when gated.
    Short M on CUDA: the GEMV adds into r in its epilogue (and at one row computes silu * up in its loads:
    like the norm, that work is repeated by every program, so at more rows silu_mul runs first); longer M
    on CUDA: silu_mul, then one cuBLAS addmm into r; CPU: the eager model's r + linear(act)."""
    if (k := _gemv(x)) is not None:
        if gated and not (GATE_IN_GEMV and x.shape[0] == 1):
            x, gated = silu_mul(x), False
        k.skinny_matmul(x.contiguous(), w, residual=r, gated=gated)
        return
    act = silu_mul(x) if gated else x
    if r.is_cuda:
        r.addmm_(act, w.t())
    else:
        r.add_(linear(act, w))


def mlp_residual(r: torch.Tensor, ln: torch.Tensor | None, eps: float, w13: torch.Tensor, w2: torch.Tensor) -> None:
    """r += silu(g) * u @ w2.T in place, [g | u] = rms_norm(r) * ln @ w13.T: the MLP block (ln None: folded into
    w13). Short M on CUDA with SWIGLU_DECODE / SWIGLU_PREFILL: the gate/up GEMV applies the SiLU in its
    epilogue (it streams each block of gate rows beside the same block of up rows) and the down GEMV reads
    a plain activation; otherwise norm_linear, then linear_residual with the SiLU in the down GEMV's loads
    (one row) or a SiLU kernel."""
    M = r.shape[0]
    if (k := _gemv(r)) is not None and (SWIGLU_DECODE if M == 1 else SWIGLU_PREFILL and M <= 16):
        if _fused and M == 1:
            act = k.skinny_matmul(r, w13, ln=ln, eps=eps, norm=True, swiglu=True)
        else:
            act = k.skinny_matmul(rms_norm(r, ln, eps), w13, swiglu=True)
        linear_residual(act, w2, r)
        return
    linear_residual(norm_linear(r, ln, eps, w13), w2, r, gated=True)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu: (L, 2I) = [gate | up] -> silu(gate) * up, (L, I)."""
    if (k := _k(gu)) is not None:
        return k.silu_mul(gu)
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def rope_and_cache(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv: int,
                   hd: int) -> torch.Tensor:
    """Rotate q and k by their positions, write k and v into the cache ([kv_head, pos, hd]) at
    `positions`, return q as (L, H, hd)."""
    if (k := _k(qkv)) is not None:
        return k.rope_and_cache(qkv, positions, cos, sin, k_cache, v_cache, n_heads, n_kv, hd)
    L = qkv.shape[0]
    q, kk, v = qkv.view(L, n_heads + 2 * n_kv, hd).split([n_heads, n_kv, n_kv], dim=1)
    c, s = cos.index_select(0, positions)[:, None], sin.index_select(0, positions)[:, None]

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * c + torch.cat([-x2, x1], dim=-1) * s

    k_cache.index_copy_(1, positions, rot(kk).transpose(0, 1))
    v_cache.index_copy_(1, positions, v.transpose(0, 1))
    return rot(q)


def prefill_rope_attention(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv: int, hd: int,
                           sm_scale: float) -> torch.Tensor:
    """A prefill's attention from its fused qkv rows (positions 0..L-1): rope of q and k, K and V into the
    cache, causal attention. A short prompt bucket on CUDA: one Triton kernel for all of it (no rope
    kernel, no SDPA launch); otherwise rope_and_cache, then prefill_attention. Returns (L, H, hd)."""
    L = qkv.shape[0]
    if (k := _k(qkv)) is not None and L <= k.SHORT_PREFILL and SHORT_PREFILL_KERNEL:
        return k.short_prefill_attention(qkv, positions, cos, sin, k_cache, v_cache, n_heads, n_kv, hd, sm_scale)
    q = rope_and_cache(qkv, positions, cos, sin, k_cache, v_cache, n_heads, n_kv, hd)
    return prefill_attention(q, k_cache, v_cache, L, sm_scale)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, L: int,
                      sm_scale: float) -> torch.Tensor:
    """Causal attention of L prompt tokens (positions 0..L-1) over the cache. q: (L, H, hd)."""
    k = k_cache[:, :L].unsqueeze(0)
    v = v_cache[:, :L].unsqueeze(0)
    o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k, v, is_causal=True,
                                       scale=sm_scale, enable_gqa=k.shape[1] != q.shape[1])
    return o[0].transpose(0, 1)                                              # (L, H, hd)


def decode_rope_attention(qkv: torch.Tensor, pos: torch.Tensor, kv_len: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv: int,
                          hd: int, sm_scale: float) -> torch.Tensor:
    """One decode token's attention from its fused qkv row (1, (H + 2 KV) hd) at position pos (device
    tensor, (1,)): rope, K/V into the cache at pos, attention over kv_len = pos + 1 positions. On CUDA with
    DECODE_ROPE_IN_ATTN the split attention kernel does the rope and the KV write itself (no rope launch);
    otherwise rope_and_cache, then decode_attention. Returns (1, H, hd)."""
    if (k := _k(qkv)) is not None and DECODE_ROPE_IN_ATTN:
        return k.decode_rope_attention(qkv, cos, sin, k_cache, v_cache, kv_len, n_heads, hd, sm_scale)
    q = rope_and_cache(qkv, pos, cos, sin, k_cache, v_cache, n_heads, n_kv, hd)
    return decode_attention(q, k_cache, v_cache, kv_len, sm_scale)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     kv_len: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """One query token over the first kv_len (device tensor) cached positions. q: (1, H, hd).
    The Triton kernel reads only the valid positions; the reference masks the whole cache."""
    if (k := _k(q)) is not None:
        return k.decode_attention(q, k_cache, v_cache, kv_len, sm_scale)
    H, n_kv = q.shape[1], k_cache.shape[0]
    kk = k_cache.repeat_interleave(H // n_kv, dim=0)                        # (H, T, hd)
    vv = v_cache.repeat_interleave(H // n_kv, dim=0)
    s = torch.einsum("hd,htd->ht", q[0].float(), kk.float()) * sm_scale
    valid = torch.arange(k_cache.shape[1], device=q.device) < kv_len
    p = torch.softmax(s.masked_fill(~valid, float("-inf")), dim=-1)
    return torch.einsum("ht,htd->hd", p, vv.float()).to(q.dtype).unsqueeze(0)
