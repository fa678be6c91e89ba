"""Triton kernels for the CUDA path. Imported only on CUDA (engine/ops.py).

Each kernel takes lengths and positions at run time (`do_not_specialize`), so one compiled binary
serves every prompt length: that is what lets an unseen bucket run at once (the JIT path) and
what the artifact store caches (Triton's cache dir) so a new replica compiles nothing.
"""
from __future__ import annotations

import dataclasses
import inspect

import torch
import triton
import triton.language as tl


def _pdl_supported() -> bool:
    """Programmatic dependent launch: Hopper or newer, and a Triton with griddepcontrol and `launch_pdl`."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda as tl_cuda
    except ImportError:
        return False
    return (hasattr(tl_cuda, "gdc_wait") and hasattr(tl_cuda, "gdc_launch_dependents")
            and "launch_pdl" in {f.name for f in dataclasses.fields(CUDAOptions)}
            and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9)


# Programmatic dependent launch (sm_90+): each kernel lets the next one launch early (gdc_launch_dependents)
# and waits for the previous one's writes (gdc_wait) before reading them; inside a graph these become
# programmatic edges. The engine's KernelPlan decides whether to use it (engine/plan.py); a launch uses it
# for at most PDL_ROWS rows (the decode step and the short prefill buckets).
PDL_SUPPORTED = _pdl_supported()
PDL_ROWS = 16


def _pdl(pdl: bool, rows: int) -> bool:
    return pdl and PDL_SUPPORTED and rows <= PDL_ROWS


@triton.jit
def _pdl_start(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _pdl_wait(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


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


@triton.jit(do_not_specialize=["L", "n_heads", "n_kv", "stride_qkv", "stride_kh", "stride_slot"])
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
    pos = tl.load(POS + tok, mask=tok < L, other=0)[:, None]
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


@triton.jit(do_not_specialize=["L", "n_heads", "n_kv", "stride_qkv", "stride_kh", "stride_slot", "sm_scale"])
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
    pos = tl.load(POS + t, mask=t < L, other=0)[:, None]
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


@triton.jit(do_not_specialize=["sm_scale", "stride_kh", "stride_slot", "stride_q", "n_heads", "n_kv"])
def _decode_attn_split_kernel(Q, K, V, LEN, SLOTS, O_PART, LSE_PART, stride_q, stride_kh, stride_slot, sm_scale,
                              COS, SIN, n_heads, n_kv, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                              HD: tl.constexpr, BLOCK_N: tl.constexpr, N_SPLITS: tl.constexpr, ROPE: tl.constexpr,
                              USE_PDL: tl.constexpr):
    """Flash-decoding, split over the sequence, one row (stream) per program_id(2). The row's valid length
    and KV slot come from device memory (one CUDA graph serves every position and slot; only valid KV is read)
    and so does the split size: the length is cut into N_SPLITS chunks of whole BLOCK_N tiles. Program
    (kv_head, split, row) attends the GROUP query heads sharing this kv head over its chunk.
    ROPE: Q holds the rows' fused qkv, not rotated q: each program rotates its q heads; only the program whose
    chunk holds the new token (position LEN - 1) rotates its k, takes it and its v from the row inside its tile
    loop and writes both into the slot (no rope kernel before this one)."""
    _pdl_start(USE_PDL)
    _pdl_wait(USE_PDL)
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    row = tl.program_id(2)
    length = tl.load(LEN + row)
    base = tl.load(SLOTS + row).to(tl.int64) * stride_slot
    K += base
    V += base
    Q += row * stride_q
    O_PART += row * n_heads * N_SPLITS * HD
    LSE_PART += row * n_heads * N_SPLITS
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
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < end
        kv_off = kvh * stride_kh + n[:, None] * HD + d[None, :]
        k = tl.load(K + kv_off, mask=valid[:, None], other=0.0)
        if ROPE:
            k = tl.where((n == pos)[:, None], k_new, k)
        s = tl.dot(q, tl.trans(k)) * sm_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(V + kv_off, mask=valid[:, None], other=0.0)
        if ROPE:
            v = tl.where((n == pos)[:, None], v_new, v)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    has = l > 0
    out = acc / tl.where(has, l, 1.0)[:, None]
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


ATTN_SPLITS = 16      # programs per kv head and row (power of 2); each takes 1/16 of the live length
ATTN_BLOCK_N = 32     # positions per tile


def attention_scratch(rows: int, H: int, hd: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split attention's partial outputs and log-sum-exps for up to `rows` rows: allocated once per model,
    outside any graph, so every captured graph points at the same live buffers."""
    return (torch.empty((rows, H, ATTN_SPLITS, hd), device=device, dtype=torch.float32),
            torch.empty((rows, H, ATTN_SPLITS), device=device, dtype=torch.float32))


