"""Run by tests/test_kernels_interpret.py in a fresh interpreter with TRITON_INTERPRET=1 (Triton reads it
when it is imported): the Triton kernels of engine/kernels/ on CPU tensors, against engine/ops.py's
PyTorch reference. Not a test_*.py file, so a plain pytest run does not collect it by itself."""
from __future__ import annotations

import os

import pytest
import torch

from engine import ops
from engine.plan import KernelPlan

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through tests/test_kernels_interpret.py (needs TRITON_INTERPRET=1 before triton is imported)",
                allow_module_level=True)

import triton  # noqa: E402  (after the check above)


@pytest.fixture(scope="module")
def k():
    """engine/kernels/ as the interpreter runs it (CPU tensors, PDL off)."""
    from engine import kernels as mod
    assert not mod.PDL_SUPPORTED
    # one config keeps the interpreted autotuning short: BLOCK_K 64 makes K=300 and K=1000 take the
    # pipelined loop after the two chunks loaded before the PDL wait, and K=96 a masked second chunk
    mod._skinny_kernel.configs = [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64, "WX": False}, num_warps=4, num_stages=2)]
    return mod


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-2) -> bool:
    return (a.float() - b.float()).abs().max().item() <= tol * max(1.0, b.float().abs().max().item())


REF = KernelPlan()        # the PyTorch reference ops


@pytest.mark.parametrize("M,wx", [(1, False), (5, False), (16, False), (5, True), (16, True), (27, True)])
def test_skinny_matmul_plain_norm_residual_and_swiglu(k, M, wx):
    """wx: the 16-row form with the weight tile as the MMA's A operand (acc transposed); 27 rows: the 32-row tile."""
    k._skinny_kernel.configs = [triton.Config({"BLOCK_N": 64 if wx else 16, "BLOCK_K": 64, "WX": wx},
                                              num_warps=4, num_stages=2)]
    k._skinny_kernel.cache.clear()
    g = torch.Generator().manual_seed(M)
    for N, K in ((100, 300), (64, 96), (48, 1000)):
        x = torch.randn(M, K, generator=g).half()
        w = (torch.randn(N, K, generator=g) * 0.05).half()
        ln = (1 + 0.1 * torch.randn(K, generator=g)).half()
        assert close(k.skinny_matmul(x, w), x.float() @ w.float().t()), (N, K)
        ref = ops.norm_linear(REF, x.float(), ln.float(), 1e-5, w.float())
        assert close(k.skinny_matmul(x, w, ln=ln, eps=1e-5), ref), (N, K)
        r = torch.randn(M, N, generator=g).half()
        r_ref = r.float()
        ops.linear_residual(REF, x.float(), w.float(), r_ref)
        out = k.skinny_matmul(x, w, residual=r)
        assert out.data_ptr() == r.data_ptr() and close(r, r_ref), (N, K)
        w13 = (torch.randn(2 * N, K, generator=g) * 0.05).half()         # [gate | up]: SiLU in the epilogue
        ref = ops.silu_mul(REF, x.float() @ w13.float().t())
        assert close(k.skinny_matmul(x, w13, swiglu=True), ref), (N, K)
        ref = ops.silu_mul(REF, ops.norm_linear(REF, x.float(), ln.float(), 1e-5, w13.float()))
        assert close(k.skinny_matmul(x, w13, ln=ln, eps=1e-5, swiglu=True), ref), (N, K)


def test_a_forced_row_tile_gives_each_row_the_same_bits_at_any_row_count(k):
    """block_m=32 (decode rows at every batch size): row i of a 2-, 5-, 16- or 32-row call is bit-identical, so a
    stream's tokens do not depend on how many streams share its step."""
    k._skinny_kernel.configs = [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "WX": True}, num_warps=4, num_stages=2)]
    k._skinny_kernel.cache.clear()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 200, generator=g).half()
    w = (torch.randn(96, 200, generator=g) * 0.05).half()
    full = k.skinny_matmul(x, w, block_m=32)
    for M in (2, 5, 16):
        assert torch.equal(k.skinny_matmul(x[:M].contiguous(), w, block_m=32), full[:M]), M
    assert close(full, x.float() @ w.float().t())


