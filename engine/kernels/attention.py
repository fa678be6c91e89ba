"""Attention kernels: the one-launch short prefill, and split-KV decode over B rows in their own slots."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .elementwise import _slot_view
from .launch import _pdl, _pdl_start, _pdl_wait


@triton.jit
def _rope_rows(src, pos, COS, SIN, tmask, HD: tl.constexpr):
    """The two rotated halves of one head's rows at src (BLOCK_T, HD), rounded to the model dtype as
    _rope_cache_kernel rounds them."""
    HALF: tl.constexpr = HD // 2
    offs = tl.arange(0, HALF)[None, :]
    x1 = tl.load(src + offs, mask=tmask, other=0.0)
    x2 = tl.load(src + HALF + offs, mask=tmask, other=0.0)
    c = tl.load(COS + pos * HD + offs, mask=tmask, other=0.0).to(tl.float32)
    s = tl.load(SIN + pos * HD + offs, mask=tmask, other=0.0).to(tl.float32)
    o1 = (x1.to(tl.float32) * c - x2.to(tl.float32) * s).to(x1.dtype)
    o2 = (x2.to(tl.float32) * c + x1.to(tl.float32) * s).to(x1.dtype)
    return o1, o2


@triton.jit(do_not_specialize=["L", "n_heads", "n_kv", "sm_scale"])
def _short_prefill_attn_kernel(QKV, POS, SLOT, COS, SIN, OUT, K_CACHE, V_CACHE, L, stride_qkv, stride_kh, stride_slot,
                               n_heads, n_kv, sm_scale, GROUP: tl.constexpr, HD: tl.constexpr, BLOCK_T: tl.constexpr,
                               USE_PDL: tl.constexpr):
    """A whole short prefill's attention for one query head in one program: rope of its q rows and of its
    kv head's k rows, straight from the fused qkv rows; causal softmax(q k^T) v over all L <= BLOCK_T
    tokens in one tile; the first query head of each kv group writes the rotated k and the v rows into the
    cache at their positions. Replaces the rope + KV-write kernel and SDPA for buckets <= SHORT_PREFILL."""
    _pdl_start(USE_PDL)
    _pdl_wait(USE_PDL)
    h = tl.program_id(0)
    kvh = h // GROUP
    HALF: tl.constexpr = HD // 2
    t = tl.arange(0, BLOCK_T)
    tmask = (t < L)[:, None]
    pos = tl.load(POS + t, mask=t < L, other=0).to(tl.int32)[:, None]      # int64 positions: 32-bit index math
    row = QKV + t[:, None] * stride_qkv
    q1, q2 = _rope_rows(row + h * HD, pos, COS, SIN, tmask, HD)
    k1, k2 = _rope_rows(row + (n_heads + kvh) * HD, pos, COS, SIN, tmask, HD)
    offs = tl.arange(0, HALF)[None, :]
    v1 = tl.load(row + (n_heads + n_kv + kvh) * HD + offs, mask=tmask, other=0.0)
    v2 = tl.load(row + (n_heads + n_kv + kvh) * HD + HALF + offs, mask=tmask, other=0.0)
    if h % GROUP == 0:
        base = tl.load(SLOT).to(tl.int64) * stride_slot
        kd = K_CACHE + base + kvh * stride_kh + pos * HD + offs
        vd = V_CACHE + base + kvh * stride_kh + pos * HD + offs
        tl.store(kd, k1, mask=tmask)
        tl.store(kd + HALF, k2, mask=tmask)
        tl.store(vd, v1, mask=tmask)
        tl.store(vd + HALF, v2, mask=tmask)
    s = (tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))) * sm_scale
    s = tl.where((t[None, :] <= t[:, None]) & (t[None, :] < L), s, float("-inf"))   # causal, no padding keys
    p = tl.exp(s - tl.max(s, axis=1)[:, None])
    p = (p / tl.sum(p, axis=1)[:, None]).to(v1.dtype)
    o = OUT + (t[:, None] * n_heads + h) * HD + offs
    tl.store(o, tl.dot(p, v1).to(v1.dtype), mask=tmask)
    tl.store(o + HALF, tl.dot(p, v2).to(v1.dtype), mask=tmask)


SHORT_PREFILL = 64    # the longest prompt bucket whose attention runs in _short_prefill_attn_kernel


def short_prefill_attention(qkv, positions, cos, sin, k_cache, v_cache, n_heads, n_kv, hd, sm_scale, slot=None,
                            pdl=False):
    """Rope, KV write (into `slot`) and causal attention of a prefill of L <= SHORT_PREFILL tokens in one launch
    (one program per query head). Returns (L, H, hd)."""
    L = qkv.shape[0]
    assert L <= SHORT_PREFILL
    out = torch.empty((L, n_heads, hd), device=qkv.device, dtype=qkv.dtype)
    slot, stride_kh, stride_slot = _slot_view(k_cache, slot)
    pdl = _pdl(pdl, L)
    bt = max(16, triton.next_power_of_2(L))
    _short_prefill_attn_kernel[(n_heads,)](
        qkv, positions, slot, cos, sin, out, k_cache, v_cache, L, qkv.stride(0), stride_kh, stride_slot, n_heads,
        n_kv, sm_scale, GROUP=n_heads // n_kv, HD=hd, BLOCK_T=bt, USE_PDL=pdl, launch_pdl=pdl,
        num_warps=4 if bt <= 32 else 8)
    return out


@triton.jit
def _rope_head(src, pos, COS, SIN, mask, HD: tl.constexpr):
    """The rotated rows (rows, HD) of one head at src (rows, 1), at one position, over the whole head width:
    x * cos - x[d + HD/2] * sin in the first half, x * cos + x[d - HD/2] * sin in the second (_rope_rows's
    arithmetic, without splitting the row into halves; the cos/sin tables repeat their half in the second
    half, as the model builds them)."""
    HALF: tl.constexpr = HD // 2
    d = tl.arange(0, HD)[None, :]
    x = tl.load(src + d, mask=mask, other=0.0)
    xr = tl.load(src + (d + HALF) % HD, mask=mask, other=0.0)
    c = tl.load(COS + pos * HD + d, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + pos * HD + d, mask=mask, other=0.0).to(tl.float32)
    xf, xrf = x.to(tl.float32), xr.to(tl.float32)
    return tl.where(d < HALF, xf * c - xrf * s, xf * c + xrf * s).to(x.dtype)


@triton.jit(do_not_specialize=["sm_scale", "n_heads", "n_kv"])
def _decode_attn_split_kernel(Q, K, V, LEN, SLOTS, O_PART, LSE_PART, OUT, stride_q, stride_kh, stride_slot, sm_scale,
                              COS, SIN, n_heads, n_kv, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                              HD: tl.constexpr, BLOCK_N: tl.constexpr, N_SPLITS: tl.constexpr, ROPE: tl.constexpr,
                              USE_PDL: tl.constexpr):
    """Flash-decoding, split over the sequence, one row (stream) per program_id(2). The row's valid length
    and KV slot come from device memory (one CUDA graph serves every position and slot; only valid KV is read)
    and so does the split size: the length is cut into N_SPLITS chunks of whole BLOCK_N tiles. Program
    (kv_head, split, row) attends the GROUP query heads sharing this kv head over its chunk.
    ROPE: Q holds the rows' fused qkv, not rotated q: each program rotates its q heads; only the program whose
    chunk holds the new token (position LEN - 1) rotates its k, writes it and its v into the slot (no rope kernel
    before this one) and starts its softmax from that position, in registers, before its tile loop; the tiles stop
    short of it, so they feed the tensor cores straight from the cache (no per-tile select of the new row).
    One split: the program's result is the row's, so it goes straight to OUT (no partials, no reduce launch)."""
    _pdl_start(USE_PDL)
    _pdl_wait(USE_PDL)
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    row = tl.program_id(2)
    length = tl.load(LEN + row).to(tl.int32)     # the engine's lengths are int64: keep the tile index math 32-bit
    base = tl.load(SLOTS + row).to(tl.int64) * stride_slot
    K += base
    V += base
    Q += row * stride_q
    O_PART += row * n_heads * N_SPLITS * HD
    LSE_PART += row * n_heads * N_SPLITS
    OUT += row * n_heads * HD
    chunk = tl.cdiv(tl.cdiv(length, N_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HD)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    if ROPE:
        pos = length - 1
        owner = (pos >= start) & (pos < end)
        mine = (tl.zeros((1, 1), tl.int32) == 0) & owner       # (1, 1): this program's chunk holds pos
        q = _rope_head(Q + heads[:, None] * HD, pos, COS, SIN, gmask[:, None], HD)
        k_new = _rope_head(Q + (n_heads + kvh) * HD + tl.zeros((1, 1), tl.int32), pos, COS, SIN, mine, HD)
        v_new = tl.load(Q + (n_heads + n_kv + kvh) * HD + d[None, :], mask=mine, other=0.0)
        if owner:
            tl.store(K + kvh * stride_kh + pos * HD + d[None, :], k_new)
            tl.store(V + kvh * stride_kh + pos * HD + d[None, :], v_new)
    else:
        q = tl.load(Q + heads[:, None] * HD + d[None, :], mask=gmask[:, None], other=0.0)
    m = tl.full((GROUP_PAD,), -1e30, tl.float32)
    l = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HD), tl.float32)
    stop = end
    if ROPE:
        if owner:      # the softmax starts from the new token (from registers); the tiles stop before it
            stop = pos
            m = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), axis=1) * sm_scale
            l = tl.full((GROUP_PAD,), 1.0, tl.float32)
            acc = acc + v_new.to(tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < stop
        kv_off = kvh * stride_kh + n[:, None] * HD + d[None, :]
        k = tl.load(K + kv_off, mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * sm_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(V + kv_off, mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    has = l > 0
    out = acc / tl.where(has, l, 1.0)[:, None]
    if N_SPLITS == 1:
        tl.store(OUT + heads[:, None] * HD + d[None, :], out.to(OUT.dtype.element_ty), mask=gmask[:, None])
    else:
        lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))   # empty split: weight 0
        tl.store(O_PART + (heads[:, None] * N_SPLITS + split) * HD + d[None, :], out, mask=gmask[:, None])
        tl.store(LSE_PART + heads * N_SPLITS + split, lse, mask=gmask)


@triton.jit
def _decode_attn_reduce_kernel(O_PART, LSE_PART, OUT, n_heads, HD: tl.constexpr, N_SPLITS: tl.constexpr,
                               USE_PDL: tl.constexpr):
    _pdl_start(USE_PDL)
    _pdl_wait(USE_PDL)
    h = tl.program_id(0) + tl.program_id(1) * n_heads       # (head, row)
    sp = tl.arange(0, N_SPLITS)
    d = tl.arange(0, HD)
    lse = tl.load(LSE_PART + h * N_SPLITS + sp)
    w = tl.exp(lse - tl.max(lse, axis=0))
    o = tl.load(O_PART + (h * N_SPLITS + sp[:, None]) * HD + d[None, :])
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(OUT + h * HD + d, out.to(OUT.dtype.element_ty))


ATTN_SPLITS = 16      # most programs per kv head and row (power of 2), each taking 1/splits of the live length
ATTN_BLOCK_N = 32     # positions per tile of the default launch shape
ATTN_WARPS = 4        # warps per program of the default launch shape
ATTN_STAGES = 3       # software-pipelined KV tiles in flight (cp.async) per program
ATTN_SHAPE = (ATTN_SPLITS, ATTN_BLOCK_N, ATTN_WARPS, ATTN_STAGES)   # the launch shape without a KernelPlan


def attention_scratch(rows: int, H: int, hd: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split attention's partial outputs and log-sum-exps for up to `rows` rows: allocated once per model,
    outside any graph, so every captured graph points at the same live buffers."""
    return (torch.empty((rows, H, ATTN_SPLITS, hd), device=device, dtype=torch.float32),
            torch.empty((rows, H, ATTN_SPLITS), device=device, dtype=torch.float32))


