"""The batched decode attention (rope + KV write + split attention + reduce at 2+ splits) by launch shape, timed in CUDA graphs.

    python bench/decode_attention.py                      # LLaMA-2-7B's heads, B = 1..32 at context 300
    python bench/decode_attention.py --contexts 300 1000 --batches 8 32
    python bench/decode_attention.py --layers 4           # each replay walks 4 layers' caches (cold L2, as in a step)

For each batch size and context, every candidate (splits per row and kv head, BLOCK_N positions per tile, warps,
stages) runs engine.kernels.attention's decode kernels (the reduce only at 2+ splits) on one layer's cache (every row in its own slot, at the same
length); its output is checked against the engine's launch shape at that batch size (KernelPlan.attention_shape on
this GPU) and timed with
triton.testing.do_bench_cudagraph (median of replays). --layers N: each replay runs the launch over N layers' caches
one after another and the time is per layer, so a layer's KV is no longer in L2 from the replay before (in a decode
step the other layers' weights and caches evict it). Beside each time: the KV bytes the rows read and the TB/s
that gives. Writes bench/results/decode-attention-<date>-<gpu>.json (docs/decisions/kernels.md reads it).
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.plan import KernelPlan  # noqa: E402
from engine.presets import PRESETS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def name(splits: int, block_n: int, warps: int, stages: int) -> str:
    return f"s{splits}-n{block_n}-w{warps}s{stages}"


def main(argv: list[str] | None = None) -> None:
    import triton
    from triton.testing import do_bench_cudagraph

    from engine.kernels import attention as A

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-2-7b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--contexts", type=int, nargs="+", default=[300])
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--warps-stages", default="4:2,4:3,8:3", help="comma list of warps:stages")
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=1, help="caches walked per replay (time per layer)")
    ap.add_argument("--rep-ms", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    p = PRESETS[a.preset]
    H = p["num_attention_heads"]
    KV = p.get("num_key_value_heads", H)
    hd = p.get("head_dim") or p["hidden_size"] // H
    dev, dt16 = "cuda", torch.float16
    ws = [tuple(int(v) for v in x.split(":")) for x in a.warps_stages.split(",")]
    cands = [(s, n, w, st) for s, n, (w, st) in itertools.product(a.splits, a.block_n, ws) if s <= A.ATTN_SPLITS]
    plan = KernelPlan(attn_programs=torch.cuda.get_device_properties(dev).multi_processor_count)
    gpu = torch.cuda.get_device_name()
    out = {"benchmark": "decode-attention", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "device": gpu, "torch": torch.__version__, "triton": triton.__version__, "preset": a.preset,
           "heads": H, "kv_heads": KV, "head_dim": hd, "engine_shape": "KernelPlan.attention_shape(rows, kv heads)",
           "layers_per_replay": a.layers,
           "by_context": {}}
    path = Path(a.out) if a.out else RESULTS / f"decode-attention-{out['date'][:10]}-{gpu.split()[-1].lower()}.json"
    g = torch.Generator(device=dev).manual_seed(0)
    T, S = a.max_context, max(a.batches)
    ang = torch.rand(T, hd // 2, device=dev, generator=g) * 6.3
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dt16), torch.cat([ang.sin()] * 2, -1).to(dt16)
    t0 = time.time()
    for ctx in a.contexts:
        per_b = {}
        for B in a.batches:
            kcs = [torch.randn(S + 1, KV, T, hd, device=dev, dtype=dt16, generator=g) for _ in range(a.layers)]
            vcs = [torch.randn(S + 1, KV, T, hd, device=dev, dtype=dt16, generator=g) for _ in range(a.layers)]
            qkv = torch.randn(B, (H + 2 * KV) * hd, device=dev, dtype=dt16, generator=g)
            slots = torch.randperm(S, device=dev, generator=g)[:B]
            kv_len = torch.full((B,), ctx, device=dev, dtype=torch.long)      # the engine's lengths: pos + 1, int64
            o_part, lse_part = A.attention_scratch(B, H, hd, dev)

            def launch(splits: int, block_n: int, warps: int, stages: int) -> torch.Tensor:
                for kc, vc in zip(kcs, vcs):     # the last layer's output is the one checked
                    o = A.decode_rope_attention(qkv, cos, sin, kc, vc, kv_len, H, hd, hd ** -0.5, slots=slots,
                                                scratch=(o_part, lse_part), shape=(splits, block_n, warps, stages))
                return o

            def us(fn) -> float:
                return round(do_bench_cudagraph(fn, rep=a.rep_ms) * 1e3 / a.layers, 2)

            engine_shape = plan.attention_shape(B, KV)
            ref = launch(*engine_shape).float()
            torch.cuda.synchronize()
            kv_bytes = B * ctx * KV * hd * 2 * 2
            res = {"kv_bytes": kv_bytes, "engine_shape": name(*engine_shape),
                   "engine_us": us(lambda: launch(*engine_shape))}
            for c in cands:
                try:
                    err = (launch(*c).float() - ref).abs().max().item()
                    res[name(*c)] = us(lambda c=c: launch(*c)) if err < 2e-2 else f"err {err:.3g}"
                except Exception as e:   # e.g. more shared memory than the GPU has
                    res[name(*c)] = "fail: " + str(e)[:90]
            nums = {k: v for k, v in res.items() if k not in ("kv_bytes", "engine_us", "engine_shape")
                    and isinstance(v, float)}
            best = min(nums, key=nums.get)
            res.update(best=best, best_us=nums[best], best_tbs=round(kv_bytes / (nums[best] * 1e-6) / 1e12, 3),
                       engine_tbs=round(kv_bytes / (res["engine_us"] * 1e-6) / 1e12, 3))
            per_b[str(B)] = res
            print(f"ctx {ctx} B {B}: engine {res['engine_us']} us ({res['engine_tbs']} TB/s), best {best} "
                  f"{nums[best]} us ({res['best_tbs']} TB/s)", flush=True)
            out["by_context"][str(ctx)] = per_b      # written after every batch size: a lease is short
            out["wall_s"] = round(time.time() - t0, 1)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(out, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
