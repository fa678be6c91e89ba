"""ops.linear_add_rms_norm on CPU is exactly the composition of the existing ops (the reference the
CUDA split-K kernels are tested against) and updates the residual in place."""
from __future__ import annotations

import pytest
import torch

from engine import ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("M", [1, 5, 16, 17])
def test_linear_add_rms_norm_is_the_composition(M, gated, dtype):
    g = torch.Generator().manual_seed(M)
    N, K = 96, 160
    x = torch.randn(M, 2 * K if gated else K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) * 0.05).to(dtype)
    r = torch.randn(M, N, generator=g).to(dtype)
    ln = (1 + 0.1 * torch.randn(N, generator=g)).to(dtype)
    r_expect = r.clone()
    act = ops.silu_mul(x) if gated else x
    expect = ops.add_rms_norm(ops.linear(act, w), r_expect, ln, 1e-5)
    # and spelled out: r += act @ w.T; rms_norm(r) * ln
    r_manual = r + act @ w.t()
    rf = r_manual.float()
    manual = ln * (rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    ptr, before = r.data_ptr(), r.clone()
    out = ops.linear_add_rms_norm(x, w, r, ln, 1e-5, gated=gated)
    assert r.data_ptr() == ptr and not torch.equal(r, before)
    assert torch.equal(out, expect) and torch.equal(r, r_expect)
    assert torch.equal(r, r_manual) and torch.equal(out, manual)