@pytest.mark.parametrize("M", [1, 16])
def test_folded_norm_weight(k, M):
    """The norm weight folded into W (W * ln along K). One row: the GEMV's in-loop norm without a weight
    (norm=True, plain and SwiGLU); 16 rows: the weightless RMSNorm kernel, then the GEMV. Against the unfolded
    reference norm_linear(x, ln, W)."""
    k._skinny_kernel.configs = [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64, "WX": False}, num_warps=4, num_stages=2)]
    k._skinny_kernel.cache.clear()
    g = torch.Generator().manual_seed(100 + M)
    D, N = 200, 72
    ln = (1 + 0.2 * torch.randn(D, generator=g)).half()
    w, w13 = (torch.randn(N, D, generator=g) * 0.05).half(), (torch.randn(2 * N, D, generator=g) * 0.05).half()
    wf, w13f = (w.float() * ln.float()).half(), (w13.float() * ln.float()).half()
    x = torch.randn(M, D, generator=g).half()
    ref = ops.norm_linear(REF, x.float(), ln.float(), 1e-5, w.float())
    ref13 = ops.silu_mul(REF, ops.norm_linear(REF, x.float(), ln.float(), 1e-5, w13.float()))
    if M == 1:
        out, out13 = (k.skinny_matmul(x, wf, eps=1e-5, norm=True),
                      k.skinny_matmul(x, w13f, eps=1e-5, norm=True, swiglu=True))
    else:
        xn = k.rms_norm(x, None, 1e-5)
        out, out13 = k.skinny_matmul(xn, wf), k.skinny_matmul(xn, w13f, swiglu=True)
    assert close(out, ref) and close(out13, ref13)
    assert not close(out, ops.norm_linear(REF, x.float(), None, 1e-5, w.float()))   # ln matters


def _tables(g, T, hd, dtype=torch.float32):
    ang = torch.rand(T, hd // 2, generator=g) * 6
    return torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)


def test_norm_silu_rope_and_split_attention(k):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(5, 64, generator=g), torch.randn(64, generator=g)
    assert close(k.rms_norm(x, w, 1e-5), ops.rms_norm(REF, x, w, 1e-5), 1e-5)
    assert close(k.rms_norm(x, None, 1e-5), ops.rms_norm(REF, x, None, 1e-5), 1e-5)   # folded weight
    gu = torch.randn(5, 128, generator=g)
    assert close(k.silu_mul(gu), ops.silu_mul(REF, gu), 1e-5)
    H, KV, hd, T, S = 4, 2, 16, 64, 5
    cos, sin = _tables(g, T, hd)
    for pos in (torch.tensor([5, 6, 40]), torch.tensor([40]), torch.arange(3, 23)):  # 4-, 1- and 16-token tiles
        qkv = torch.randn(len(pos), (H + 2 * KV) * hd, generator=g)
        kc, vc = torch.zeros(S, KV, T, hd), torch.zeros(S, KV, T, hd)
        kr, vr = kc.clone(), vc.clone()
        slot = torch.tensor([3])
        q, k_rot = k.rope_and_cache(qkv, pos, cos, sin, kc, vc, H, KV, hd, slot=slot, want_k=True)
        q_ref, k_ref = ops.rope_and_cache(REF, qkv, pos, slot, cos, sin, kr, vr, H, KV, hd)
        assert close(q, q_ref, 1e-5) and close(k_rot, k_ref, 1e-5), len(pos)
        assert close(kc, kr, 1e-5) and close(vc, vr, 1e-5) and kc[[0, 1, 2, 4]].abs().sum() == 0, len(pos)
    kc, vc, q1 = torch.randn(KV, T, hd, generator=g), torch.randn(KV, T, hd, generator=g), torch.randn(1, H, hd)
    for n in (1, 17, 37, T):                     # the 16 splits of 32-position tiles: empty, partial, all
        L = torch.tensor([n])
        assert close(k.decode_attention(q1, kc, vc, L, 0.25),
                     ops.decode_attention(q1, kc[None], vc[None], L, torch.tensor([0]), 0.25), 1e-4), n


@pytest.mark.parametrize("H,KV", [(4, 4), (4, 2)])
def test_short_prefill_attention_matches_rope_cache_then_sdpa(k, H, KV):
    """The one-kernel short prefill (rope + KV write + causal attention) into one slot against the reference
    composition: the same attention output and the same K/V rows in that slot (none elsewhere), at a full and a
    masked (5 of 16, 40 of 64) tile."""
    g = torch.Generator().manual_seed(H + KV)
    hd, T, S = 32, 64, 3
    cos, sin = _tables(g, T, hd, torch.float16)
    slot = torch.tensor([1])
    for L in (5, 16, 40):
        qkv = torch.randn(L, (H + 2 * KV) * hd, generator=g).half()
        pos = torch.arange(L)
        kc, vc = torch.zeros(S, KV, T, hd).half(), torch.zeros(S, KV, T, hd).half()
        kr, vr = kc.float(), vc.float()
        out = k.short_prefill_attention(qkv, pos, cos, sin, kc, vc, H, KV, hd, hd ** -0.5, slot=slot)
        ref = ops.prefill_rope_attention(REF, qkv.float(), pos, slot, cos.float(), sin.float(), kr, vr,
                                         H, KV, hd, hd ** -0.5)
        assert out.shape == (L, H, hd) and close(out, ref, 1e-2), L
        assert close(kc, kr, 1e-2) and close(vc, vr, 1e-5) and kc[1, :, L:].abs().sum() == 0, L
        assert kc[[0, 2]].abs().sum() == 0 and vc[[0, 2]].abs().sum() == 0, L


