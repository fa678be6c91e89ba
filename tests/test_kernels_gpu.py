"""GPU checks of the fused GEMV (engine.kernels.skinny_matmul: RMSNorm in its loads, residual add in its
epilogue, silu(gate) * up in its loads) against the torch reference composition (run on the device
machine: pytest -m gpu)."""
from __future__ import annotations

import pytest
import torch

from engine import ops

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPES = [(12288, 4096), (4096, 11008), (1000, 300)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make(M: int, N: int, K: int, gated: bool, seed: int, dt=torch.float16):
    """x, w, r as views into NaN-poisoned buffers (rows past M of x and r, rows past N of w), plus ln (K)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    xw = 2 * K if gated else K
    xbuf = torch.full((16 + 3, xw), float("nan"), device="cuda", dtype=dt)
    xbuf[:M] = torch.randn(M, xw, device="cuda", dtype=dt, generator=g)
    wbuf = torch.full((N + 37, K), float("nan"), device="cuda", dtype=dt)
    wbuf[:N] = torch.randn(N, K, device="cuda", dtype=dt, generator=g) * 0.02
    rbuf = torch.full((16 + 3, N), float("nan"), device="cuda", dtype=dt)
    rbuf[:M] = torch.randn(M, N, device="cuda", dtype=dt, generator=g)
    ln = 1 + 0.1 * torch.randn(K, device="cuda", dtype=dt, generator=g)
    return xbuf[:M], wbuf[:N], rbuf[:M], ln, (xbuf, wbuf, rbuf)


def reference(fn):
    ops.use_triton(False)
    try:
        return fn()
    finally:
        ops.use_triton(True, skinny_matmul=True, fused_gemv_norm=True)


@pytest.mark.parametrize("M", [1, 5, 16])
def test_norm_linear_matches_reference(M):
    ops.use_triton(True, skinny_matmul=True, fused_gemv_norm=True)
    for N, K in SHAPES:
        x, w, _, ln, (xbuf, wbuf, _) = make(M, N, K, False, seed=M * 7)
        ref = reference(lambda: ops.norm_linear(x, ln, 1e-5, w))
        out = ops.norm_linear(x, ln, 1e-5, w)
        assert out.shape == (M, N) and not out.isnan().any(), (N, K)
        assert rel_err(out, ref) < 2e-3, (N, K)
        assert xbuf[M:].isnan().all() and wbuf[N:].isnan().all()                      # not read into out


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("M", [1, 5, 16])
def test_linear_residual_matches_reference(M, gated):
    ops.use_triton(True, skinny_matmul=True, fused_gemv_norm=True)
    for N, K in SHAPES:
        x, w, r, ln, (xbuf, wbuf, rbuf) = make(M, N, K, gated, seed=M * 7 + gated)
        r_ref = r.clone()
        reference(lambda: ops.linear_residual(x, w, r_ref, gated=gated))
        ptr, before = r.data_ptr(), r.clone()
        ops.linear_residual(x, w, r, gated=gated)
        assert r.data_ptr() == ptr and not torch.equal(r, before)                     # r updated in place
        assert not r.isnan().any() and rel_err(r, r_ref) < 2e-3, (N, K)
        assert rbuf[M:].isnan().all() and xbuf[M:].isnan().all()                      # nothing else written


def test_unfused_norm_and_long_m_take_the_composition():
    """fused_gemv_norm off, or more than one row (prefill buckets): the RMSNorm kernel, then the matmul."""
    g = torch.Generator(device="cuda").manual_seed(3)
    for M, fused in ((1, False), (5, True), (17, True)):
        ops.use_triton(True, skinny_matmul=True, fused_gemv_norm=fused)
        x = torch.randn(M, 300, device="cuda", dtype=torch.float16, generator=g)
        w = torch.randn(1000, 300, device="cuda", dtype=torch.float16, generator=g) * 0.02
        ln = torch.randn(300, device="cuda", dtype=torch.float16, generator=g)
        assert torch.equal(ops.norm_linear(x, ln, 1e-5, w), ops.linear(ops.rms_norm(x, ln, 1e-5), w))
    ops.use_triton(True, skinny_matmul=True, fused_gemv_norm=True)


@pytest.mark.parametrize("kind", ["norm", "res", "gated"])
def test_graph_replay_matches_eager(kind):
    """The fused GEMV inside CUDA-graph capture gives the eager result (the residual from the replay's r)."""
    ops.use_triton(True, skinny_matmul=True, fused_gemv_norm=True)
    N, K = 4096, 11008
    x, w, r0, ln, _ = make(1, N, K, kind == "gated", seed=9)

    def op(r):
        if kind == "norm":
            return ops.norm_linear(x, ln, 1e-5, w)
        ops.linear_residual(x, w, r, gated=kind == "gated")
        return r

    r_eager = r0.clone()
    eager = op(r_eager).clone()                                                    # also autotunes
    r = r0.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):                                                     # warm up on the side stream
        op(r.clone())
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(r)
    r.copy_(r0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def test_pdl_chain_in_a_graph_matches_plain_launches():
    """A decoder layer's kernels (norm+qkv GEMV, rope + KV write, split attention + reduce, o GEMV into the
    residual, norm+gate_up GEMV, gated down GEMV into the residual) captured in one CUDA graph: with
    programmatic dependent launch (each kernel starts under its predecessor's tail and loads weights before
    waiting for it) the replays give exactly what plain stream-ordered launches give, every time."""
    from engine import kernels
    if not kernels.PDL:
        pytest.skip("PDL needs sm_90+ and a Triton with griddepcontrol")
    ops.use_triton(True, skinny_matmul=True, fused_gemv_norm=True)
    g = torch.Generator(device="cuda").manual_seed(11)
    H, KV, hd, D, I, T = 32, 8, 128, 4096, 11008, 512
    dt = torch.float16
    rnd = lambda *s: torch.randn(*s, device="cuda", dtype=dt, generator=g)   # noqa: E731
    w_qkv, w_o = rnd((H + 2 * KV) * hd, D) * 0.02, rnd(D, H * hd) * 0.02
    w_gu, w_down = rnd(2 * I, D) * 0.02, rnd(D, I) * 0.02
    ln1, ln2 = 1 + 0.1 * rnd(D), 1 + 0.1 * rnd(D)
    ang = torch.rand(T, hd // 2, device="cuda", generator=g) * 6.3
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dt), torch.cat([ang.sin()] * 2, -1).to(dt)
    k0, v0 = rnd(KV, T, hd), rnd(KV, T, hd)
    x0 = rnd(1, D)
    pos = torch.tensor([200], device="cuda")
    kv_len = pos + 1

    def layer(x, kc, vc):
        qkv = ops.norm_linear(x, ln1, 1e-5, w_qkv)
        q = ops.rope_and_cache(qkv, pos, cos, sin, kc, vc, H, KV, hd)
        a = ops.decode_attention(q, kc, vc, kv_len, hd ** -0.5)
        ops.linear_residual(a.reshape(1, H * hd), w_o, x)
        ops.linear_residual(ops.norm_linear(x, ln2, 1e-5, w_gu), w_down, x, gated=True)
        return x

    def run(pdl: bool, replays: int) -> list[torch.Tensor]:
        kernels.PDL = pdl
        bufs = [x0.clone(), k0.clone(), v0.clone()]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):                       # autotune + compile outside the capture
                layer(x0.clone(), k0.clone(), v0.clone())
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(*bufs)
        outs = []
        for _ in range(replays):
            for b, b0 in zip(bufs, (x0, k0, v0)):
                b.copy_(b0)
            graph.replay()
            outs.append(torch.cat([out.flatten(), bufs[1][:, 200].flatten(), bufs[2][:, 200].flatten()]).clone())
        torch.cuda.synchronize()
        return outs

    try:
        plain = run(False, 1)[0]
        pdl = run(True, 20)
    finally:
        kernels.PDL = kernels._pdl_supported()
    assert not plain.isnan().any()
    for o in pdl:
        assert torch.equal(o, plain)


@pytest.mark.parametrize("H,KV", [(32, 32), (32, 8)])
def test_short_prefill_attention_matches_rope_then_sdpa(H, KV):
    """The one-kernel short prefill (rope + KV write + causal attention, buckets <= 64 tokens) against the
    rope kernel then SDPA, eagerly and replayed from a CUDA graph: same output, same cache rows, the cache
    past the L written rows untouched (NaN poison stays)."""
    from engine import kernels
    g = torch.Generator(device="cuda").manual_seed(H + KV)
    hd, T, dt = 128, 256, torch.float16
    ang = torch.rand(T, hd // 2, device="cuda", generator=g) * 6.3
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dt), torch.cat([ang.sin()] * 2, -1).to(dt)
    for L in (1, 7, 16, 37, 64):            # 16-row tiles (4 warps), 64-row tiles (8 warps)
        qkv = torch.randn(L, (H + 2 * KV) * hd, device="cuda", dtype=dt, generator=g)
        pos = torch.arange(L, device="cuda")
        kc, vc = (torch.full((KV, T, hd), float("nan"), device="cuda", dtype=dt) for _ in range(2))
        kr, vr = kc.clone(), vc.clone()
        out = kernels.short_prefill_attention(qkv, pos, cos, sin, kc, vc, H, KV, hd, hd ** -0.5)
        q = ops.rope_and_cache(qkv, pos, cos, sin, kr, vr, H, KV, hd)
        ref = ops.prefill_attention(q, kr, vr, L, hd ** -0.5)
        assert not out.isnan().any() and rel_err(out, ref) < 2e-3, L
        assert rel_err(kc[:, :L], kr[:, :L]) < 1e-3 and torch.equal(vc[:, :L], vr[:, :L]), L
        assert kc[:, L:].isnan().all() and vc[:, L:].isnan().all(), L
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_g = kernels.short_prefill_attention(qkv, pos, cos, sin, kc, vc, H, KV, hd, hd ** -0.5)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out_g, out), L


