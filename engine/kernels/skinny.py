"""The skinny matmul: the one-row GEMV of decode and the tensor-core tiles of up to 64 rows."""
from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from .launch import _pdl, _pdl_start, _pdl_wait


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
# 17-64 rows (prefill bucket 32, decode rows at every batch size >= 2): one pinned tile per weight shape, no
# autotuning (the autotuner's Python-launched timings picked tiles that lost inside graphs), chosen by a CUDA-graph
# sweep (bench/skinny_tiles.py, docs/decisions/kernels.md). A tile per shape, not per batch size, keeps a row's
# arithmetic the same whatever the batch size. Wide weights: 64 rows per program; narrow ones (N < 8192): 32 rows
# with longer K chunks, so the grid still fills the GPU.
_ROWS64_WIDE = triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "WX": True}, num_warps=4, num_stages=4)
_ROWS64_NARROW = triton.Config({"BLOCK_N": 32, "BLOCK_K": 256, "WX": True}, num_warps=4, num_stages=4)
_ROWS64_CONFIGS = [_ROWS64_WIDE, _ROWS64_NARROW]
# [gate | up] (SwiGLU): two weight tiles per stage
_ROWS64_SWIGLU_CONFIGS = [triton.Config({"BLOCK_N": 32, "BLOCK_K": 128, "WX": True}, num_warps=4, num_stages=4)]


def _prune_configs(configs, named_args, **kwargs):
    """The autotuner tries only the configs of its row count (configs set from outside, as the interpreter
    tests do, are all tried)."""
    bm = kwargs.get("BLOCK_M")
    wide = _ROWS64_SWIGLU_CONFIGS if kwargs.get("SWIGLU") else \
        [_ROWS64_WIDE if named_args.get("N", 0) >= 8192 else _ROWS64_NARROW]
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