@pytest.mark.parametrize("H,KV", [(4, 4), (8, 2)])
def test_decode_rope_attention_matches_rope_cache_then_split_attention(k, H, KV):
    """One decode row's attention from its fused qkv row (rope and the KV write inside the split kernel) against
    the reference: same output, the new token's K/V row written at its position (in whichever split holds it),
    every other cache row kept."""
    g = torch.Generator().manual_seed(H * KV)
    hd, T = 16, 64
    cos, sin = _tables(g, T, hd, torch.float16)
    for p in (0, 16, 36, T - 1):
        qkv = torch.randn(1, (H + 2 * KV) * hd, generator=g).half()
        kc, vc = torch.randn(KV, T, hd, generator=g).half(), torch.randn(KV, T, hd, generator=g).half()
        kr, vr = kc.float()[None], vc.float()[None]
        before = kc.clone(), vc.clone()
        pos, kv_len = torch.tensor([p]), torch.tensor([p + 1])
        out = k.decode_rope_attention(qkv, cos, sin, kc, vc, kv_len, H, hd, 0.25)
        ref = ops.decode_rope_attention(REF, qkv.float(), pos, kv_len, torch.tensor([0]), cos.float(), sin.float(),
                                        kr, vr, H, KV, hd, 0.25)
        assert out.shape == (1, H, hd) and close(out, ref, 1e-2), p
        assert close(kc, kr[0], 1e-2) and close(vc, vr[0], 1e-5), p
        others = torch.arange(T) != p
        assert torch.equal(kc[:, others], before[0][:, others]) and torch.equal(vc[:, others], before[1][:, others]), p
        assert not torch.equal(kc[:, p], before[0][:, p]), p


@pytest.mark.parametrize("B,shape,H,KV", [(2, (16, 32, 4, 2), 8, 2), (5, (4, 64, 8, 3), 8, 2),
                                          (16, (1, 64, 8, 3), 8, 2), (32, (2, 64, 8, 1), 8, 2),
                                          (3, (8, 64, 4, 1), 4, 4), (32, (1, 64, 8, 3), 4, 4)])
def test_batched_decode_attention_rows_in_their_own_slots(k, B, shape, H, KV):
    """B decode rows at mixed lengths in distinct slots (padding rows, if any, in the scratch slot), at a launch
    shape (splits, BLOCK_N, warps, stages) of KernelPlan.attention_shape, with grouped query heads and one query
    head per kv head (LLaMA-2-7B's): each row's output equals the reference,
    its new K/V lands in its own slot at its position, and no other slot changes."""
    g = torch.Generator().manual_seed(B)
    hd, T, S = 16, 96, 34
    cos, sin = _tables(g, T, hd, torch.float16)
    slots = torch.randperm(S - 1, generator=g)[:B]
    pos = torch.randint(0, T, (B,), generator=g)
    qkv = torch.randn(B, (H + 2 * KV) * hd, generator=g).half()
    kc, vc = torch.randn(S, KV, T, hd, generator=g).half(), torch.randn(S, KV, T, hd, generator=g).half()
    kr, vr = kc.float(), vc.float()
    before = kc.clone()
    out = k.decode_rope_attention(qkv, cos, sin, kc, vc, pos + 1, H, hd, 0.25, slots=slots, shape=shape)
    ref = ops.decode_rope_attention(REF, qkv.float(), pos, pos + 1, slots, cos.float(), sin.float(), kr, vr,
                                    H, KV, hd, 0.25)
    assert out.shape == (B, H, hd) and close(out, ref, 1e-2)
    assert close(kc, kr, 1e-2) and close(vc, vr, 1e-5)
    changed = (kc != before).flatten(2).any(-1).any(-1)                  # (S,) slots whose K changed
    assert set(changed.nonzero().flatten().tolist()) == set(slots.tolist())
    for b in range(B):                                                    # only the row's own position
        rows = (kc[slots[b]] != before[slots[b]]).any(-1).any(0).nonzero().flatten().tolist()
        assert rows == [int(pos[b])], b