@pytest.mark.parametrize("decode,prefill", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("M", [1, 5, 16])
def test_mlp_residual_matches_reference(M, decode, prefill, monkeypatch):
    """The MLP block with the SiLU in the gate/up GEMV's epilogue (SWIGLU_*) or in the down GEMV's loads / a
    SiLU kernel: r updated in place to the reference composition's result."""
    monkeypatch.setattr(ops, "SWIGLU_DECODE", decode)
    monkeypatch.setattr(ops, "SWIGLU_PREFILL", prefill)
    ops.use_triton(True, skinny_matmul=True, fused_gemv_norm=True)
    g = torch.Generator(device="cuda").manual_seed(M)
    D, I = 4096, 11008
    r = torch.randn(M, D, device="cuda", dtype=torch.float16, generator=g)
    ln = 1 + 0.1 * torch.randn(D, device="cuda", dtype=torch.float16, generator=g)
    w13 = torch.randn(2 * I, D, device="cuda", dtype=torch.float16, generator=g) * 0.02
    w2 = torch.randn(D, I, device="cuda", dtype=torch.float16, generator=g) * 0.02
    r_ref = r.clone()
    reference(lambda: ops.mlp_residual(r_ref, ln, 1e-5, w13, w2))
    ptr, before = r.data_ptr(), r.clone()
    ops.mlp_residual(r, ln, 1e-5, w13, w2)
    assert r.data_ptr() == ptr and not torch.equal(r, before)
    assert not r.isnan().any() and rel_err(r, r_ref) < 2e-3


@pytest.mark.parametrize("H,KV", [(32, 32), (32, 8)])
def test_decode_rope_attention_matches_rope_kernel_then_split_attention(H, KV):
    """Decode attention with the rope and the KV write inside the split kernel (ops.DECODE_ROPE_IN_ATTN)
    against the rope kernel then the split attention, eagerly and from one captured graph replayed at
    several positions (the position comes from device memory): same output, the same K/V row written at
    the position, the cache past it untouched (NaN poison stays)."""
    from engine import kernels
    g = torch.Generator(device="cuda").manual_seed(H + KV)
    hd, T, dt = 128, 1024, torch.float16
    ang = torch.rand(T, hd // 2, device="cuda", generator=g) * 6.3
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dt), torch.cat([ang.sin()] * 2, -1).to(dt)
    qkv = torch.empty(1, (H + 2 * KV) * hd, device="cuda", dtype=dt)
    pos = torch.zeros(1, device="cuda", dtype=torch.long)
    kv_len = torch.ones(1, device="cuda", dtype=torch.long)
    kc, vc = (torch.full((KV, T, hd), float("nan"), device="cuda", dtype=dt) for _ in range(2))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g = kernels.decode_rope_attention(qkv, cos, sin, kc, vc, kv_len, H, hd, hd ** -0.5)
    for p in (0, 5, 99, 700, T - 1):
        kc[:, :p] = torch.randn(KV, p, hd, device="cuda", dtype=dt, generator=g)
        vc[:, :p] = torch.randn(KV, p, hd, device="cuda", dtype=dt, generator=g)
        kc[:, p:], vc[:, p:] = float("nan"), float("nan")
        qkv.copy_(torch.randn(qkv.shape, device="cuda", dtype=dt, generator=g))
        pos.fill_(p)
        kv_len.fill_(p + 1)
        kr, vr = kc.clone(), vc.clone()
        q = kernels.rope_and_cache(qkv, pos, cos, sin, kr, vr, H, KV, hd)
        ref = kernels.decode_attention(q, kr, vr, kv_len, hd ** -0.5)
        ke, ve = kc.clone(), vc.clone()
        out = kernels.decode_rope_attention(qkv, cos, sin, ke, ve, kv_len, H, hd, hd ** -0.5)
        assert not out.isnan().any() and rel_err(out, ref) < 2e-3, p
        assert rel_err(ke[:, :p + 1], kr[:, :p + 1]) < 1e-3 and torch.equal(ve[:, :p + 1], vr[:, :p + 1]), p
        assert ke[:, p + 1:].isnan().all() and ve[:, p + 1:].isnan().all(), p
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out_g, out) and torch.equal(kc[:, :p + 1], ke[:, :p + 1]), p


