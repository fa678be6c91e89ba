"""Prefill bucket edges from measured cost (CUDA): time one prefill graph per candidate bucket, then pick
the k edges that minimise the mean prefill time over a prompt-length mix (engine.buckets.choose_buckets).

Every candidate bucket's graph is captured at start-up (prewarm "all") and replayed alone, back to back,
CUDA events around each replay (the GPU time a prompt of that bucket pays; the host's part of TTFT is the
same for every bucket). The replays are the engine's ("prefill", bucket) graphs (eng.graphs), run on the
engine thread while it is idle (eng.scheduler.call), writing into the scratch KV slot. Then, for each k,
the chosen edges, their expected mean prefill time over the mix against the default powers of two: the
list for serve_config.gpu.yaml's ``engine.buckets``.

  python3 bench/bucket_edges.py                               # LLaMA-2-7B preset, 16..512 step 16, uniform 10-500
  python3 bench/bucket_edges.py --layers 4 --reps 10          # quick, 7B-shaped layers
  python3 bench/bucket_edges.py --lengths-file traffic.txt    # your traffic: one prompt length per line
Writes bench/results/bucket-edges-<date>-<gpu>[-tag].json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from engine import EngineConfig, HybridEngine  # noqa: E402
from engine.buckets import choose_buckets, expected_cost  # noqa: E402
from engine.config import DEFAULT_BUCKETS  # noqa: E402

ISSUE_LENGTHS = [10, 50, 100, 200, 500]


def prefill_us(eng: HybridEngine, b: int, reps: int) -> dict:
    """A full bucket-b prefill: its ("prefill", b) graph replayed alone with CUDA events around it (CUDA), or
    runner.prefill_fn(b) run eagerly under a wall clock (CPU: the script's plumbing, the figures mean little).
    Runs on the engine thread while no stream runs (scheduler.call), into the scratch KV slot."""
    rng = random.Random(b)
    toks = [rng.randrange(3, eng.args.vocab_size) for _ in range(b)]

    def run() -> list[float]:
        r = eng.runner
        xs = []
        with r.ctx():
            r.ids[:b].copy_(torch.tensor(toks, dtype=torch.long))
            r.seq_len.fill_(b)
            r.slot.fill_(eng.kv.scratch)
            if eng.cuda:
                g = eng.graphs.get(("prefill", b))
                assert g is not None, f"bucket {b} has no prefill graph (prewarm failed?)"
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for i in range(reps + 3):
                if eng.cuda:
                    e0.record()
                    g.replay()
                    e1.record()
                    e1.synchronize()
                    us = e0.elapsed_time(e1) * 1e3
                else:
                    t0 = time.perf_counter()
                    r.prefill_fn(b)
                    us = (time.perf_counter() - t0) * 1e6
                if i >= 3:
                    xs.append(us)
        return xs

    xs = eng.scheduler.call(run).result()
    xs.sort()
    return {"p50": round(statistics.median(xs), 1), "p99": round(xs[min(len(xs) - 1, int(0.99 * len(xs)))], 1),
            "n": len(xs)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--preset", default="llama-2-7b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--candidates", default="16:512:16", help="start:stop:step (inclusive) or a comma list")
    ap.add_argument("--k", default="6,8,10,12,16", help="bucket counts to choose")
    ap.add_argument("--mix", default="10:500", help="uniform prompt lengths lo:hi (the issue's random-length run)")
    ap.add_argument("--lengths-file", default=None, help="one prompt length per line (overrides --mix)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    a = ap.parse_args(argv)
    if ":" in a.candidates:
        lo, hi, step = map(int, a.candidates.split(":"))
        cands = list(range(lo, hi + 1, step))
    else:
        cands = sorted({int(x) for x in a.candidates.split(",")})
    defaults = [b for b in DEFAULT_BUCKETS if b <= cands[-1]]
    cands = sorted(set(cands) | set(defaults))        # the defaults are timed too, for the comparison
    if a.lengths_file:
        lengths = [int(x) for x in Path(a.lengths_file).read_text().split()]
    else:
        lo, hi = map(int, a.mix.split(":"))
        lengths = list(range(lo, hi + 1))
    t0 = time.perf_counter()
    eng = HybridEngine(EngineConfig(model=a.preset, device=a.device, num_layers=a.layers,
                                    max_context=max(1024, 2 * cands[-1]), buckets=cands, prewarm_buckets="all"))
    start_s = time.perf_counter() - t0
    costs_us = {}
    for b in cands:
        costs_us[b] = prefill_us(eng, b, a.reps)
        print(f"bucket {b:5d}: prefill {costs_us[b]['p50']:8.1f} us p50  {costs_us[b]['p99']:8.1f} p99", flush=True)
    cost = {b: v["p50"] / 1e3 for b, v in costs_us.items()}     # ms
    default_ms = expected_cost(defaults, cost, lengths)
    choices = {}
    for k in (int(x) for x in a.k.split(",")):
        edges = choose_buckets(cost, lengths, k)
        ms = expected_cost(edges, cost, lengths)
        at = {n: round(expected_cost(edges, cost, [n]), 3) for n in ISSUE_LENGTHS if n <= cands[-1]}
        choices[str(k)] = {"buckets": edges, "expected_prefill_ms": round(ms, 3), "at_issue_lengths_ms": at}
        print(f"k={k:2d}: {edges}  mean {ms:.3f} ms (defaults {default_ms:.3f})  at {at}")
    out = {
        "benchmark": "bucket-edges", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if eng.cuda else "cpu", "torch": torch.__version__, "preset": a.preset,
        "layers": eng.args.n_layers, "engine_start_s": round(start_s, 1),
        "graph_mem_gib": round(eng.stats()["graph_mem_bytes"] / 2**30, 3),
        "mix": a.lengths_file or f"uniform {a.mix}", "n_lengths": len(lengths),
        "prefill_us": {str(b): v for b, v in costs_us.items()},
        "defaults": {"buckets": defaults, "expected_prefill_ms": round(default_ms, 3),
                     "at_issue_lengths_ms": {n: round(expected_cost(defaults, cost, [n]), 3)
                                             for n in ISSUE_LENGTHS if n <= cands[-1]}},
        "choices": choices,
    }
    eng.shutdown()
    gpu = out["device"].replace("NVIDIA ", "").split()[0].lower()
    tag = f"-{a.tag.lstrip('-')}" if a.tag else ""
    path = Path(a.out) / f"bucket-edges-{dt.date.today().isoformat()}-{gpu}{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
