"""The KV-cache and qkv-row kernels compile to 16-byte global accesses for an H100/H200 (sm_90). Triton can
emit vector loads only where it can prove 16-byte alignment, so the row and cache strides must stay
specialised (not `do_not_specialize`); with them unspecialised the same kernels fall back to one 2-byte access
per element. This compiles each kernel on CPU, through the engine's own wrapper and Triton's own launch binder
(the kernel's real specialisation flags), for sm_90, and counts the accesses in its PTX (and, for the decode
attention, its 64-bit integer instructions)."""
from __future__ import annotations

import importlib.util
import re

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

H, KV, HD, T = 32, 32, 128, 512     # LLaMA-2-7B heads, a 512-position cache


@pytest.fixture
def compiled_ptx(monkeypatch):
    """Replaces the launch of every kernel in engine/kernels/ with a compile for sm_90; yields {kernel: PTX}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from engine.kernels import attention, elementwise

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    ptx: dict[str, str] = {}

    def compile_instead(kernel):
        def run(*args, grid, warmup, **kwargs):
            kwargs.setdefault("debug", False)
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            bound, spec, opts = binder(*args, **kwargs)
            options, sig, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
            ck = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=target, options=options.__dict__)
            ptx[kernel.__name__] = ck.asm["ptx"]
        return run

    for mod in (attention, elementwise):
        for obj in vars(mod).values():
            if isinstance(obj, JITFunction):
                monkeypatch.setattr(obj, "run", compile_instead(obj))
    yield ptx


def _accesses(ptx: str) -> dict[str, int]:
    def n(pattern):
        return len(re.findall(pattern, ptx))
    cp16 = r"cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], 0x10\b"     # 16-byte async copy to shared
    return {"ld_b16": n(r"ld\.global[\w.]*\.b16\b"), "st_b16": n(r"st\.global[\w.]*\.b16\b"),
            "ld_16B": n(r"ld\.global[\w.]*\.v4\.b32") + n(cp16), "st_16B": n(r"st\.global[\w.]*\.v4\.b32")}


def _tensors(rows):
    import torch

    f16 = torch.float16
    qkv = torch.zeros(rows, (H + 2 * KV) * HD, dtype=f16)
    k_cache = torch.zeros(max(rows, 2), KV, T, HD, dtype=f16)
    cos = torch.zeros(T, HD, dtype=f16)
    return qkv, k_cache, torch.zeros_like(k_cache), cos, torch.zeros_like(cos)


@pytest.mark.parametrize("rows", [1, 8])
def test_decode_attention_reads_the_cache_16_bytes_at_a_time(compiled_ptx, rows):
    import torch

    from engine.kernels import decode_rope_attention
    from engine.plan import KernelPlan

    shape = KernelPlan(triton=True, attn_programs=132).attention_shape(rows, KV)      # the engine's on an H200

    qkv, kc, vc, cos, sin = _tensors(rows)
    decode_rope_attention(qkv, cos, sin, kc, vc, torch.full((rows,), 300, dtype=torch.int32), H, HD, 0.088,
                          slots=torch.arange(rows), shape=shape)
    n = _accesses(compiled_ptx["_decode_attn_split_kernel"])
    # the K and V tiles: 16-byte copies; only the new token's q/k/v head (one row per kv head) stays narrow
    assert n["ld_16B"] >= 16 and n["ld_b16"] <= 8, n


def _int64_ops(ptx: str) -> int:
    return len(re.findall(r"\.(?:s64|u64)\b", ptx))


def test_decode_attention_index_math_stays_32_bit_with_the_engines_int64_lengths(compiled_ptx):
    """The engine's lengths are int64 (pos + 1 of its int64 positions). Loaded as they are, they made every tile
    offset 64-bit arithmetic (much slower, docs/decisions/kernels.md); the kernel narrows the length after its load,
    so int64 lengths compile to the int32 kernel's arithmetic."""
    import torch

    from engine.kernels import decode_rope_attention
    from engine.plan import KernelPlan

    rows = 16
    shape = KernelPlan(triton=True, attn_programs=132).attention_shape(rows, KV)
    qkv, kc, vc, cos, sin = _tensors(rows)
    n = {}
    for dt in (torch.int32, torch.int64):
        decode_rope_attention(qkv, cos, sin, kc, vc, torch.full((rows,), 300, dtype=dt), H, HD, 0.088,
                              slots=torch.arange(rows), shape=shape)
        n[dt] = _int64_ops(compiled_ptx["_decode_attn_split_kernel"])
    assert n[torch.int64] <= n[torch.int32] + 8, n


def test_short_prefill_attention_moves_rows_16_bytes_at_a_time(compiled_ptx):
    import torch

    from engine.kernels import short_prefill_attention

    qkv, kc, vc, cos, sin = _tensors(40)
    short_prefill_attention(qkv, torch.arange(40), cos, sin, kc, vc, H, KV, HD, 0.088, slot=torch.tensor([1]))
    n = _accesses(compiled_ptx["_short_prefill_attn_kernel"])
    assert n["ld_b16"] == 0 and n["st_b16"] == 0 and n["ld_16B"] >= 8 and n["st_16B"] >= 4, n


def test_rope_and_cache_moves_rows_16_bytes_at_a_time(compiled_ptx):
    import torch

    from engine.kernels import rope_and_cache

    qkv, kc, vc, cos, sin = _tensors(40)
    rope_and_cache(qkv, torch.arange(40), cos, sin, kc, vc, H, KV, HD, slot=torch.tensor([1]))
    n = _accesses(compiled_ptx["_rope_cache_kernel"])
    assert n["ld_b16"] == 0 and n["st_b16"] == 0 and n["ld_16B"] >= 2 and n["st_16B"] >= 2, n