@pytest.mark.parametrize("M", [1, 5, 16])
def test_folded_norm_matches_reference_and_replays_identically(M):
    """ops.FOLD_NORM at 7B shapes: the norm weight folded into the qkv and gate/up weights (W * ln along K);
    one row: the GEMV's in-loop norm without a weight, 5 / 16 rows: the weightless RMSNorm kernel, then the
    GEMV. Against the unfolded torch reference, eagerly and from a CUDA graph (PDL launches), identical
    over replays."""
    ops.use_triton(True, skinny_matmul=True, fused_gemv_norm=True)
    g = torch.Generator(device="cuda").manual_seed(40 + M)
    D, Nq, inter, dt = 4096, 6144, 11008, torch.float16
    rnd = lambda *s: torch.randn(*s, device="cuda", dtype=dt, generator=g)   # noqa: E731
    r = rnd(M, D)
    w_q, w13 = rnd(Nq, D) * 0.02, rnd(2 * inter, D) * 0.02
    ln = 1 + 0.2 * rnd(D)
    w_qf, w13f = (w_q.float() * ln.float()).to(dt), (w13.float() * ln.float()).to(dt)

    def folded():
        return ops.norm_linear(r, None, 1e-5, w_qf), ops.silu_mul(ops.norm_linear(r, None, 1e-5, w13f))

    q_ref, a_ref = reference(lambda: (ops.norm_linear(r, ln, 1e-5, w_q),
                                      ops.silu_mul(ops.norm_linear(r, ln, 1e-5, w13))))
    q, a = folded()
    assert rel_err(q, q_ref) < 3e-3 and rel_err(a, a_ref) < 3e-3
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        qg, ag = folded()
    outs = []
    for _ in range(10):
        graph.replay()
        outs.append(torch.cat([qg.flatten(), ag.flatten()]).clone())
    torch.cuda.synchronize()
    assert torch.equal(outs[0], torch.cat([q.flatten(), a.flatten()]))
    for o in outs:
        assert torch.equal(o, outs[0])


