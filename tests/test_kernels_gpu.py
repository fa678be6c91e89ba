"""GPU checks of the Triton kernels under a KernelPlan (engine.ops / engine.kernels) against the PyTorch
reference plan (KernelPlan()): the skinny GEMV/GEMM (RMSNorm in its loads, residual add and SiLU·up in its
epilogue, the fixed decode row tile), rope + KV write into a slot, the short prefill attention, the batched
split decode attention over KV slots, CUDA-graph replay and PDL (run on the device machine: pytest -m gpu)."""
from __future__ import annotations

import pytest
import torch

from engine import ops
from engine.plan import KernelPlan

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV, DT = "cuda", torch.float16
TRI = KernelPlan(triton=True, skinny=True, fused_norm=True, pdl=True)     # the engine's default CUDA plan
REF = KernelPlan()                                                          # the PyTorch reference
SHAPES = [(12288, 4096), (4096, 11008), (1000, 300)]
LAYER = dict(H=32, KV=8, hd=128, D=4096, I=11008)                          # LLaMA-2/3-7B-like decoder layer
EPS = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def rnd(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, device=DEV, dtype=DT, generator=g) * scale


def rope_tables(g: torch.Generator, T: int, hd: int) -> tuple[torch.Tensor, torch.Tensor]:
    ang = torch.rand(T, hd // 2, device=DEV, generator=g) * 6.3
    return torch.cat([ang.cos()] * 2, -1).to(DT), torch.cat([ang.sin()] * 2, -1).to(DT)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, NaN equal to NaN (poisoned cache regions)."""
    return a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def split_written(cache: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (slots + 1, kv, T, hd) cache as (rows at (slots[i], :, pos[i]) (n, kv, hd), every other row)."""
    m = torch.zeros(cache.shape[0], cache.shape[2], dtype=torch.bool, device=cache.device)
    m[slots, pos] = True
    c = cache.transpose(1, 2)
    return cache[slots, :, pos], c[~m]


def in_graph(fn):
    """fn() warmed up on a side stream (compile + autotune outside capture), then captured in a CUDA graph:
    returns (the graph's replay, fn's outputs inside the graph)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def make(M: int, N: int, K: int, seed: int):
    """x, w, r as views into NaN-poisoned buffers (rows past M of x and r, rows past N of w), plus ln (K)."""
    g = gen(seed)
    xbuf = torch.full((M + 3, K), float("nan"), device=DEV, dtype=DT)
    xbuf[:M] = rnd(g, M, K)
    wbuf = torch.full((N + 37, K), float("nan"), device=DEV, dtype=DT)
    wbuf[:N] = rnd(g, N, K, scale=0.02)
    rbuf = torch.full((M + 3, N), float("nan"), device=DEV, dtype=DT)
    rbuf[:M] = rnd(g, M, N)
    ln = 1 + 0.1 * rnd(g, K)
    return xbuf[:M], wbuf[:N], rbuf[:M], ln, (xbuf, wbuf, rbuf)


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("M", [1, 2, 5, 16, 32])
def test_norm_linear_matches_reference(M, decode):
    """Prefill rows (the GEMV with the norm in its loads at 1 row, the smallest tile holding M) and decode rows
    (the fixed 32-row tile at >= 2 rows) against the reference, rows past M never read."""
    for N, K in SHAPES:
        x, w, _, ln, (xbuf, wbuf, _) = make(M, N, K, seed=M * 7 + decode)
        ref = ops.norm_linear(REF, x, ln, EPS, w, decode)
        out = ops.norm_linear(TRI, x, ln, EPS, w, decode)
        assert out.shape == (M, N) and not out.isnan().any(), (N, K)
        assert rel_err(out, ref) < 2e-3, (N, K)
        assert xbuf[M:].isnan().all() and wbuf[N:].isnan().all()                      # not read into out


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("M", [1, 2, 5, 16, 32])
def test_linear_residual_matches_reference(M, decode):
    for N, K in SHAPES:
        x, w, r, _, (xbuf, _, rbuf) = make(M, N, K, seed=M * 7 + decode)
        r_ref = r.clone()
        ops.linear_residual(REF, x, w, r_ref, decode)
        ptr, before = r.data_ptr(), r.clone()
        ops.linear_residual(TRI, x, w, r, decode)
        assert r.data_ptr() == ptr and not torch.equal(r, before)                     # r updated in place
        assert not r.isnan().any() and rel_err(r, r_ref) < 2e-3, (N, K)
        assert rbuf[M:].isnan().all() and xbuf[M:].isnan().all()                      # nothing else written


def test_unfused_norm_and_more_rows_take_the_composition():
    """fused_norm off, or more than one row (prefill buckets, decode batches): the RMSNorm kernel, then the
    matmul, bit for bit."""
    g = gen(3)
    for M, plan, decode in ((1, KernelPlan(triton=True, skinny=True, fused_norm=False), False),
                            (5, TRI, False), (17, TRI, False), (5, TRI, True)):
        x, w, ln = rnd(g, M, 300), rnd(g, 1000, 300, scale=0.02), rnd(g, 300)
        assert torch.equal(ops.norm_linear(plan, x, ln, EPS, w, decode),
                           ops.linear(plan, ops.rms_norm(plan, x, ln, EPS), w, decode)), (M, decode)


@pytest.mark.parametrize("kind", ["norm", "res", "mlp"])
@pytest.mark.parametrize("M", [1, 5])
def test_graph_replay_matches_eager(kind, M):
    """The skinny kernel inside CUDA-graph capture gives the eager result (the residual from the replay's r)."""
    N, K = 4096, 11008
    x, w, r0, ln, _ = make(M, N, K, seed=9)
    g = gen(10)
    w13, w2 = rnd(g, 2 * K, N, scale=0.02), rnd(g, N, K, scale=0.02)         # the MLP of width N: r (M, N)

    def op(r):
        if kind == "norm":
            return ops.norm_linear(TRI, x, ln, EPS, w, True)
        if kind == "res":
            ops.linear_residual(TRI, x, w, r, True)
        else:
            ops.mlp_residual(TRI, r, None, EPS, w13, w2, True)
        return r

    r_eager = r0.clone()
    eager = op(r_eager).clone()                                                    # also autotunes
    r = r0.clone()
    replay, out = in_graph(lambda: op(r))
    r.copy_(r0)
    replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def layer_weights(seed: int) -> dict:
    """A decoder layer's weights at 7B shapes, norm weights folded (as engine/model.py loads them)."""
    g = gen(seed)
    H, KV, hd, D, I = (LAYER[k] for k in ("H", "KV", "hd", "D", "I"))
    return dict(wqkv=rnd(g, (H + 2 * KV) * hd, D, scale=0.02), wo=rnd(g, D, H * hd, scale=0.02),
                w13=rnd(g, 2 * I, D, scale=0.02), w2=rnd(g, D, I, scale=0.02))


def decode_layer(plan, lw, r, pos, slots, cos, sin, kc, vc):
    """One decoder layer's decode step over rows r (B, D), as engine/model.py runs it: norm + qkv, rope + KV write
    + split attention, o into the residual, norm + SiLU·up, down into the residual. Returns r."""
    H, KV, hd = LAYER["H"], LAYER["KV"], LAYER["hd"]
    qkv = ops.norm_linear(plan, r, None, EPS, lw["wqkv"], True)
    a = ops.decode_rope_attention(plan, qkv, pos, pos + 1, slots, cos, sin, kc, vc, H, KV, hd, hd ** -0.5)
    ops.linear_residual(plan, a.reshape(r.shape[0], -1), lw["wo"], r, True)
    ops.mlp_residual(plan, r, None, EPS, lw["w13"], lw["w2"], True)
    return r


def layer_inputs(seed: int, B: int, S: int = 8, T: int = 512):
    g = gen(seed)
    KV, hd = LAYER["KV"], LAYER["hd"]
    cos, sin = rope_tables(g, T, hd)
    kc, vc = rnd(g, S + 1, KV, T, hd), rnd(g, S + 1, KV, T, hd)
    slots = torch.randperm(S, device=DEV, generator=g)[:B]
    pos = torch.randint(0, T, (B,), device=DEV, generator=g)
    return rnd(g, B, LAYER["D"]), pos, slots, cos, sin, kc, vc


@pytest.mark.parametrize("B", [1])    # PDL_ROWS: PDL launches at one row only
def test_pdl_chain_in_a_graph_matches_plain_launches(B):
    """A decoder layer's decode kernels captured in one CUDA graph with programmatic dependent launch (the
    plan's pdl=True: each kernel starts under its predecessor's tail and loads weights before waiting for it)
    give exactly what the same plan without PDL gives, every replay: residual and the K/V rows written."""
    from engine import kernels
    if not kernels.PDL_SUPPORTED:
        pytest.skip("PDL needs sm_90+ and a Triton with griddepcontrol")
    lw = layer_weights(11)
    x0, pos, slots, cos, sin, k0, v0 = layer_inputs(12, B)

    def run(plan: KernelPlan, replays: int) -> list[torch.Tensor]:
        bufs = [x0.clone(), k0.clone(), v0.clone()]
        replay, out = in_graph(lambda: decode_layer(plan, lw, bufs[0], pos, slots, cos, sin, bufs[1], bufs[2]))
        outs = []
        for _ in range(replays):
            for b, b0 in zip(bufs, (x0, k0, v0)):
                b.copy_(b0)
            replay()
            outs.append(torch.cat([out.flatten(), bufs[1][slots, :, pos].flatten(),
                                   bufs[2][slots, :, pos].flatten()]).clone())
        torch.cuda.synchronize()
        return outs

    plain = run(KernelPlan(triton=True, skinny=True, fused_norm=True, pdl=False), 1)[0]
    with_pdl = run(TRI, 20)
    assert not plain.isnan().any()
    for o in with_pdl:
        assert torch.equal(o, plain)


@pytest.mark.parametrize("H,KV", [(32, 32), (32, 8)])
def test_short_prefill_attention_matches_rope_then_sdpa(H, KV):
    """The one-kernel short prefill (rope + KV write into its slot + causal attention, buckets <= 64 tokens)
    against the reference (rope, then SDPA), eagerly and replayed from a CUDA graph: same output, same cache
    rows in the slot, the slot past the L written rows and every other slot untouched (NaN poison stays).
    A 3-D (kv, T, hd) cache is one slot."""
    from engine import kernels
    g = gen(H + KV)
    hd, T, S = 128, 256, 4
    cos, sin = rope_tables(g, T, hd)
    for L, s in ((1, 0), (7, 3), (16, 1), (37, 2), (64, 3)):       # 16-row tiles (4 warps), 64-row tiles (8 warps)
        qkv = rnd(g, L, (H + 2 * KV) * hd)
        pos = torch.arange(L, device=DEV)
        slot = torch.tensor([s], device=DEV)
        kc, vc = (torch.full((S + 1, KV, T, hd), float("nan"), device=DEV, dtype=DT) for _ in range(2))
        kr, vr = torch.zeros_like(kc), torch.zeros_like(vc)
        out = kernels.short_prefill_attention(qkv, pos, cos, sin, kc, vc, H, KV, hd, hd ** -0.5, slot=slot)
        ref = ops.prefill_rope_attention(REF, qkv, pos, slot, cos, sin, kr, vr, H, KV, hd, hd ** -0.5)
        assert not out.isnan().any() and rel_err(out, ref) < 2e-3, L
        assert rel_err(kc[s, :, :L], kr[s, :, :L]) < 1e-3 and torch.equal(vc[s, :, :L], vr[s, :, :L]), L
        assert kc[s, :, L:].isnan().all() and vc[s, :, L:].isnan().all(), L
        others = torch.arange(S + 1, device=DEV) != s
        assert kc[others].isnan().all() and vc[others].isnan().all(), L
        replay, out_g = in_graph(
            lambda: kernels.short_prefill_attention(qkv, pos, cos, sin, kc, vc, H, KV, hd, hd ** -0.5, slot=slot))
        replay()
        torch.cuda.synchronize()
        assert torch.equal(out_g, out), L
        k3, v3 = (torch.full((KV, T, hd), float("nan"), device=DEV, dtype=DT) for _ in range(2))   # one slot, 3-D
        out3 = kernels.short_prefill_attention(qkv, pos, cos, sin, k3, v3, H, KV, hd, hd ** -0.5)
        assert torch.equal(out3, out) and same(k3, kc[s]) and same(v3, vc[s]), L


def test_rope_and_cache_writes_only_its_slot():
    """The rope + KV write kernel of the longer prefills, into a slot of the 4-D cache (and a 3-D one-slot cache):
    q and the rotated k equal the reference's, K/V rows land at slot `slot`, positions 0..L-1 only."""
    from engine import kernels
    g = gen(5)
    H, KV, hd, T, S = 8, 2, 64, 512, 3
    cos, sin = rope_tables(g, T, hd)
    for L, s in ((65, 1), (300, 2)):
        qkv = rnd(g, L, (H + 2 * KV) * hd)
        pos, slot = torch.arange(L, device=DEV), torch.tensor([s], device=DEV)
        kc, vc = (torch.full((S + 1, KV, T, hd), float("nan"), device=DEV, dtype=DT) for _ in range(2))
        kr, vr = torch.zeros_like(kc), torch.zeros_like(vc)
        q, k = kernels.rope_and_cache(qkv, pos, cos, sin, kc, vc, H, KV, hd, slot=slot, want_k=True)
        q_ref, k_ref = ops.rope_and_cache(REF, qkv, pos, slot, cos, sin, kr, vr, H, KV, hd)
        assert rel_err(q, q_ref) < 1e-3 and rel_err(k, k_ref) < 1e-3, L
        assert rel_err(kc[s, :, :L], kr[s, :, :L]) < 1e-3 and torch.equal(vc[s, :, :L], vr[s, :, :L]), L
        assert kc[s, :, L:].isnan().all() and vc[s, :, L:].isnan().all(), L
        others = torch.arange(S + 1, device=DEV) != s
        assert kc[others].isnan().all() and vc[others].isnan().all(), L
        k3, v3 = kc[s].clone(), vc[s].clone()
        k3[:, :L], v3[:, :L] = float("nan"), float("nan")
        q3 = kernels.rope_and_cache(qkv, pos, cos, sin, k3, v3, H, KV, hd)
        assert torch.equal(q3, q) and same(k3, kc[s]) and same(v3, vc[s]), L


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("M", [1, 2, 5, 16, 32])
def test_mlp_residual_matches_reference(M, decode):
    """The MLP block (SiLU·up in the gate/up kernel's epilogue up to 16 prefill rows and at decode, else a SiLU
    kernel between; norm weight folded, ln None as the model passes it): r updated in place to the reference's
    result."""
    g = gen(M)
    D, I = LAYER["D"], LAYER["I"]
    r = rnd(g, M, D)
    w13, w2 = rnd(g, 2 * I, D, scale=0.02), rnd(g, D, I, scale=0.02)
    r_ref = r.clone()
    ops.mlp_residual(REF, r_ref, None, EPS, w13, w2, decode)
    ptr, before = r.data_ptr(), r.clone()
    ops.mlp_residual(TRI, r, None, EPS, w13, w2, decode)
    assert r.data_ptr() == ptr and not torch.equal(r, before)
    assert not r.isnan().any() and rel_err(r, r_ref) < 2e-3


@pytest.mark.parametrize("H,KV", [(32, 32), (32, 8)])
@pytest.mark.parametrize("B", [1, 5])
def test_decode_rope_attention_matches_rope_kernel_then_split_attention(B, H, KV):
    """Decode attention with the rope and the KV write inside the split kernel against the rope kernel then the
    split attention, eagerly and from one captured graph replayed at several positions and slots (both come
    from device memory): same output, the same K/V row written at each row's position in its slot, the cache
    past it untouched (NaN poison stays)."""
    from engine import kernels
    g = gen(H + KV + B)
    hd, T, S = 128, 1024, 6
    cos, sin = rope_tables(g, T, hd)
    qkv = torch.zeros(B, (H + 2 * KV) * hd, device=DEV, dtype=DT)
    kv_len = torch.ones(B, device=DEV, dtype=torch.long)
    slots = torch.arange(B, device=DEV)
    kc, vc = (torch.full((S + 1, KV, T, hd), float("nan"), device=DEV, dtype=DT) for _ in range(2))
    replay, out_g = in_graph(
        lambda: kernels.decode_rope_attention(qkv, cos, sin, kc, vc, kv_len, H, hd, hd ** -0.5, slots=slots))
    for p0 in (0, 5, 99, 700, T - B):
        p = torch.arange(p0, p0 + B, device=DEV).flip(0)         # mixed positions, one per row
        kc.fill_(float("nan"))
        vc.fill_(float("nan"))
        slots.copy_(torch.randperm(S, device=DEV, generator=g)[:B])
        for s, n in zip(slots.tolist(), p.tolist()):
            kc[s, :, :n], vc[s, :, :n] = rnd(g, KV, n, hd), rnd(g, KV, n, hd)
        qkv.copy_(rnd(g, *qkv.shape))
        kv_len.copy_(p + 1)
        kr, vr = kc.clone(), vc.clone()
        q = torch.stack([kernels.rope_and_cache(qkv[i:i + 1], p[i:i + 1], cos, sin, kr, vr, H, KV, hd,
                                                slot=slots[i:i + 1])[0] for i in range(B)])
        ref = kernels.decode_attention(q, kr, vr, kv_len, hd ** -0.5, slots=slots)
        ke, ve = kc.clone(), vc.clone()
        out = kernels.decode_rope_attention(qkv, cos, sin, ke, ve, kv_len, H, hd, hd ** -0.5, slots=slots)
        assert not out.isnan().any() and rel_err(out, ref) < 2e-3, p0
        (kw, krest), (kw_r, krest_r) = split_written(ke, slots, p), split_written(kr, slots, p)
        (vw, vrest), (vw_r, vrest_r) = split_written(ve, slots, p), split_written(vr, slots, p)
        assert rel_err(kw, kw_r) < 1e-3 and torch.equal(vw, vw_r), p0
        assert same(krest, split_written(kc, slots, p)[1]) and same(vrest, split_written(vc, slots, p)[1]), p0
        replay()
        torch.cuda.synchronize()
        assert torch.equal(out_g, out) and same(kc, ke) and same(vc, ve), p0


@pytest.mark.parametrize("H,KV,hd", [(32, 8, 128), (8, 2, 64)])
@pytest.mark.parametrize("B,pad", [(2, 0), (5, 1), (16, 3), (32, 5)])
def test_batched_decode_attention_matches_reference(B, pad, H, KV, hd):
    """A batched decode step's attention (issue 24): B rows in distinct slots at mixed lengths, the last `pad` of
    them padding rows as the runner makes them (the scratch slot, position 0, the same qkv row). Against the
    reference plan: the same output for every row; each row's K/V written only in its slot at its position; the
    rest of the cache, other slots and the real slots around the padding rows' writes, bit for bit untouched
    (NaN past each row's length stays, so nothing past it is read); the split kernel without rope reads the
    valid lengths only too."""
    from engine import kernels
    g = gen(100 * B + H)
    S, T = 40, 512
    n = B - pad
    cos, sin = rope_tables(g, T, hd)
    lens = torch.tensor(([1, T, 31, 32, 33, 100, 257, 500] * 4)[:n], device=DEV)
    lens = lens[torch.randperm(n, device=DEV, generator=g)]
    real = torch.randperm(S, device=DEV, generator=g)[:n]
    slots = torch.cat([real, torch.full((pad,), S, device=DEV)])               # scratch slot = S
    kv_len = torch.cat([lens, torch.ones(pad, device=DEV, dtype=torch.long)])
    pos = kv_len - 1
    qkv = rnd(g, B, (H + 2 * KV) * hd)
    if pad:
        qkv[n:] = rnd(g, 1, qkv.shape[1])                                       # padding rows: the scratch token's
    kc, vc = rnd(g, S + 1, KV, T, hd), rnd(g, S + 1, KV, T, hd)
    for s, ln in zip(real.tolist(), lens.tolist()):
        kc[s, :, ln - 1:], vc[s, :, ln - 1:] = float("nan"), float("nan")       # the new token's row and beyond
    kc[S], vc[S] = float("nan"), float("nan")
    kr, vr = kc.nan_to_num(), vc.nan_to_num()                                   # the reference reads with 0 * v
    before = kc.clone(), vc.clone()
    out = ops.decode_rope_attention(TRI, qkv, pos, kv_len, slots, cos, sin, kc, vc, H, KV, hd, hd ** -0.5)
    ref = ops.decode_rope_attention(REF, qkv, pos, kv_len, slots, cos, sin, kr, vr, H, KV, hd, hd ** -0.5)
    assert out.shape == (B, H, hd) and not out.isnan().any()
    assert rel_err(out[:n], ref[:n]) < 3e-3 and rel_err(out, ref) < 3e-3
    for c, c0, cr, exact in ((kc, before[0], kr, False), (vc, before[1], vr, True)):
        w, rest = split_written(c, slots, pos)
        w_r, _ = split_written(cr, slots, pos)
        assert not w.isnan().any() and (torch.equal(w, w_r) if exact else rel_err(w, w_r) < 1e-3)
        assert same(rest, split_written(c0, slots, pos)[1])                    # nothing else written
    q = rnd(g, B, H, hd)
    a = kernels.decode_attention(q, kc, vc, kv_len, hd ** -0.5, slots=slots)
    a_ref = ops.decode_attention(q, kc.nan_to_num(), vc.nan_to_num(), kv_len, slots, hd ** -0.5)
    assert not a.isnan().any() and rel_err(a, a_ref) < 3e-3


@pytest.mark.parametrize("M", [1, 5, 16])
def test_folded_norm_matches_reference_and_replays_identically(M):
    """The norm weight folded into the qkv and gate/up weights (W * ln along K, as the model loads them); one
    row: the GEMV's in-loop norm without a weight, 5 / 16 rows: the weightless RMSNorm kernel, then the GEMV.
    Against the unfolded reference, eagerly and from a CUDA graph (PDL launches), identical over replays."""
    g = gen(40 + M)
    D, Nq, inter = 4096, 6144, 11008
    r = rnd(g, M, D)
    w_q, w13 = rnd(g, Nq, D, scale=0.02), rnd(g, 2 * inter, D, scale=0.02)
    ln = 1 + 0.2 * rnd(g, D)
    w_qf, w13f = (w_q.float() * ln.float()).to(DT), (w13.float() * ln.float()).to(DT)

    def folded():
        return ops.norm_linear(TRI, r, None, EPS, w_qf), ops.silu_mul(TRI, ops.norm_linear(TRI, r, None, EPS, w13f))

    q_ref = ops.norm_linear(REF, r, ln, EPS, w_q)
    a_ref = ops.silu_mul(REF, ops.norm_linear(REF, r, ln, EPS, w13))
    q, a = folded()
    assert rel_err(q, q_ref) < 3e-3 and rel_err(a, a_ref) < 3e-3
    replay, (qg, ag) = in_graph(folded)
    outs = []
    for _ in range(10):
        replay()
        outs.append(torch.cat([qg.flatten(), ag.flatten()]).clone())
    torch.cuda.synchronize()
    assert torch.equal(outs[0], torch.cat([q.flatten(), a.flatten()]))
    for o in outs:
        assert torch.equal(o, outs[0])


@pytest.mark.parametrize("M", [17, 32, 50, 64])
def test_wide_buckets_on_the_skinny_kernel_match_reference(M):
    """skinny_max_rows raised to 64: 17-64 rows run on the skinny kernel's 32/64-row tiles (a BLOCK_M of 32 or 64 in
    the autotuner's cache proves it), plain and adding into the residual, with rows past M never read or written."""
    from engine import kernels
    plan = KernelPlan(triton=True, skinny=True, fused_norm=True, pdl=True, skinny_max_rows=64)
    g = gen(M)
    for N, K in SHAPES:
        xbuf = torch.full((M + 3, K), float("nan"), device=DEV, dtype=DT)
        xbuf[:M] = rnd(g, M, K)
        rbuf = torch.full((M + 3, N), float("nan"), device=DEV, dtype=DT)
        rbuf[:M] = rnd(g, M, N)
        w = rnd(g, N, K, scale=0.02)
        x, r = xbuf[:M], rbuf[:M]
        out = ops.linear(plan, x, w)
        assert not out.isnan().any() and rel_err(out, ops.linear(REF, x, w)) < 2e-3, (N, K)
        r_ref = r.clone()
        ops.linear_residual(REF, x, w, r_ref)
        ops.linear_residual(plan, x, w, r)
        assert not r.isnan().any() and rel_err(r, r_ref) < 2e-3, (N, K)
        assert rbuf[M:].isnan().all() and xbuf[M:].isnan().all()
        bm = 32 if M <= 32 else 64
        assert any(k[0] == N and k[1] == K and k[2] == bm for k in kernels._skinny_kernel.cache), (N, K)


def test_skinny_block_m_32_rows_do_not_depend_on_the_row_count():
    """block_m=32 (the decode tile at every batch size): row i of an n-row call is bit-identical to row i of the
    32-row call, plain, adding into the residual and with SiLU·up, whatever n (the rows past n are masked, never
    mixed into a real row's arithmetic)."""
    from engine import kernels
    g = gen(21)
    for N, K in SHAPES[1:]:
        x, w, w13 = rnd(g, 32, K), rnd(g, N, K, scale=0.02), rnd(g, 2 * N, K, scale=0.02)
        r = rnd(g, 32, N)
        full = kernels.skinny_matmul(x, w, block_m=32)
        full13 = kernels.skinny_matmul(x, w13, swiglu=True, block_m=32)
        full_r = kernels.skinny_matmul(x, w, residual=r.clone(), block_m=32)
        assert rel_err(full, x @ w.t()) < 2e-3
        for n in (1, 2, 3, 5, 16, 31):
            xn = x[:n].contiguous()
            assert torch.equal(kernels.skinny_matmul(xn, w, block_m=32), full[:n]), (N, K, n)
            assert torch.equal(kernels.skinny_matmul(xn, w13, swiglu=True, block_m=32), full13[:n]), (N, K, n)
            assert torch.equal(kernels.skinny_matmul(xn, w, residual=r[:n].clone(), block_m=32), full_r[:n]), n


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_decode_layer_rows_do_not_depend_on_the_batch_size(batch_invariant):
    """A whole decoder layer's decode step (norm, qkv, rope + KV write + split attention, o, SiLU·up, down) on the
    plan's decode tile: each row's result and K/V row bit-identical whether it runs among 32 rows or among the
    first n, at every n when the plan is batch-invariant (one tile and one attention shape, not the GEMV at one
    row), else where n rows get the attention shape of 32 (17-32 rows here) and close at the others."""
    plan = KernelPlan(triton=True, skinny=True, fused_norm=True, pdl=True, batch_invariant=batch_invariant)
    lw = layer_weights(31)
    x, pos, slots, cos, sin, kc, vc = layer_inputs(32, 32, S=32)
    k_all, v_all = kc.clone(), vc.clone()
    full = decode_layer(plan, lw, x.clone(), pos, slots, cos, sin, k_all, v_all)
    assert rel_err(full, decode_layer(REF, lw, x.clone(), pos, slots, cos, sin, kc.clone(), vc.clone())) < 3e-3
    for n in ((1, 3, 8, 16) if batch_invariant else (2, 3, 5, 16, 17, 24)):
        k_n, v_n = kc.clone(), vc.clone()
        out = decode_layer(plan, lw, x[:n].clone(), pos[:n], slots[:n], cos, sin, k_n, v_n)
        if plan.attention_shape(n, LAYER["KV"]) != plan.attention_shape(32, LAYER["KV"]):
            assert rel_err(out, full[:n]) < 1e-3, n       # the split count follows the rows: sums in another order
        else:
            assert torch.equal(out, full[:n]), n
        assert torch.equal(k_n[slots[:n], :, pos[:n]], k_all[slots[:n], :, pos[:n]]), n
        assert torch.equal(v_n[slots[:n], :, pos[:n]], v_all[slots[:n], :, pos[:n]]), n
