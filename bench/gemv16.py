"""16-row GEMV sweep (the bucket-16 prefill's projections) on the LLaMA-2-7B weight shapes, fp16.

The bucket-16 prefill graph is ~0.9 ms slower than a decode step on an H100 (bench/NOTES.md): its
16-row GEMVs take 5.15 ms where the one-row GEMVs of a decode step take 4.68 ms for the same weights.
This sweeps tile shapes for the two forms of the engine's 16-row kernel (kernels._skinny_kernel launched
with an explicit config, bypassing its autotuner), each timed inside a CUDA graph (4 calls per
replay over 4 weight copies, > L2), next to the engine's autotuned kernel, cuBLAS at 16 rows and the
engine's one-row GEMV (the bandwidth a 16-row kernel should reach):
  xw: acc (16, BLOCK_N) += x (16, BLOCK_K) . w (BLOCK_N, BLOCK_K)^T   (WX=False)
  wx: acc (BLOCK_N, 16) += w (BLOCK_N, BLOCK_K) . x (16, BLOCK_K)^T   (WX=True: the weight tile as the MMA's
      A operand; BLOCK_N >= 64 lets Hopper's wgmma take it)
Every result is checked against torch. Prints a table per shape and writes JSON (--out).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import kernels  # noqa: E402

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
M = 16


XW = [(bn, bk, w, s) for bn, bk in [(16, 128), (16, 256), (16, 512), (32, 128), (32, 256), (64, 64), (64, 128)]
      for w, s in [(4, 4), (4, 6), (8, 3), (8, 5)]]
WX = [(bn, bk, w, s) for bn, bk in [(64, 64), (64, 128), (128, 64), (32, 128), (32, 256)]
      for w, s in [(4, 4), (4, 6), (8, 4)]]


def graph_us(fn) -> float:
    return triton.testing.do_bench_cudagraph(lambda: [fn(i) for i in range(4)], rep=100) * 1e3 / 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    a = ap.parse_args()
    t0 = time.time()
    dev, dtp = torch.device("cuda"), torch.float16
    res = {"benchmark": "gemv16", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "rows": M, "shapes": {}}
    print(f"{res['device']}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    for name in a.shapes.split(","):
        N, K = SHAPES[name]
        gb = N * K * 2 / 1e9
        ws = [torch.randn(N, K, device=dev, dtype=dtp) * 0.02 for _ in range(4)]
        x = torch.randn(M, K, device=dev, dtype=dtp)
        x1 = x[:1].contiguous()
        ref = (x.float() @ ws[0].float().t())
        y = torch.empty(M, N, device=dev, dtype=dtp)
        row = {"N": N, "K": K, "MB": round(gb * 1e3, 1)}
        kernels.skinny_matmul(x, ws[0])
        kernels.skinny_matmul(x1, ws[0])
        row["engine_16"] = graph_us(lambda i: kernels.skinny_matmul(x, ws[i]))
        row["engine_1"] = graph_us(lambda i: kernels.skinny_matmul(x1, ws[i]))
        row["cublas_16"] = graph_us(lambda i: torch.mm(x, ws[i].t(), out=y))
        sweep = []
        kern = kernels._skinny_kernel.fn          # the engine's kernel itself, one config at a time
        for form, cfgs in (("xw", XW), ("wx", WX)):
            for bn, bk, nw, ns in cfgs:
                grid = (triton.cdiv(N, bn),)

                def call(i, bn=bn, bk=bk, nw=nw, ns=ns, grid=grid, wx=form == "wx"):
                    kern[grid](x, ws[i], ws[i], y, M, N, K, 0.0, BLOCK_M=16, NORM=False, RES=False, GATED=False, SWIGLU=False,
                               USE_PDL=False, BLOCK_N=bn, BLOCK_K=bk, WX=wx, num_warps=nw, num_stages=ns)
                try:
                    call(0)
                    torch.cuda.synchronize()
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                    if not err < 1e-2:
                        sweep.append({"form": form, "cfg": [bn, bk, nw, ns], "error": f"rel err {err:.2e}"})
                        continue
                    us = graph_us(call)
                except Exception as e:  # out of shared memory / registers: that config does not exist here
                    sweep.append({"form": form, "cfg": [bn, bk, nw, ns], "error": type(e).__name__})
                    continue
                sweep.append({"form": form, "cfg": [bn, bk, nw, ns], "us": round(us, 2),
                              "GB_s": round(gb / us * 1e6), "programs": grid[0]})
        ok = sorted((s for s in sweep if "us" in s), key=lambda s: s["us"])
        row["best"] = ok[:5]
        row["sweep"] = sweep
        for k in ("engine_16", "engine_1", "cublas_16"):
            row[k] = round(row[k], 2)
        res["shapes"][name] = row
        print(f"\n{name} ({N}x{K}, {gb * 1e3:.0f} MB): engine 16 rows {row['engine_16']:.1f} us "
              f"({gb / row['engine_16'] * 1e6:.0f} GB/s), engine 1 row {row['engine_1']:.1f}, "
              f"cuBLAS 16 rows {row['cublas_16']:.1f}", flush=True)
        for s in ok[:8]:
            print(f"  {s['form']} BN={s['cfg'][0]:3d} BK={s['cfg'][1]:3d} w{s['cfg'][2]} s{s['cfg'][3]}: "
                  f"{s['us']:7.1f} us {s['GB_s']:5d} GB/s ({s['programs']} programs)", flush=True)
        bad = [s for s in sweep if "error" in s]
        if bad:
            print(f"  {len(bad)} configs failed: " + ", ".join(f"{s['form']}{s['cfg']}:{s['error']}" for s in bad[:6]))
        ws = x = y = None
        torch.cuda.empty_cache()
    tot = {k: round(sum(r[k] for r in res["shapes"].values()), 1) for k in ("engine_16", "engine_1", "cublas_16")}
    tot["best"] = round(sum(r["best"][0]["us"] for r in res["shapes"].values() if r["best"]), 1)
    res["per_layer_us"] = tot
    print(f"\nper layer (4 projections): {tot}   ({time.time() - t0:.0f} s)")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
