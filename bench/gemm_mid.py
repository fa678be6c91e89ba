"""32-128-row GEMMs (the prefill buckets between 16 and 256 tokens) on the LLaMA-2-7B weight shapes, fp16:
cuBLAS (what the engine runs there) against a split-K Triton kernel that keeps every SM streaming weights.

Why (bench/NOTES.md, sessions 10-15): up to ~128 rows a prefill is weight-bound (13.5 GB of weights, ~1.7
TFLOP at 128 rows), yet cuBLAS streams the weights at ~2.4-2.6 TB/s in the bucket-32..128 graphs where the
one-row GEMV reaches ~2.9. The suspect is the grid: at 128-wide output tiles the o and down projections
(N = 4096) have 32 tiles for 132 SMs, qkv 96, gate_up 172 (1.3 waves). The kernel here splits K over
SPLIT programs per tile (grid = tiles x SPLIT) and adds its fp32 partial into a zeroed fp32 output with
atomics, so any shape can fill the machine:
  acc (BLOCK_N, BLOCK_M) += w (BLOCK_N, BLOCK_K) . x (BLOCK_M, BLOCK_K)^T     (the weight tile is the MMA's A)
Each (config, SPLIT) is timed inside a CUDA graph (4 calls per replay over 4 weight copies, > L2) with the
fp32 zeroing included (a memset per call), and the cast to fp16 timed apart (an engine would fold it into
the next kernel: the residual add + RMSNorm, the SiLU, the rope). Every config is checked against torch.

    python3 bench/gemm_mid.py --out bench/results/gemm-mid-<date>-<gpu>.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
CONFIGS = [(bn, bk, w, s) for bn, bk in [(64, 64), (64, 128), (128, 64), (128, 128)]
           for w, s in [(4, 4), (4, 6), (8, 4)]]
SPLITS = [1, 2, 3, 4, 6]


@triton.jit(do_not_specialize=["M"])
def _splitk_kernel(X, W, Y, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   ATOMIC: tl.constexpr):
    """Y[:M, n-tile] (+)= x @ w[n-tile].T over this program's share of K (program_id(1) of num_programs(1))."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.num_programs(1)
    k_iters = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(k_iters, split)
    k_lo = pid_k * per * BLOCK_K
    k_hi = tl.minimum(k_lo + per * BLOCK_K, K)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    nmask = n < N
    mmask = m < M
    k0 = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for kb in range(k_lo, k_hi, BLOCK_K):
        k = kb + k0
        w = tl.load(W + n[:, None] * K + k[None, :], mask=nmask[:, None] & (k[None, :] < k_hi), other=0.0)
        x = tl.load(X + m[:, None] * K + k[None, :], mask=mmask[:, None] & (k[None, :] < k_hi), other=0.0)
        acc = tl.dot(w, tl.trans(x), acc)
    ptrs = Y + m[None, :] * N + n[:, None]
    ymask = nmask[:, None] & mmask[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=ymask, sem="relaxed")
    else:
        tl.store(ptrs, acc.to(Y.dtype.element_ty), mask=ymask)


