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
_fused = False


def use_triton(flag: bool, skinny_matmul: bool | None = None, fused_gemv_norm: bool | None = None) -> None:
    """Triton kernels on/off for CUDA tensors; skinny_matmul: Triton GEMV for M <= 16 vs cuBLAS;
    fused_gemv_norm: split-K GEMV + residual/RMSNorm (linear_add_rms_norm) vs the composition."""
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


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ w (N, K).T. Short M (decode, small buckets) on CUDA: the Triton skinny matmul."""
    if x.shape[0] <= 16 and _skinny and (k := _k(x)) is not None:
        return k.skinny_matmul(x.contiguous(), w)
    return x @ w.t()


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if (k := _k(x)) is not None:
        return k.rms_norm(x, None, w, eps)
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """r += x (the residual stream, in place); returns rms_norm(r) * w."""
    if (k := _k(x)) is not None:
        return k.rms_norm(x, r, w, eps)
    r.add_(x)
    return rms_norm(r, w, eps)


def linear_add_rms_norm(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, ln: torch.Tensor, eps: float,
                        gated: bool = False) -> torch.Tensor:
    """r += (silu_mul(x) if gated else x) @ w.T (in place); returns rms_norm(r) * ln. Short M on CUDA:
    a split-K GEMV (silu*up fused into its loads) + the residual/RMSNorm kernel summing its partials,
    2 launches; otherwise the composition of the ops above (the reference)."""
    if x.shape[0] <= 16 and _skinny and _fused and (k := _k(x)) is not None:
        return k.linear_add_rms_norm(x.contiguous(), w, r, ln, eps, gated)
    return add_rms_norm(linear(silu_mul(x) if gated else x, w), r, ln, eps)


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


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, L: int,
                      sm_scale: float) -> torch.Tensor:
    """Causal attention of L prompt tokens (positions 0..L-1) over the cache. q: (L, H, hd)."""
    k = k_cache[:, :L].unsqueeze(0)
    v = v_cache[:, :L].unsqueeze(0)
    o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k, v, is_causal=True,
                                       scale=sm_scale, enable_gqa=k.shape[1] != q.shape[1])
    return o[0].transpose(0, 1)                                              # (L, H, hd)


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