def _decode_attention(q_or_qkv, k_cache, v_cache, kv_len, sm_scale, H, hd, cos=None, sin=None, slots=None,
                      pdl=False, scratch=None):
    B = q_or_qkv.shape[0]
    slots, stride_kh, stride_slot = _slot_view(k_cache, slots)
    n_kv = k_cache.shape[-3]
    group = H // n_kv
    n_splits, block_n = ATTN_SPLITS, ATTN_BLOCK_N
    dev = q_or_qkv.device
    o_part, lse_part = scratch if scratch is not None else attention_scratch(B, H, hd, dev)
    assert o_part.shape[0] >= B
    out = torch.empty((B, H, hd), device=dev, dtype=q_or_qkv.dtype)
    rope = cos is not None
    q2 = q_or_qkv.reshape(B, -1)
    pdl = _pdl(pdl, B)
    _decode_attn_split_kernel[(n_kv, n_splits, B)](
        q2, k_cache, v_cache, kv_len, slots, o_part, lse_part, q2.stride(0), stride_kh, stride_slot, sm_scale,
        cos if rope else q2, sin if rope else q2, H, n_kv,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HD=hd,
        BLOCK_N=block_n, N_SPLITS=n_splits, ROPE=rope, USE_PDL=pdl, launch_pdl=pdl, num_warps=4)
    _decode_attn_reduce_kernel[(H, B)](o_part, lse_part, out, H, HD=hd, N_SPLITS=n_splits, USE_PDL=pdl,
                                       launch_pdl=pdl, num_warps=4)
    return out


def decode_attention(q, k_cache, v_cache, kv_len, sm_scale, slots=None, pdl=False, scratch=None):
    """q (B, H, hd), already rotated, its K/V already in the cache; kv_len (B,) and slots (B,) device tensors."""
    return _decode_attention(q, k_cache, v_cache, kv_len, sm_scale, q.shape[1], q.shape[2], slots=slots, pdl=pdl,
                             scratch=scratch)


def decode_rope_attention(qkv, cos, sin, k_cache, v_cache, kv_len, n_heads, hd, sm_scale, slots=None, pdl=False,
                          scratch=None):
    """B decode rows' attention from their fused qkv rows (B, (H + 2 KV) hd), row b at position kv_len[b] - 1 of
    slot slots[b]: rope, its K/V into the slot and the split attention in one launch, then the reduce.
    Returns (B, H, hd)."""
    return _decode_attention(qkv, k_cache, v_cache, kv_len, sm_scale, n_heads, hd, cos, sin, slots, pdl, scratch)


# ------------------------------------------------------------------ skinny matmul (decode GEMV)
# Batch-1 decode is a matrix-vector product per weight: time = weight bytes / bandwidth. One program
# streams BLOCK_N full rows of W (contiguous, 16-byte loads, pipelined by num_stages) and keeps the
# dot products in registers; up to 32 rows of x (a short prefill bucket) share each weight load (tl.dot tiles below).
_ROW_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "WX": False}, num_warps=w, num_stages=s)
                for bn, bk, w, s in [(8, 512, 4, 4), (4, 1024, 4, 4), (8, 1024, 8, 3), (2, 2048, 8, 4),
                                     (2, 2048, 8, 3), (4, 2048, 4, 3), (2, 1024, 4, 4), (16, 512, 8, 3)]]
