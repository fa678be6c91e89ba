"""Decode GEMV microbenchmark on the LLaMA-2-7B weight shapes (fp16; weights rotate over 4 copies, > L2).
1. the Triton skinny matmul vs cuBLAS, per shape and M;
2. linear + residual + RMSNorm for the 4096-row projections (o, down, down with silu*up fused in):
   cuBLAS linear + add_rms_norm (+ silu_mul) vs skinny + add_rms_norm (+ silu_mul) vs split-K + norm
   (engine.kernels.linear_add_rms_norm: 2 kernels).
Prints microseconds and achieved weight bandwidth (weight bytes / time); checks every Triton result
against the torch reference. --sweep also times split-K + norm at each SPLIT_K in {1, 2, 4, 8}."""
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
FUSED = {"o": (4096, 4096, False), "down": (4096, 11008, False), "down+silu": (4096, 11008, True)}
EPS = 1e-5

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--sweep", action="store_true", help="also time split-K + norm at SPLIT_K = 1, 2, 4, 8")
args = ap.parse_args()
t_start = time.time()
dev, dt = torch.device("cuda"), torch.float16
n_sm = kernels._num_sms(dev)


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

print("\n2. r += x @ w.T; out = rms_norm(r) * ln   (x = silu(gate) * up for down+silu)")
print(f"{'shape':10s} {'M':>3s} {'S':>2s} {'cublas+norm':>11s} {'GB/s':>6s} {'skinny+norm':>11s} {'GB/s':>6s} "
      f"{'splitK+norm':>11s} {'GB/s':>6s}  err(out, r)")
for name, (N, K, gated) in FUSED.items():
    ws = weights(N, K)
    nxt = rotation(ws)
    ln = 1 + 0.1 * torch.randn(N, device=dev, dtype=dt)
    S = kernels.split_k_for(N, K, n_sm)
    gb = N * K * 2 / 1e9
    for M in (1, 16):
        x = torch.randn(M, 2 * K if gated else K, device=dev, dtype=dt)
        r0 = torch.randn(M, N, device=dev, dtype=dt)
        ops.use_triton(False)                                             # torch reference composition
        r_ref = r0.clone()
        ref = ops.linear_add_rms_norm(x, ws[0], r_ref, ln, EPS, gated=gated)
        ops.use_triton(True)
        r = r0.clone()
        out = kernels.linear_add_rms_norm(x, ws[0], r, ln, EPS, gated=gated)
        errs = f"{rel(out, ref):.1e} {rel(r, r_ref):.1e}"
        act = (lambda: kernels.silu_mul(x)) if gated else (lambda: x)
        t_cb = bench(lambda: kernels.rms_norm(act() @ nxt().t(), r, ln, EPS))
        t_sk = bench(lambda: kernels.rms_norm(kernels.skinny_matmul(act(), nxt()), r, ln, EPS))
        t_sp = bench(lambda: kernels.linear_add_rms_norm(x, nxt(), r, ln, EPS, gated=gated))
        print(f"{name:10s} {M:3d} {S:2d} {us_gbs(t_cb, gb):>18s} {us_gbs(t_sk, gb):>18s} {us_gbs(t_sp, gb):>18s}"
              f"  {errs}")
        if args.sweep:
            for s in (1, 2, 4, 8):
                r.copy_(r0)
                e = rel(kernels.linear_add_rms_norm(x, ws[0], r, ln, EPS, gated=gated, split_k=s), ref)
                t = bench(lambda: kernels.linear_add_rms_norm(x, nxt(), r, ln, EPS, gated=gated, split_k=s))
                print(f"{'':10s} {'':3s} {s:2d} {'':>37s} {us_gbs(t, gb):>18s}  {e:.1e}")
    del ws
print(f"\n({time.time() - t_start:.0f} s)")