def graph_us(fn) -> float:
    return triton.testing.do_bench_cudagraph(lambda: [fn(i) for i in range(4)], rep=40) * 1e3 / 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--rows", default="32,64,128")
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    a = ap.parse_args()
    t0 = time.time()
    dev, dtp = torch.device("cuda"), torch.float16
    res = {"benchmark": "gemm-mid", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "sms": torch.cuda.get_device_properties(0).multi_processor_count, "rows": {}}
    print(f"{res['device']}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    for M in [int(r) for r in a.rows.split(",")]:
        BM = max(16, triton.next_power_of_2(M))
        per_rows: dict = {}
        for name in a.shapes.split(","):
            N, K = SHAPES[name]
            gb = N * K * 2 / 1e9
            ws = [torch.randn(N, K, device=dev, dtype=dtp) * 0.02 for _ in range(4)]
            x = torch.randn(M, K, device=dev, dtype=dtp)
            ref = x.float() @ ws[0].float().t()
            y16 = torch.empty(M, N, device=dev, dtype=dtp)
            y32 = torch.zeros(M, N, device=dev, dtype=torch.float32)
            row = {"N": N, "K": K, "MB": round(gb * 1e3, 1)}
            row["cublas"] = round(graph_us(lambda i: torch.mm(x, ws[i].t(), out=y16)), 2)
            row["read_roof"] = round(graph_us(lambda i: torch.sum(ws[i], dtype=torch.float32)), 2)
            row["cast"] = round(graph_us(lambda i: y16.copy_(y32)), 2)
            sweep = []
            for bn, bk, nw, ns in CONFIGS:
                tiles = triton.cdiv(N, bn)
                for split in SPLITS:
                    if split > 1 and triton.cdiv(triton.cdiv(K, bk), split) < 4:
                        continue
                    atomic = split > 1

                    def call(i, bn=bn, bk=bk, nw=nw, ns=ns, split=split, atomic=atomic, tiles=tiles):
                        if atomic:
                            y32.zero_()
                        _splitk_kernel[(tiles, split)](x, ws[i], y32 if atomic else y16, M, N, K, BLOCK_M=BM,
                                                       BLOCK_N=bn, BLOCK_K=bk, ATOMIC=atomic, num_warps=nw,
                                                       num_stages=ns)
                    cfg = [bn, bk, nw, ns, split]
                    try:
                        call(0)
                        torch.cuda.synchronize()
                        out = y32 if atomic else y16.float()
                        err = ((out - ref).norm() / ref.norm()).item()
                        if not err < 1e-2:
                            sweep.append({"cfg": cfg, "error": f"rel err {err:.2e}"})
                            continue
                        us = graph_us(call)
                    except Exception as e:  # out of shared memory / registers: that config does not exist here
                        sweep.append({"cfg": cfg, "error": type(e).__name__})
                        continue
                    sweep.append({"cfg": cfg, "us": round(us, 2), "GB_s": round(gb / us * 1e6),
                                  "programs": tiles * split})
            ok = sorted((s for s in sweep if "us" in s), key=lambda s: s["us"])
            row["best"] = ok[:6]
            row["sweep"] = sweep
            per_rows[name] = row
            print(f"\nM={M} {name} ({N}x{K}, {gb * 1e3:.0f} MB): cuBLAS {row['cublas']:.1f} us "
                  f"({gb / row['cublas'] * 1e6:.0f} GB/s), read roof {row['read_roof']:.1f} "
                  f"({gb / row['read_roof'] * 1e6:.0f} GB/s), fp32->fp16 cast {row['cast']:.1f}", flush=True)
            for s in ok[:6]:
                c = s["cfg"]
                print(f"  BN={c[0]:3d} BK={c[1]:3d} w{c[2]} s{c[3]} split {c[4]}: {s['us']:7.1f} us "
                      f"{s['GB_s']:5d} GB/s ({s['programs']} programs)", flush=True)
            bad = [s for s in sweep if "error" in s]
            if bad:
                print(f"  {len(bad)} configs failed: " + ", ".join(f"{s['cfg']}:{s['error']}" for s in bad[:6]))
            ws = x = y16 = y32 = None
            torch.cuda.empty_cache()
        tot = {"cublas": round(sum(r["cublas"] for r in per_rows.values()), 1),
               "best_triton": round(sum(r["best"][0]["us"] for r in per_rows.values() if r["best"]), 1),
               "read_roof": round(sum(r["read_roof"] for r in per_rows.values()), 1)}
        res["rows"][str(M)] = {"shapes": per_rows, "per_layer_us": tot}
        print(f"\nM={M} per layer (4 projections): {tot}   ({time.time() - t0:.0f} s)", flush=True)
        if a.out:   # after every row count: a call cut short keeps what it measured
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