# 16 rows (prefill bucket 16): tl.dot tiles. WX puts the weight tile in the MMA's A operand (acc is
# (BLOCK_N, 16)), else x is A and BLOCK_N the MMA's N (docs/decisions/kernels.md: how the list was chosen).
_ROWS16_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "WX": wx}, num_warps=w, num_stages=s)
                   for bn, bk, wx, w, s in [(64, 128, True, 4, 6), (64, 128, True, 4, 4), (32, 128, False, 4, 4),
                                            (32, 256, True, 4, 4), (32, 256, False, 4, 4), (16, 256, False, 4, 4),
                                            (32, 256, False, 8, 3)]]
# 17-64 rows (prefill bucket 32, decode rows at every batch size >= 2): one pinned WX tile, no autotuning (the
# autotuner's Python-launched timings picked tiles that lost inside graphs: docs/decisions/kernels.md). One tile
# also makes a row's arithmetic the same whatever the batch size.
_ROWS64_CONFIGS = [triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "WX": True}, num_warps=4, num_stages=6)]
# the same tile streaming gate and up rows (SwiGLU): two weight tiles per stage, so fewer stages fit in shared memory
_ROWS64_SWIGLU_CONFIGS = [triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "WX": True}, num_warps=4, num_stages=4)]


def _prune_configs(configs, named_args, **kwargs):
    """The autotuner tries only the configs of its row count (configs set from outside, as the interpreter
    tests do, are all tried)."""
    bm = kwargs.get("BLOCK_M")
    wide = _ROWS64_SWIGLU_CONFIGS if kwargs.get("SWIGLU") else _ROWS64_CONFIGS
    want = _ROW_CONFIGS if bm == 1 else _ROWS16_CONFIGS if bm == 16 else wide
    return [c for c in configs if any(c is w for w in want)] or configs


# autotune results go to Triton's cache dir when this Triton supports it: the artifact store ships them
_AUTOTUNE_CACHE = ({"cache_results": True}
                   if "cache_results" in inspect.signature(triton.autotune).parameters else {})


@triton.jit
def _swiglu(g, u, dtype):
    """silu(g) * u of fp32 accumulators, rounded as the reference rounds them: g and u to the model dtype (the
    [gate | up] matmul's output), silu in fp32 rounded, times u."""
    gf = g.to(dtype).to(tl.float32)
    return (gf / (1.0 + tl.exp(-gf))).to(dtype) * u.to(dtype)


@triton.jit
def _row_chunk(acc, acc_u, ss, w, wu, X, LN, k, K, NORM: tl.constexpr, HAS_LN: tl.constexpr, SWIGLU: tl.constexpr):
    """One row: acc (BLOCK_N) += w (BLOCK_N, BLOCK_K) . act(x[k]) (SWIGLU: acc_u += wu . act(x[k]) too);
    NORM: ss += x^2, and x * LN feeds the dot (HAS_LN; else the norm weight is folded into w)."""
    x = tl.load(X + k, mask=k < K, other=0.0).to(tl.float32)
    if NORM:
        ss += x * x
        if HAS_LN:
            x = x * tl.load(LN + k, mask=k < K, other=0.0).to(tl.float32)
    if SWIGLU:
        acc_u += tl.sum(wu.to(tl.float32) * x[None, :], axis=1)
    return acc + tl.sum(w.to(tl.float32) * x[None, :], axis=1), acc_u, ss


@triton.jit
def _rows_chunk(acc, acc_u, ss, w, wu, X, LN, m, mmask, k, K, NORM: tl.constexpr, HAS_LN: tl.constexpr,
                WX: tl.constexpr, SWIGLU: tl.constexpr):
    """Up to 16 rows on the tensor cores: acc (BLOCK_M, BLOCK_N) += act(x[m, k]) @ w.T, or with WX its
    transpose acc (BLOCK_N, BLOCK_M) += w @ act(x[m, k]).T; SWIGLU: acc_u the same with wu; NORM as above."""
    x = tl.load(X + m[:, None] * K + k[None, :], mask=mmask[:, None] & (k[None, :] < K), other=0.0)
    if NORM:
        xf = x.to(tl.float32)
        ss += tl.sum(xf * xf, axis=1)
        if HAS_LN:
            xf = xf * tl.load(LN + k, mask=k < K, other=0.0).to(tl.float32)[None, :]
        x = xf.to(w.dtype)
    if WX:   # one return: Triton compiles every return of a function, a constexpr branch's too
        acc = acc + tl.dot(w, tl.trans(x))
        if SWIGLU:
            acc_u = acc_u + tl.dot(wu, tl.trans(x))
    else:
        acc = acc + tl.dot(x, tl.trans(w))
        if SWIGLU:
            acc_u = acc_u + tl.dot(x, tl.trans(wu))
    return acc, acc_u, ss