def _decode_attention(q_or_qkv, k_cache, v_cache, kv_len, sm_scale, H, hd, cos=None, sin=None, slots=None,
                      pdl=False, scratch=None, shape=ATTN_SHAPE):
    B = q_or_qkv.shape[0]
    slots, stride_kh, stride_slot = _slot_view(k_cache, slots)
    n_kv = k_cache.shape[-3]
    group = H // n_kv
    n_splits, block_n, warps, stages = shape
    dev = q_or_qkv.device
    o_part, lse_part = scratch if scratch is not None else attention_scratch(B, H, hd, dev)
    assert o_part.shape[0] >= B and 1 <= n_splits <= ATTN_SPLITS and n_splits & (n_splits - 1) == 0
    out = torch.empty((B, H, hd), device=dev, dtype=q_or_qkv.dtype)
    rope = cos is not None
    q2 = q_or_qkv.reshape(B, -1)
    pdl = _pdl(pdl, B)
    _decode_attn_split_kernel[(n_kv, n_splits, B)](
        q2, k_cache, v_cache, kv_len, slots, o_part, lse_part, out, q2.stride(0), stride_kh, stride_slot, sm_scale,
        cos if rope else q2, sin if rope else q2, H, n_kv,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HD=hd,
        BLOCK_N=block_n, N_SPLITS=n_splits, ROPE=rope, USE_PDL=pdl, launch_pdl=pdl, num_warps=warps, num_stages=stages)
    if n_splits > 1:
        _decode_attn_reduce_kernel[(H, B)](o_part, lse_part, out, H, HD=hd, N_SPLITS=n_splits, USE_PDL=pdl,
                                           launch_pdl=pdl, num_warps=4)
    return out


def decode_attention(q, k_cache, v_cache, kv_len, sm_scale, slots=None, pdl=False, scratch=None, shape=ATTN_SHAPE):
    """q (B, H, hd), already rotated, its K/V already in the cache; kv_len (B,) and slots (B,) device tensors.
    shape: (splits, BLOCK_N, warps, stages) of the launch (KernelPlan.attention_shape)."""
    return _decode_attention(q, k_cache, v_cache, kv_len, sm_scale, q.shape[1], q.shape[2], slots=slots, pdl=pdl,
                             scratch=scratch, shape=shape)


def decode_rope_attention(qkv, cos, sin, k_cache, v_cache, kv_len, n_heads, hd, sm_scale, slots=None, pdl=False,
                          scratch=None, shape=ATTN_SHAPE):
    """B decode rows' attention from their fused qkv rows (B, (H + 2 KV) hd), row b at position kv_len[b] - 1 of
    slot slots[b]: rope, its K/V into the slot and the split attention in one launch, then the reduce (none at one split).
    Returns (B, H, hd)."""
    return _decode_attention(qkv, k_cache, v_cache, kv_len, sm_scale, n_heads, hd, cos, sin, slots, pdl, scratch,
                             shape)
