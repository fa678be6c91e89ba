"""Batch-1 latency of the hybrid engine vs HF eager vs a torch.compile baseline, in ONE run on one GPU.

    python bench/latency.py                      # LLaMA-2-7B shapes, all three engines
    python bench/latency.py --layers 4 --engines hybrid --requests 10   # quick iteration

Writes bench/results/latency-<date>-<gpu>.json (per engine: ttft_ms[len]{p50,p99}, tpot_ms{p50,p99},
random-length run, first_unseen_ms, graph_mem_gib, device, versions) and prints a markdown table.
Random token ids, fresh per request; the token is read on the host every step (as streaming needs).
Every request runs alone through the continuous-batching engine (batch 1: the ("decode", 1) graph); the JIT row
sets the bucket's ("prefill", b) graph aside in eng.graphs and turns off padding via eng.scheduler.max_pad_factor.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import EngineConfig, HybridEngine, SamplingParams  # noqa: E402
from engine.presets import PRESETS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summ(xs_s: list[float]) -> dict:
    ms = [x * 1e3 for x in xs_s]
    return {"p50": round(statistics.median(ms), 3), "p99": round(pct(ms, 99), 3), "n": len(ms)}


def rand_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [1] + [rng.randrange(3, vocab) for _ in range(n - 1)]


# ------------------------------------------------------------------ engines under test
HYBRID_VARIANTS = {   # engine names -> EngineConfig overrides (A/B rows in one run)
    "hybrid": {},
    "hybrid-cublas": {"skinny_matmul": False},          # cuBLAS for every matmul, decode GEMVs included
    "hybrid-unfused": {"fused_gemv_norm": False},       # an RMSNorm kernel before each decode projection
}


class Hybrid:
    """The engine, with the EngineConfig overrides its name selects (HYBRID_VARIANTS)."""

    def __init__(self, a, unseen_bucket: int, name: str = "hybrid"):
        self.name = name
        buckets = a.buckets
        t0 = time.perf_counter()
        self.eng = HybridEngine(EngineConfig(
            model=a.preset, device="cuda", num_layers=a.layers, max_context=a.max_context, buckets=buckets,
            prewarm_buckets=[b for b in buckets if b != unseen_bucket and b <= a.max_context],
            **HYBRID_VARIANTS[name]))
        self.start_s = time.perf_counter() - t0

    def run(self, ids: list[int], n_out: int) -> tuple[float, list[float], str]:
        r = self.eng.generate(ids, SamplingParams(max_tokens=n_out, temperature=0.0, ignore_eos=True))
        return r.metrics.ttft_s, r.metrics.token_times_s, r.metrics.path

    def extra(self) -> dict:
        s = self.eng.stats()
        # the autotuner's config per GEMV key in this process (it can differ between processes)
        from engine import kernels
        picks = {str(k): str(v) for k, v in kernels._skinny_kernel.cache.items()}
        return {"graph_mem_gib": round(s["graph_mem_bytes"] / 2**30, 3), "start_s": round(self.start_s, 2),
                "compile_s": round(self.eng.graphs.compile_s, 2), "capture_ms": s["capture_ms"],
                "weight_gib": round(s["weight_bytes"] / 2**30, 3), "kv_gib": round(s["kv_bytes"] / 2**30, 3),
                "gemv_autotune_picks": picks}

    def close(self):
        self.eng.shutdown()
        del self.eng


class _Timer:
    """generate() streamer that timestamps each new token when it reaches the host."""

    def __init__(self):
        self.times: list[float] = []
        self.first = True

    def put(self, value):
        value.tolist()                       # host copy: the token is on the host now
        if self.first:                       # the prompt itself
            self.first = False
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


class HF:
    """transformers LlamaForCausalLM, random fp16 weights, generate() with a timing streamer.
    compile=False: eager, dynamic cache. compile=True: static cache, transformers' auto torch.compile of
    the decode step (reduce-overhead CUDA graphs), prefill eager at the prompt's own length."""

    def __init__(self, a, compile: bool):
        from transformers import LlamaConfig, LlamaForCausalLM

        self.name = "torch.compile" if compile else "hf-eager"
        hf = dict(PRESETS[a.preset])
        hf["num_hidden_layers"] = a.layers or hf["num_hidden_layers"]
        cfg = LlamaConfig(**hf)
        t0 = time.perf_counter()
        with torch.device("cuda"):
            self.model = LlamaForCausalLM._from_config(cfg, dtype=torch.float16).eval()
        self.compile = compile
        self.kw = dict(do_sample=False, pad_token_id=0)
        if compile:
            self.kw.update(cache_implementation="static")
        else:
            self.kw.update(disable_compile=True)
        self.start_s = time.perf_counter() - t0
        self.compile_first_s = None

    def run(self, ids: list[int], n_out: int):
        timer = _Timer()
        x = torch.tensor([ids], device="cuda")
        t0 = time.perf_counter()
        with torch.no_grad():
            self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_out, min_new_tokens=n_out,
                                streamer=timer, **self.kw)
        ts = [t0] + timer.times
        return ts[1] - t0, [b - a for a, b in zip(ts[1:], ts[2:])], "compiled" if self.compile else "eager"

    def extra(self) -> dict:
        return {"start_s": round(self.start_s, 2), "first_call_s": self.compile_first_s}

    def close(self):
        del self.model


