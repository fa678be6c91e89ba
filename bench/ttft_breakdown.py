"""Where a short prompt's TTFT goes outside its prefill graph (CUDA, one engine, LLaMA-2-7B preset).

For a 10-token and a 100-token prompt (buckets 16 and 128), ``--requests`` times each, p50/p99 of:
  request      eng.generate(max_tokens=1): the engine's own TTFT (request arrival -> token on the host)
  request_ahead  eng.generate(max_tokens=2): the same, with the first decode step queued (read-ahead)
               before the host waits for the first token, as every longer request does
  launch       the engine's own prefill launch and read-back (runner.launch_prefill + read_prefill for one
               Stream in the scratch KV slot), timed on the engine thread (no hand-off, no scheduler loop)
  raw          the bare sequence on the engine's serving stream: ids to the device, seq_len and slot, the
               ("prefill", bucket) graph replay, token copy to pinned memory, event sync (what the engine
               cannot avoid), timed on the engine thread
  graph_gpu    the replay alone, CUDA events around back-to-back replays (GPU time)
request - launch = thread hand-off + the scheduler loop + Stream bookkeeping; launch - raw = the runner's
Python per prefill (sampler set-up, copies); raw - graph_gpu = launch + copies + sync. Writes JSON to --out.
(Continuous-batching engine: the old same_thread row, a request run on the caller's thread, no longer exists,
since every request goes through the engine thread; launch is its nearest measurable stand-in. raw and
graph_gpu run through eng.scheduler.call while the engine is idle.)
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
from engine.sequence import Stream  # noqa: E402


def summ(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"p50": round(xs[len(xs) // 2] * 1e3, 3), "p99": round(xs[min(len(xs) - 1, int(0.99 * len(xs)))] * 1e3, 3)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-2-7b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--lengths", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    assert torch.cuda.is_available(), "bench/ttft_breakdown.py needs a CUDA GPU"
    eng = HybridEngine(EngineConfig(model=a.preset, device="cuda", num_layers=a.layers, max_context=1024,
                                    buckets=[16, 32, 64, 128, 256], prewarm_buckets="all"))
    rng = random.Random(7)
    vocab = eng.args.vocab_size
    p1 = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    res = {"benchmark": "ttft-breakdown", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": a.preset,
           "layers": eng.args.n_layers, "lengths": {}}
    r = eng.runner
    scratch = eng.kv.scratch
    ids_host = torch.zeros(max(a.lengths), dtype=torch.long, pin_memory=True)
    ids_np = ids_host.numpy()
    tok_host = torch.zeros(1, dtype=torch.long, pin_memory=True)
    tok_event = torch.cuda.Event()
    for n in a.lengths:
        b = eng.bucket_for(n)
        g = eng.graphs.get(("prefill", b))
        assert g is not None, f"bucket {b} has no prefill graph"
        ids = lambda n=n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
        for _ in range(5):
            eng.generate(ids(), p1)
        req, ahead, launch, raw, gpu = [], [], [], [], []
        p2 = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        for _ in range(a.requests):
            req.append(eng.generate(ids(), p1).metrics.ttft_s)
            ahead.append(eng.generate(ids(), p2).metrics.ttft_s)

        def launch_one(x: list[int]) -> float:
            st = Stream(x, b, p1, eng.tokenizer, None, None, time.perf_counter())
            st.slot = scratch
            t0 = time.perf_counter()
            with r.ctx():
                r.launch_prefill(st, 0, g)
            int(r.read_prefill(0, None)[0])
            return time.perf_counter() - t0

        def raw_one(x: list[int]) -> float:
            t0 = time.perf_counter()
            with r.ctx():
                ids_np[:n] = x
                r.ids[:n].copy_(ids_host[:n], non_blocking=True)
                r.seq_len.fill_(n)
                r.slot.fill_(scratch)
                g.replay()
                tok_host.copy_(r.ptok, non_blocking=True)
                tok_event.record()
            tok_event.synchronize()
            int(tok_host[0])
            return time.perf_counter() - t0

        def graph_gpu() -> list[float]:
            xs = []
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with r.ctx():
                for _ in range(a.requests):
                    e0.record()
                    g.replay()
                    e1.record()
                    e1.synchronize()
                    xs.append(e0.elapsed_time(e1) / 1e3)
            return xs

        call = lambda fn: eng.scheduler.call(fn).result()  # noqa: E731  (engine thread, idle)
        for _ in range(a.requests):
            x = ids()
            launch.append(call(lambda x=x: launch_one(x)))
        for _ in range(a.requests):
            x = ids()
            raw.append(call(lambda x=x: raw_one(x)))
        gpu = call(graph_gpu)
        row = {"bucket": b, "request": summ(req), "request_ahead": summ(ahead), "launch": summ(launch),
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