# restore_value: autotuning runs every config on the live arguments, and with RES each run adds into Y
@triton.autotune(configs=_ROW_CONFIGS + _ROWS16_CONFIGS + _ROWS64_CONFIGS + _ROWS64_SWIGLU_CONFIGS,
                 key=["N", "K", "BLOCK_M", "NORM", "HAS_LN", "RES", "SWIGLU"],
                 prune_configs_by={"early_config_prune": _prune_configs}, restore_value=["Y"], **_AUTOTUNE_CACHE)
@triton.jit(do_not_specialize=["M", "eps"])
def _skinny_kernel(X, LN, W, Y, M, N, K, eps, BLOCK_M: tl.constexpr, NORM: tl.constexpr, HAS_LN: tl.constexpr,
                   RES: tl.constexpr, SWIGLU: tl.constexpr, USE_PDL: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WX: tl.constexpr):
    """Y = act(x) @ W.T for M <= 64 rows (the engine: up to KernelPlan.skinny_max_rows). Every program walks all of K,
    so it sees each row of x whole:
    NORM: the RMSNorm of x runs inside the K loop (x * LN feeds the dot, or x alone when the norm weight
          is folded into W (HAS_LN False); sum(x^2) accumulates beside it, the dot is scaled by rstd at the
          end): no norm kernel, no normed copy of x. One row only in the engine (at 16 rows every program
          would redo the x-side work, and x changed in registers cannot feed the tensor cores from the
          async copy pipeline).
    RES:  Y is the residual stream: Y += result in place (rounded as the eager model rounds r + y).
    SWIGLU: W is [gate | up] (2N rows) and Y = silu(x @ gate.T) * (x @ up.T) (N columns): each program
          streams its BLOCK_N gate rows and the same BLOCK_N up rows and applies the SiLU in its epilogue,
          so the down projection reads a plain activation (no SiLU kernel, no SiLU in its loads).
    One row (decode): the first two weight chunks load before the PDL wait (they do not depend on the
    previous kernel; with BLOCK_K = 2048 that is all of a 4096-wide row), x, LN and Y after it, the rest
    of K through the pipelined loop. More rows: the plain pipelined loop after the wait."""
    _pdl_start(USE_PDL)
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    k0 = tl.arange(0, BLOCK_K)
    WU = W + N * K          # SWIGLU: the up rows
    if BLOCK_M == 1:
        k1 = BLOCK_K + k0
        m0 = nmask[:, None] & (k0[None, :] < K)
        m1 = nmask[:, None] & (k1[None, :] < K)
        w0 = tl.load(W + n[:, None] * K + k0[None, :], mask=m0, other=0.0)
        w1 = tl.load(W + n[:, None] * K + k1[None, :], mask=m1, other=0.0)
        u0 = w0
        u1 = w1
        if SWIGLU:
            u0 = tl.load(WU + n[:, None] * K + k0[None, :], mask=m0, other=0.0)
            u1 = tl.load(WU + n[:, None] * K + k1[None, :], mask=m1, other=0.0)
        _pdl_wait(USE_PDL)
        acc = tl.zeros((BLOCK_N,), tl.float32)
        acc_u = tl.zeros((BLOCK_N,), tl.float32)
        ss = tl.zeros((BLOCK_K,), tl.float32)
        acc, acc_u, ss = _row_chunk(acc, acc_u, ss, w0, u0, X, LN, k0, K, NORM, HAS_LN, SWIGLU)
        acc, acc_u, ss = _row_chunk(acc, acc_u, ss, w1, u1, X, LN, k1, K, NORM, HAS_LN, SWIGLU)
        for kb in range(BLOCK_K + BLOCK_K, K, BLOCK_K):
            k = kb + k0
            mk = nmask[:, None] & (k[None, :] < K)
            w = tl.load(W + n[:, None] * K + k[None, :], mask=mk, other=0.0)
            wu = w
            if SWIGLU:
                wu = tl.load(WU + n[:, None] * K + k[None, :], mask=mk, other=0.0)
            acc, acc_u, ss = _row_chunk(acc, acc_u, ss, w, wu, X, LN, k, K, NORM, HAS_LN, SWIGLU)
        if NORM:
            rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
            acc = acc * rstd
            acc_u = acc_u * rstd
        if SWIGLU:
            y = _swiglu(acc, acc_u, Y.dtype.element_ty)
        else:
            y = acc.to(Y.dtype.element_ty)
        if RES:
            y = (y + tl.load(Y + n, mask=nmask, other=0.0)).to(Y.dtype.element_ty)
        tl.store(Y + n, y, mask=nmask)
    else:
        _pdl_wait(USE_PDL)
        m = tl.arange(0, BLOCK_M)
        mmask = m < M
        if WX:
            acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc_u = acc
        ss = tl.zeros((BLOCK_M,), tl.float32)
        for kb in range(0, K, BLOCK_K):
            k = kb + k0
            mk = nmask[:, None] & (k[None, :] < K)
            w = tl.load(W + n[:, None] * K + k[None, :], mask=mk, other=0.0)
            wu = w
            if SWIGLU:
                wu = tl.load(WU + n[:, None] * K + k[None, :], mask=mk, other=0.0)
            acc, acc_u, ss = _rows_chunk(acc, acc_u, ss, w, wu, X, LN, m, mmask, k, K, NORM, HAS_LN, WX, SWIGLU)
        if WX:
            acc = tl.trans(acc)
            acc_u = tl.trans(acc_u)
        if NORM:
            rstd = (1.0 / tl.sqrt(ss / K + eps))[:, None]
            acc = acc * rstd
            acc_u = acc_u * rstd
        ptrs = Y + m[:, None] * N + n[None, :]
        ymask = mmask[:, None] & nmask[None, :]
        if SWIGLU:
            y = _swiglu(acc, acc_u, Y.dtype.element_ty)
        else:
            y = acc.to(Y.dtype.element_ty)
        if RES:
            y = (y + tl.load(ptrs, mask=ymask, other=0.0)).to(Y.dtype.element_ty)
        tl.store(ptrs, y, mask=ymask)


