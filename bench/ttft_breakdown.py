"""Where a short prompt's TTFT goes outside its prefill graph (CUDA, one engine, LLaMA-2-7B preset).

For a 10-token and a 100-token prompt (buckets 16 and 128), ``--requests`` times each, p50/p99 of:
  request      eng.generate(max_tokens=1): the engine's own TTFT (request arrival -> token on the host)
  request_ahead  eng.generate(max_tokens=2): the same, with the first decode step queued (read-ahead)
               before the host waits for the first token, as every longer request does
  same_thread  the same request run on the caller's thread (no hand-off to the engine thread)
  raw          the bare sequence on the engine's stream: ids to the device, seq_len, graph replay,
               token copy to pinned memory, event sync (what the engine cannot avoid)
  graph_gpu    the replay alone, CUDA events around back-to-back replays (GPU time)
request - same_thread = thread hand-off; same_thread - raw = the engine's Python bookkeeping;
raw - graph_gpu = launch + copies + sync. Writes JSON to --out.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import EngineConfig, HybridEngine, SamplingParams  # noqa: E402


def summ(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"p50": round(xs[len(xs) // 2] * 1e3, 3), "p99": round(xs[min(len(xs) - 1, int(0.99 * len(xs)))] * 1e3, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-2-7b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--lengths", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    eng = HybridEngine(EngineConfig(model=a.preset, device="cuda", num_layers=a.layers, max_context=1024,
                                    buckets=[16, 32, 64, 128, 256], prewarm_buckets="all"))
    rng = random.Random(7)
    vocab = eng.args.vocab_size
    p1 = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    res = {"benchmark": "ttft-breakdown", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": a.preset,
           "layers": eng.args.n_layers, "lengths": {}}
    s = eng.cuda_stream
    for n in a.lengths:
        b = eng.bucket_for(n)
        g = eng._graphs[b]
        ids = lambda n=n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
        for _ in range(5):
            eng.generate(ids(), p1)
        req, ahead, same, raw, gpu = [], [], [], [], []
        p2 = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        for _ in range(a.requests):
            req.append(eng.generate(ids(), p1).metrics.ttft_s)
            ahead.append(eng.generate(ids(), p2).metrics.ttft_s)
        for _ in range(a.requests):
            eng._count(1)
            same.append(eng._run(ids(), p1, None, None, time.perf_counter()).metrics.ttft_s)
        for _ in range(a.requests):
            x = ids()
            t0 = time.perf_counter()
            with torch.cuda.stream(s), torch.inference_mode():
                eng._ids_np[:n] = x
                eng.ids[:n].copy_(eng._ids_host[:n], non_blocking=True)
                eng.seq_len.fill_(n)
                g.replay()
                eng._tok_host.copy_(eng.tok, non_blocking=True)
                eng._tok_event.record()
            eng._tok_event.synchronize()
            int(eng._tok_host[0])
            raw.append(time.perf_counter() - t0)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(s):
            for _ in range(a.requests):
                e0.record()
                g.replay()
                e1.record()
                e1.synchronize()
                gpu.append(e0.elapsed_time(e1) / 1e3)
        row = {"bucket": b, "request": summ(req), "request_ahead": summ(ahead), "same_thread": summ(same),
               "raw": summ(raw), "graph_gpu": summ(gpu)}
        res["lengths"][str(n)] = row
        print(f"len {n:4d} (bucket {b}): " + "  ".join(f"{k} {v['p50']:.3f}/{v['p99']:.3f}" for k, v in row.items()
                                                     if isinstance(v, dict)) + " ms (p50/p99)", flush=True)
    from engine import kernels
    res["gemv_autotune_picks"] = {str(k): str(v) for k, v in kernels._skinny_kernel.cache.items()}
    for k, v in res["gemv_autotune_picks"].items():
        print(f"  {k[:40]}: {v}")
    eng.shutdown()
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