# ------------------------------------------------------------------ measurement
def measure(e, a, rng, vocab: int, unseen_len: int) -> dict:
    out: dict = {"engine": e.name}
    n_random = a.random_requests if isinstance(e, Hybrid) else a.baseline_random_requests
    t0 = time.perf_counter()
    prof = None
    if a.profile_unseen and isinstance(e, Hybrid):
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                  torch.profiler.ProfilerActivity.CUDA])
        prof.__enter__()
    ttft, _, path = e.run(rand_ids(rng, unseen_len, vocab), 4)     # a length/bucket never seen yet
    if prof is not None:
        prof.__exit__(None, None, None)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15), flush=True)
    out["first_unseen_ms"] = round(ttft * 1e3, 3)
    out["first_unseen_path"] = path
    out["first_call_s"] = round(time.perf_counter() - t0, 2)
    if isinstance(e, Hybrid):  # let the background capture of that bucket finish
        deadline = time.time() + 120
        while e.eng.bucket_for(unseen_len) not in e.eng.warm_buckets() and time.time() < deadline:
            time.sleep(0.05)
    steady = [e.run(rand_ids(rng, unseen_len, vocab), 2)[0] for _ in range(a.requests)]
    out["unseen_bucket_steady_ttft"] = summ(steady)
    out["first_unseen_ratio"] = round(out["first_unseen_ms"] / out["unseen_bucket_steady_ttft"]["p50"], 3)
    if isinstance(e, Hybrid):   # the JIT path in steady state: same bucket with its graph set aside
        eng = e.eng
        key = ("prefill", eng.bucket_for(unseen_len))
        jit = []
        pad = eng.scheduler.max_pad_factor
        eng.config.background_capture = False           # the JIT run must not queue a fresh capture
        eng.scheduler.max_pad_factor = 0                # no padded replay of a larger graph either
        try:
            for _ in range(10):
                # set aside / put back on the engine thread while it is idle (no race with its graph lookups)
                g = eng.scheduler.call(lambda: eng.graphs.graphs.pop(key)).result()
                try:
                    jit.append(e.run(rand_ids(rng, unseen_len, vocab), 2)[0])
                finally:
                    eng.scheduler.call(lambda g=g: eng.graphs.graphs.__setitem__(key, g)).result()
        finally:
            eng.config.background_capture = True
            eng.scheduler.max_pad_factor = pad
        out["jit_steady_ttft"] = summ(jit)
    for n in a.lengths:               # warm each length (the compile baseline compiles here)
        e.run(rand_ids(rng, n, vocab), 3)
    out["ttft_ms"], tpot, paths = {}, [], set()
    for n in a.lengths:
        tt = []
        for _ in range(a.requests):
            t, toks, path = e.run(rand_ids(rng, n, vocab), a.decode_tokens)
            tt.append(t)
            tpot += toks
            paths.add(path)
        out["ttft_ms"][str(n)] = summ(tt)
        out.setdefault("ttft_samples_ms", {})[str(n)] = [round(t * 1e3, 3) for t in tt]   # in request order
        print(f"  {e.name:14s} len {n:4d}: ttft p50 {out['ttft_ms'][str(n)]['p50']:.2f} ms  "
              f"p99 {out['ttft_ms'][str(n)]['p99']:.2f} ms", flush=True)
    out["tpot_ms"] = summ(tpot)
    print(f"  {e.name:14s} tpot p50 {out['tpot_ms']['p50']:.3f} ms  p99 {out['tpot_ms']['p99']:.3f} ms", flush=True)
    out["paths"] = sorted(paths)
    tt, tp = [], []
    for _ in range(n_random):
        t, toks, _ = e.run(rand_ids(rng, rng.randint(10, 500), vocab), a.random_decode_tokens)
        tt.append(t)
        tp += toks
    if n_random:      # --random-requests 0: the per-length table only (quick A/B runs)
        out["random"] = {"ttft_ms": summ(tt), "tpot_ms": summ(tp), "lengths": "uniform 10-500"}
    out.update(e.extra())
    return out


