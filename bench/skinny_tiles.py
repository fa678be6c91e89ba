"""The skinny matmul's row tiles at 2-32 rows (continuous-batching decode), timed inside CUDA graphs.

    python bench/skinny_tiles.py                       # LLaMA-2-7B's weights, rows 2/8/16/32 on the 32-row tile
    python bench/skinny_tiles.py --rows 2 8 --block-m 16 --preset qwen3-8b

For every weight of one decoder layer (qkv, o, [gate | up] with the SiLU epilogue, down) and the LM head, every
candidate tile (WX or not, BLOCK_N x BLOCK_K, warps, stages) runs at each row count on the tile of --block-m rows;
its output is checked against an fp32 reference and its time taken by triton.testing.do_bench_cudagraph (median of
replays). The one-row GEMV (autotuned) and cuBLAS are timed beside it. Writes
bench/results/skinny-tiles-<date>-<gpu>.json: rows -> weight -> tile -> us, plus each weight's best and its TB/s.
The engine's pinned tiles (engine/kernels/skinny.py) come from this table (docs/decisions/kernels.md).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.presets import PRESETS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (WX, BLOCK_N, BLOCK_K, warps, stages)
CANDIDATES = [(True, 64, 128, 4, 6), (True, 64, 128, 4, 4), (True, 32, 128, 4, 4), (True, 32, 256, 4, 4),
              (True, 64, 256, 4, 3), (True, 16, 256, 4, 4), (True, 32, 256, 4, 3), (False, 16, 128, 4, 4),
              (False, 16, 256, 4, 4), (False, 16, 256, 4, 3), (False, 16, 512, 4, 3), (False, 32, 128, 4, 4),
              (False, 32, 128, 4, 6), (False, 32, 256, 4, 3), (False, 16, 256, 2, 4), (False, 32, 256, 8, 3)]


def tile_name(c: tuple) -> str:
    wx, bn, bk, nw, ns = c
    return f"{'wx' if wx else 'xw'}-{bn}x{bk}-w{nw}s{ns}"


def shapes(preset: str) -> dict[str, tuple[int, int, bool]]:
    p = PRESETS[preset]
    h, i, hd = p["hidden_size"], p["intermediate_size"], p.get("head_dim") or p["hidden_size"] // p["num_attention_heads"]
    q, kv = p["num_attention_heads"] * hd, p.get("num_key_value_heads", p["num_attention_heads"]) * hd
    return {"qkv": (q + 2 * kv, h, False), "o": (h, q, False), "gateup": (2 * i, h, True), "down": (h, i, False),
            "lm_head": (p["vocab_size"], h, False)}


def reference(x: torch.Tensor, w: torch.Tensor, swiglu: bool) -> torch.Tensor:
    y = x.float() @ w.float().T
    if swiglu:
        n = w.shape[0] // 2
        g, u = y[:, :n].half().float(), y[:, n:]
        y = (g / (1 + torch.exp(-g))).half().float() * u.half().float()
    return y


def main(argv: list[str] | None = None) -> None:
    import triton
    from triton.testing import do_bench_cudagraph

    from engine.kernels.skinny import _skinny_kernel, skinny_matmul

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-2-7b")
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 8, 16, 32])
    ap.add_argument("--block-m", type=int, default=32, help="the row tile (the engine's decode tile: 32)")
    ap.add_argument("--tiles", default="", help="comma list of tile names (default: every candidate)")
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    kern, dev = _skinny_kernel.fn, "cuda"
    cands = [c for c in CANDIDATES if not a.tiles or tile_name(c) in a.tiles.split(",")]
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name()
    out = {"benchmark": "skinny-tiles", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "device": gpu, "torch": torch.__version__, "triton": triton.__version__, "preset": a.preset,
           "block_m": a.block_m, "rows": {}}
    path = Path(a.out) if a.out else RESULTS / f"skinny-tiles-{out['date'][:10]}-{gpu.split()[-1].lower()}.json"
    t0 = time.time()
    for M in a.rows:
        assert M <= a.block_m
        res = {}
        for name, (n, k, sw) in shapes(a.preset).items():
            w = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
            x = torch.randn(M, k, device=dev, dtype=torch.float16)
            N = n // 2 if sw else n
            y = torch.empty(M, N, device=dev, dtype=torch.float16)
            yr, r = reference(x, w, sw), {}
            if M == 1:
                r["gemv_autotuned"] = round(do_bench_cudagraph(lambda: skinny_matmul(x, w, swiglu=sw), rep=a.rep_ms) * 1e3, 2)
            if not sw:
                r["cublas"] = round(do_bench_cudagraph(lambda: torch.matmul(x, w.T), rep=a.rep_ms) * 1e3, 2)
            for c in cands if M > 1 else []:
                wx, bn, bk, nw, ns = c

                def f() -> None:
                    kern[(triton.cdiv(N, bn),)](x, w, w, y, M, N, k, 0.0, BLOCK_M=a.block_m, NORM=False, HAS_LN=False,
                                                RES=False, SWIGLU=sw, USE_PDL=False, BLOCK_N=bn, BLOCK_K=bk, WX=wx,
                                                num_warps=nw, num_stages=ns)
                try:
                    f()
                    torch.cuda.synchronize()
                    err = (y.float() - yr).abs().max().item()
                    r[tile_name(c)] = round(do_bench_cudagraph(f, rep=a.rep_ms) * 1e3, 2) if err < 0.05 else f"err {err}"
                except Exception as e:   # e.g. more shared memory than the GPU has
                    r[tile_name(c)] = "fail: " + str(e)[:90]
            nums = {t: v for t, v in r.items() if isinstance(v, float)}
            best = min(nums, key=nums.get)
            res[name] = {**r, "_best": best, "_best_tbs": round(w.numel() * 2 / (nums[best] * 1e-6) / 1e12, 2)}
            print(f"rows {M} {name}: best {best} {nums[best]} us ({res[name]['_best_tbs']} TB/s)", flush=True)
            del w
        out["rows"][str(M)] = res
        out["wall_s"] = round(time.time() - t0, 1)
        path.write_text(json.dumps(out, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