def skinny_matmul(x: torch.Tensor, w: torch.Tensor, ln: torch.Tensor | None = None, eps: float = 0.0,
                  residual: torch.Tensor | None = None, swiglu: bool = False, norm: bool = False,
                  block_m: int | None = None, pdl: bool = False) -> torch.Tensor:
    """x (M <= 64, K) contiguous; w (N, K) contiguous. Returns rms_norm(x) * ln @ w.T (M, N) if ln is given
    (norm=True without ln: rms_norm(x) alone, its weight folded into w), else x @ w.T; with residual (M, N)
    contiguous: residual += that, in place, and returns residual. swiglu: w is [gate | up] (2N, K) and the result
    silu(x' @ gate.T) * (x' @ up.T) (M, N). block_m: the row tile (>= M) instead of the smallest that holds M:
    one tile for every batch size keeps each row's arithmetic the same whatever shares it. One launch."""
    M = x.shape[0]
    N, K = w.shape
    if swiglu:
        assert N % 2 == 0
        N //= 2
    assert M <= 64 and x.shape[1] == K and x.is_contiguous() and w.is_contiguous()
    if residual is None:
        y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    else:
        assert residual.shape == (M, N) and residual.is_contiguous()
        y = residual
    bm = block_m or (1 if M == 1 else max(16, triton.next_power_of_2(M)))
    assert bm >= M
    pdl = _pdl(pdl, M)
    _skinny_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](
        x, ln if ln is not None else w, w, y, M, N, K, eps, BLOCK_M=bm,
        NORM=ln is not None or norm, HAS_LN=ln is not None, RES=residual is not None,
        SWIGLU=swiglu, USE_PDL=pdl, launch_pdl=pdl)
    return y
