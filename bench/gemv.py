"""Decode GEMV microbenchmark: Triton skinny matmul vs cuBLAS on the LLaMA-2-7B weight shapes.
Prints achieved bandwidth (weight bytes / time) per shape and M. Checks results against cuBLAS."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import kernels  # noqa: E402

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
          "lm_head": (32000, 4096)}

print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
print(f"{'shape':8s} {'M':>3s} {'cublas us':>10s} {'GB/s':>7s} {'triton us':>10s} {'GB/s':>7s}  err")
for name, (N, K) in SHAPES.items():
    ws = [torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02 for _ in range(4)]  # rotate: > L2
    for M in (1, 16):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        ref = x @ ws[0].t()
        got = kernels.skinny_matmul(x, ws[0])
        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        i = [0]

        def nxt():
            i[0] = (i[0] + 1) % 4
            return ws[i[0]]
        t_cb = triton.testing.do_bench(lambda: x @ nxt().t(), warmup=50, rep=300, return_mode="median")
        t_tr = triton.testing.do_bench(lambda: kernels.skinny_matmul(x, nxt()), warmup=50, rep=300,
                                       return_mode="median")
        gb = N * K * 2 / 1e9
        print(f"{name:8s} {M:3d} {t_cb*1e3:10.1f} {gb/t_cb*1e3:7.0f} {t_tr*1e3:10.1f} {gb/t_tr*1e3:7.0f}  {err:.1e}")
