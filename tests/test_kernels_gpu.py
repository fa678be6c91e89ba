"""GPU checks of the split-K GEMV + residual/RMSNorm kernels against the torch reference composition
(run on the device machine: pytest -m gpu)."""
from __future__ import annotations

import pytest
import torch

from engine import ops

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPES = [(4096, 4096), (4096, 11008), (1000, 300)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make(M: int, N: int, K: int, gated: bool, seed: int, dt=torch.float16):
    """x, w, r as views into NaN-poisoned buffers (rows past M of x and r, rows past N of w), plus ln."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    xw = 2 * K if gated else K
    xbuf = torch.full((16 + 3, xw), float("nan"), device="cuda", dtype=dt)
    xbuf[:M] = torch.randn(M, xw, device="cuda", dtype=dt, generator=g)
    wbuf = torch.full((N + 37, K), float("nan"), device="cuda", dtype=dt)
    wbuf[:N] = torch.randn(N, K, device="cuda", dtype=dt, generator=g) * 0.02
    rbuf = torch.full((16 + 3, N), float("nan"), device="cuda", dtype=dt)
    rbuf[:M] = torch.randn(M, N, device="cuda", dtype=dt, generator=g)
    ln = 1 + 0.1 * torch.randn(N, device="cuda", dtype=dt, generator=g)
    return xbuf[:M], wbuf[:N], rbuf[:M], ln, (xbuf, wbuf, rbuf)


def reference(x, w, r, ln, gated):
    """The composition of the existing ops, on a copy of r: (out, r after)."""
    ops.use_triton(False)
    try:
        rr = r.clone()
        return ops.linear_add_rms_norm(x, w, rr, ln, 1e-5, gated=gated), rr
    finally:
        ops.use_triton(True, fused_gemv_norm=True)


def poison_allocator(n_floats: int) -> None:
    """Leave NaN in the caching allocator's free blocks (best effort): the kernels' scratch starts as junk."""
    junk = torch.full((n_floats,), float("nan"), device="cuda", dtype=torch.float32)
    del junk


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("M", [1, 5, 16])
def test_linear_add_rms_norm_matches_reference(M, gated):
    ops.use_triton(True, fused_gemv_norm=True)
    for N, K in SHAPES:
        x, w, r, ln, bufs = make(M, N, K, gated, seed=M * 7 + gated)
        ref, ref_r = reference(x, w, r, ln, gated)
        ptr = r.data_ptr()
        poison_allocator(8 * 16 * N)
        out = ops.linear_add_rms_norm(x, w, r, ln, 1e-5, gated=gated)
        assert r.data_ptr() == ptr                                       # r updated in place
        assert not out.isnan().any() and not r.isnan().any(), (N, K)
        assert rel_err(out, ref) < 2e-3 and rel_err(r, ref_r) < 2e-3, (N, K)
        xbuf, wbuf, rbuf = bufs
        assert xbuf[M:].isnan().all() and wbuf[N:].isnan().all() and rbuf[M:].isnan().all()   # not written


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("M", [1, 5, 16])
def test_every_split_k(M, gated):
    """SPLIT_K forced to 1, 2, 4, 8, including splits whose K-range is empty (K = 300)."""
    from engine import kernels

    for N, K in SHAPES:
        x, w, r0, ln, _ = make(M, N, K, gated, seed=100 + M)
        ref, ref_r = reference(x, w, r0, ln, gated)
        for s in (1, 2, 4, 8):
            r = r0.clone()
            poison_allocator(8 * 16 * N)
            out = kernels.linear_add_rms_norm(x, w, r, ln, 1e-5, gated=gated, split_k=s)
            assert rel_err(out, ref) < 2e-3 and rel_err(r, ref_r) < 2e-3, (N, K, s)


def test_split_k_rule():
    from engine import kernels

    assert kernels.split_k_for(4096, 4096, 132) == 4 and kernels.split_k_for(4096, 11008, 132) == 4
    assert kernels.split_k_for(12288, 4096, 132) == 1 and kernels.split_k_for(32000, 4096, 132) == 1
    assert kernels.split_k_for(1000, 300, 132) == 1
    for N, K in SHAPES:
        assert kernels.split_k_for(N, K, kernels._num_sms(torch.device("cuda"))) in (1, 2, 4, 8)


def test_long_m_takes_the_composition():
    """M > 16 (prefill buckets): cuBLAS linear + the Triton add_rms_norm, exactly as before."""
    ops.use_triton(True, fused_gemv_norm=True)
    M, N, K = 17, 1000, 300
    g = torch.Generator(device="cuda").manual_seed(3)
    gu = torch.randn(M, 2 * K, device="cuda", dtype=torch.float16, generator=g)
    w = torch.randn(N, K, device="cuda", dtype=torch.float16, generator=g) * 0.02
    r = torch.randn(M, N, device="cuda", dtype=torch.float16, generator=g)
    ln = torch.randn(N, device="cuda", dtype=torch.float16, generator=g)
    r2 = r.clone()
    out = ops.linear_add_rms_norm(gu, w, r, ln, 1e-5, gated=True)
    expect = ops.add_rms_norm(ops.silu_mul(gu) @ w.t(), r2, ln, 1e-5)
    assert torch.equal(out, expect) and torch.equal(r, r2)


@pytest.mark.parametrize("gated", [False, True])
def test_graph_replay_matches_eager(gated):
    """The kernels run inside CUDA-graph capture: SPLIT_K is host-known, scratch comes from the graph pool."""
    ops.use_triton(True, fused_gemv_norm=True)
    N, K = 4096, 11008
    x, w, r0, ln, _ = make(1, N, K, gated, seed=9)
    r_eager = r0.clone()
    eager = ops.linear_add_rms_norm(x, w, r_eager, ln, 1e-5, gated=gated)      # also autotunes (warm-up)
    r = r0.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):                                                  # warm up on the side stream
        ops.linear_add_rms_norm(x, w, r.clone(), ln, 1e-5, gated=gated)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.linear_add_rms_norm(x, w, r, ln, 1e-5, gated=gated)
    r.copy_(r0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager) and torch.equal(r, r_eager)
