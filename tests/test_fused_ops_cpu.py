"""The ops the model is written in (norm_linear, linear_residual) on CPU are exactly the eager LLaMA
composition (the reference the CUDA fused GEMV is tested against in tests/test_kernels_gpu.py), and the
residual stream is updated in place."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import ops
from engine.plan import KernelPlan

REF = KernelPlan()


def _data(M: int, N: int, K: int, gated: bool, dtype: torch.dtype):
    g = torch.Generator().manual_seed(M * 10 + gated)
    x = torch.randn(M, 2 * K if gated else K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) * 0.05).to(dtype)
    r = torch.randn(M, N, generator=g).to(dtype)
    ln = (1 + 0.1 * torch.randn(K, generator=g)).to(dtype)
    return x, w, r, ln


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 5, 16, 17])
def test_norm_linear_is_rmsnorm_then_linear(M, dtype):
    x, w, _, ln, = _data(M, 96, 160, False, dtype)
    xf = x.float()
    normed = ln * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)  # HF LlamaRMSNorm
    assert torch.equal(ops.norm_linear(REF, x, ln, 1e-5, w), normed @ w.t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("M", [1, 5, 16, 17])
def test_linear_residual_adds_into_r_in_place(M, gated, dtype):
    x, w, r, _ = _data(M, 96, 160, gated, dtype)
    act = ops.silu_mul(REF, x) if gated else x         # the MLP's down projection reads silu(gate) * up
    if gated:
        gate, up = x.chunk(2, dim=-1)
        assert torch.equal(act, F.silu(gate) * up)
    expect = r + act @ w.t()
    ptr, before = r.data_ptr(), r.clone()
    assert ops.linear_residual(REF, act, w, r) is None
    assert r.data_ptr() == ptr and not torch.equal(r, before)
    assert torch.equal(r, expect)


def test_decode_attention_splits_until_the_gpu_is_full_and_one_shape_when_batch_invariant():
    """KernelPlan.attention_shape: from 2 rows, rows x kv heads x splits reach attn_programs (splits a power of 2,
    1..16), so more rows mean fewer splits; one row takes two programs per SM; 8-warp pipelined programs while they
    fit one wave at three per SM, 4-warp unpipelined ones past it; a batch-invariant plan keeps one shape at every
    row count."""
    plan = KernelPlan(triton=True, attn_programs=132)                    # an H200: 132 SMs
    assert [plan.attention_shape(b, 32)[0] for b in (1, 2, 3, 4, 8, 16, 32)] == [8, 2, 1, 1, 1, 1, 1]
    assert [plan.attention_shape(b, 8)[0] for b in (1, 2, 4, 8, 16, 32, 64)] == [16, 8, 4, 2, 1, 1, 1]
    assert plan.attention_shape(1, 32) == (8, 64, 4, 1)         # one row: two programs per SM, no pipeline
    assert plan.attention_shape(12, 32) == (1, 64, 8, 3)        # 384 programs: one wave at 3 per SM
    assert plan.attention_shape(13, 32) == plan.attention_shape(32, 32) == (1, 64, 4, 1)     # 416, 1,024: more
    for b in (3, 5, 32):
        s, n, w, st = plan.attention_shape(b, 8)
        assert (b * 8 * s <= 132 or s == 1) and (n, w, st) == (64, 8, 3)
    inv = KernelPlan(triton=True, attn_programs=132, batch_invariant=True)
    assert {inv.attention_shape(b, 32) for b in range(1, 65)} == {inv.attention_shape(1, 32)}