def table(res: dict) -> str:
    lens = res["args"]["lengths"]
    head = "| engine | " + " | ".join(f"TTFT {n} p50/p99" for n in lens) + \
        " | TPOT p50/p99 | random TTFT p50/p99 | random TPOT p50/p99 | first unseen | graph mem |"
    rows = [head, "|" + "---|" * (len(lens) + 6)]
    for r in res["engines"]:
        cells = [f"{r['ttft_ms'][str(n)]['p50']:.2f} / {r['ttft_ms'][str(n)]['p99']:.2f}" for n in lens]
        rows.append(f"| {r['engine']} | " + " | ".join(cells) +
                    f" | {r['tpot_ms']['p50']:.2f} / {r['tpot_ms']['p99']:.2f}"
                    + (f" | {r['random']['ttft_ms']['p50']:.2f} / {r['random']['ttft_ms']['p99']:.2f}"
                       f" | {r['random']['tpot_ms']['p50']:.2f} / {r['random']['tpot_ms']['p99']:.2f}"
                       if "random" in r else " | - | -") +
                    f" | {r['first_unseen_ms']:.1f} ms ({r['first_unseen_path']}, x{r['first_unseen_ratio']})"
                    f" | {r.get('graph_mem_gib', '-')} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-2-7b")
    p.add_argument("--layers", type=int, default=None, help="fewer layers for quick iteration")
    p.add_argument("--engines", default="hybrid,hf-eager,torch.compile")
    p.add_argument("--lengths", type=int, nargs="+", default=[10, 50, 100, 200, 500])
    # serve_config.gpu.yaml's buckets: measured on an H100 for LLaMA-2-7B (bench/bucket_edges.py);
    # --buckets 16 32 64 128 256 384 512 1024 2048 for the powers of two (EngineConfig's default)
    p.add_argument("--buckets", type=int, nargs="+",
                   default=[16, 32, 64, 128, 176, 208, 256, 272, 304, 336, 368, 384, 400, 432, 480, 512, 1024, 2048])
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--random-requests", type=int, default=200)
    p.add_argument("--random-decode-tokens", type=int, default=8)
    p.add_argument("--baseline-random-requests", type=int, default=60,
                   help="random-length requests for the HF baselines (slow); the engine gets --random-requests")
    p.add_argument("--unseen-length", type=int, default=300)
    p.add_argument("--out", default=None)
    p.add_argument("--profile-unseen", action="store_true", help="torch.profiler table of the first JIT request")
    a = p.parse_args()
    assert torch.cuda.is_available(), "bench/latency.py needs a CUDA GPU"
    vocab = PRESETS[a.preset]["vocab_size"]
    unseen_bucket = min(b for b in a.buckets if b >= a.unseen_length)
    import triton

    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "preset": a.preset, "layers": a.layers or PRESETS[a.preset]["num_hidden_layers"],
           "args": vars(a), "engines": []}
    gpu = torch.cuda.get_device_name().split()[1].lower() if len(torch.cuda.get_device_name().split()) > 1 else "gpu"
    out = Path(a.out) if a.out else RESULTS / f"latency-{res['date'][:10]}-{gpu}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in a.engines.split(","):
        rng = random.Random(1234)
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        e = Hybrid(a, unseen_bucket, name) if name.startswith("hybrid") else HF(a, compile=name == "torch.compile")
        r = measure(e, a, rng, vocab, a.unseen_length)
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        res["engines"].append(r)
        e.close()
        gc.collect()
        torch.cuda.empty_cache()
        out.write_text(json.dumps(res, indent=1))     # after each engine: a cut-off run keeps its data
    print(f"wrote {out}\n")
    print(table(res))


if __name__ == "__main__":
    main()