@pytest.mark.parametrize("M", [17, 32, 50, 64])
def test_wide_buckets_on_the_skinny_kernel_match_reference(M, monkeypatch):
    """SKINNY_MAX_ROWS raised to 64: 17-64 rows run on the skinny kernel's 32/64-row tiles (a BLOCK_M of 32 or 64 in
    the autotuner's cache proves it), plain and adding into the residual, with rows past M never read or written."""
    from engine import kernels
    monkeypatch.setattr(ops, "SKINNY_MAX_ROWS", 64)
    ops.use_triton(True, skinny_matmul=True, fused_gemv_norm=True)
    g = torch.Generator(device="cuda").manual_seed(M)
    for N, K in SHAPES:
        xbuf = torch.full((M + 3, K), float("nan"), device="cuda", dtype=torch.float16)
        xbuf[:M] = torch.randn(M, K, device="cuda", dtype=torch.float16, generator=g)
        rbuf = torch.full((M + 3, N), float("nan"), device="cuda", dtype=torch.float16)
        rbuf[:M] = torch.randn(M, N, device="cuda", dtype=torch.float16, generator=g)
        w = torch.randn(N, K, device="cuda", dtype=torch.float16, generator=g) * 0.02
        x, r = xbuf[:M], rbuf[:M]
        ref = reference(lambda: ops.linear(x, w))
        out = ops.linear(x, w)
        assert not out.isnan().any() and rel_err(out, ref) < 2e-3, (N, K)
        r_ref = r.clone()
        reference(lambda: ops.linear_residual(x, w, r_ref))
        ops.linear_residual(x, w, r)
        assert not r.isnan().any() and rel_err(r, r_ref) < 2e-3, (N, K)
        assert rbuf[M:].isnan().all() and xbuf[M:].isnan().all()
        bm = 32 if M <= 32 else 64
        assert any(k[0] == N and k[1] == K and k[2] == bm for k in kernels._skinny_kernel.cache), (N, K)
