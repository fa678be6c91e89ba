"""Triton kernels for the CUDA path. Imported only on CUDA (engine/ops.py).

Each kernel takes lengths and positions at run time (`do_not_specialize`), so one compiled binary
serves every prompt length: that is what lets an unseen bucket run at once (the JIT path) and
what the artifact store caches (Triton's cache dir) so a new replica compiles nothing. Strides stay
specialised: Triton then proves 16-byte alignment and moves rows and KV tiles in vector accesses
(tests/test_kernels_ptx.py).
"""
from .attention import (ATTN_BLOCK_N, ATTN_SPLITS, ATTN_STAGES, ATTN_WARPS, SHORT_PREFILL, attention_scratch,
                        decode_attention, decode_rope_attention, short_prefill_attention)
from .elementwise import ROPE_TOKENS, rms_norm, rope_and_cache, silu_mul
from .launch import PDL_ROWS, PDL_SUPPORTED
from .skinny import _ROWS16_CONFIGS, _ROWS64_CONFIGS, _ROW_CONFIGS, _skinny_kernel, skinny_matmul

__all__ = ["ATTN_BLOCK_N", "ATTN_SPLITS", "ATTN_STAGES", "ATTN_WARPS", "PDL_ROWS", "PDL_SUPPORTED", "ROPE_TOKENS",
           "SHORT_PREFILL", "attention_scratch", "decode_attention", "decode_rope_attention", "rms_norm",
           "rope_and_cache", "short_prefill_attention", "silu_mul", "skinny_matmul"]
