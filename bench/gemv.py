"""Decode GEMV microbenchmark on the LLaMA-2-7B weight shapes (fp16; weights rotate over 4 copies, > L2).
1. the Triton skinny matmul vs cuBLAS, per shape and M;
2. the fusions the model uses at decode (one row), each vs its two-launch composition, timed inside a CUDA
   graph (4 calls per replay, one per weight copy): RMSNorm in the GEMV's loads (qkv, gate_up:
   ops.norm_linear), the residual add in its epilogue (o: ops.linear_residual) and silu(gate) * up in its
   loads as well (down). The 16-row lines show why prefill buckets keep the composition for norm and SiLU.
Prints microseconds and achieved weight bandwidth (weight bytes / time); checks every Triton result
against the torch reference."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import kernels, ops  # noqa: E402

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
          "lm_head": (32000, 4096)}
FUSED = {"qkv+norm": (12288, 4096, "norm"), "gate_up+norm": (22016, 4096, "norm"), "o+res": (4096, 4096, "res"),
         "down+silu+res": (4096, 11008, "gated")}
EPS = 1e-5

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
args = ap.parse_args()
t_start = time.time()
dev, dt = torch.device("cuda"), torch.float16
n_sm = torch.cuda.get_device_properties(dev).multi_processor_count


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")  # ms


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def rotation(ws: list[torch.Tensor]):
    i = [0]

    def nxt() -> torch.Tensor:
        i[0] = (i[0] + 1) % len(ws)
        return ws[i[0]]
    return nxt


def weights(N: int, K: int) -> list[torch.Tensor]:
    return [torch.randn(N, K, device=dev, dtype=dt) * 0.02 for _ in range(4)]


def us_gbs(t_ms: float, gb: float) -> str:
    return f"{t_ms * 1e3:8.1f} {gb / t_ms * 1e3:6.0f}"


print(f"{torch.cuda.get_device_name()} ({n_sm} SMs)  torch {torch.__version__}  triton {triton.__version__}")
print("\n1. GEMV x (M, K) @ w (N, K).T")
print(f"{'shape':10s} {'M':>3s} {'cublas us':>9s} {'GB/s':>6s} {'skinny us':>9s} {'GB/s':>6s}  err")
for name, (N, K) in SHAPES.items():
    ws = weights(N, K)
    nxt = rotation(ws)
    for M in (1, 16):
        x = torch.randn(M, K, device=dev, dtype=dt)
        err = rel(kernels.skinny_matmul(x, ws[0]), x @ ws[0].t())
        t_cb = bench(lambda: x @ nxt().t())
        t_tr = bench(lambda: kernels.skinny_matmul(x, nxt()))
        gb = N * K * 2 / 1e9
        print(f"{name:10s} {M:3d} {us_gbs(t_cb, gb)} {us_gbs(t_tr, gb)}  {err:.1e}")
    del ws

print("\n2. fused vs composition, in a CUDA graph (us per call)")
print(f"{'op':14s} {'M':>3s} {'composition':>11s} {'GB/s':>6s} {'fused':>11s} {'GB/s':>6s}  err")


def graph_us(fn) -> float:
    return triton.testing.do_bench_cudagraph(lambda: [fn(i) for i in range(4)], rep=200) * 1e3 / 4


for name, (N, K, kind) in FUSED.items():
    ws = weights(N, K)
    gb = N * K * 2 / 1e9
    ln = 1 + 0.1 * torch.randn(K, device=dev, dtype=dt)
    for M in (1, 16):
        x = torch.randn(M, 2 * K if kind == "gated" else K, device=dev, dtype=dt)
        r0 = torch.randn(M, N, device=dev, dtype=dt)
        r = r0.clone()
        if kind == "norm":
            ops.use_triton(False)
            ref = ops.norm_linear(x, ln, EPS, ws[0])
            ops.use_triton(True)
            err = rel(ops.norm_linear(x, ln, EPS, ws[0]), ref)
            comp = lambda i: kernels.skinny_matmul(kernels.rms_norm(x, ln, EPS), ws[i])  # noqa: E731
            fused = lambda i: kernels.skinny_matmul(x, ws[i], ln=ln, eps=EPS)  # noqa: E731
        else:
            gated = kind == "gated"
            ops.use_triton(False)
            r_ref = r0.clone()
            ops.linear_residual(x, ws[0], r_ref, gated=gated)
            ops.use_triton(True)
            ops.linear_residual(x, ws[0], r, gated=gated)
            err = rel(r, r_ref)
            act = (lambda: kernels.silu_mul(x)) if gated else (lambda: x)
            comp = lambda i: r.add_(kernels.skinny_matmul(act(), ws[i]))  # noqa: E731
            fused = lambda i: kernels.skinny_matmul(x, ws[i], residual=r, gated=gated)  # noqa: E731
        t_c, t_f = graph_us(comp), graph_us(fused)
        print(f"{name:14s} {M:3d} {t_c:11.1f} {gb / t_c * 1e6:6.0f} {t_f:11.1f} {gb / t_f * 1e6:6.0f}  {err:.1e}")
print(f"\n({time.time() - t_start:.0f} s)")
