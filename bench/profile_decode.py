"""Where one decode step's and one short prefill's GPU time goes, kernel family by kernel family.

    python bench/profile_decode.py                               # CUDA, LLaMA-2-7B shapes
    python bench/profile_decode.py --device cpu --preset tiny    # plumbing check

Writes bench/results/profile-decode-<date>-<gpu|cpu>.json with:
  0. prefill_<bucket>: the same for the prefill graphs of buckets 16, 64 and 128 (TTFT's GPU part; --prefill);
  1. step: the ("decode", 1) graph (one stream; the engine now holds one decode graph per batch size) replayed
     back to back (CUDA events, per step) vs the sum of the GPU time of the kernels in one step
     (torch.profiler over eager runner.decode_fn(1) steps and over graph replays), per kernel family:
     launches and µs per step. step - kernels = the gaps between kernels inside the graph.
     batch_steps: the step time at batch 1, 8 and 32 (--batches) from eng.time_decode_steps (continuous batching);
     batch_kernels: each of those batch sizes' decode graph replayed, its kernels per family.
  2. streaming: per-token times (engine side, token on the host) of engine.stream() (text + a chunk per
     token on the host, overlapped with the next step) vs generate() (no text work), and how the
     streamed per-token time changes from the first to the last 100 tokens of a 1,024-token reply.
  The step part also records the autotuner's pick for every GEMV key the engine tuned (gemv_autotune_picks).
Medians and P99 over repeated runs; nothing is one run.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import EngineConfig, HybridEngine, SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FAMILIES = [  # (substring of the kernel name, family): first match wins
    ("_skinny_kernel", "gemv (triton)"), ("_rms_norm_kernel", "rms_norm"), ("_rope_cache_kernel", "rope + kv write"),
    ("_short_prefill_attn", "short prefill attention"), ("_decode_attn_split", "attention split"), ("_decode_attn_reduce", "attention reduce"),
    ("_silu_mul", "silu*up"), ("flash", "attention (sdpa)"), ("fmha", "attention (sdpa)"),
    ("gemv", "gemv (cublas)"), ("gemm", "gemm (cublas)"), ("cutlass", "gemm (cublas)"),
    ("nvjet", "gemm (cublas)"), ("argmax", "argmax"), ("reduce", "argmax"), ("index", "embedding"),
    ("copy", "copy / fill"), ("fill", "copy / fill"), ("elementwise", "elementwise"),
]


def family(name: str) -> str:
    low = name.lower()
    return next((f for key, f in FAMILIES if key.lower() in low), "other")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summ(xs: list[float], nd: int = 3) -> dict:
    return {"p50": round(statistics.median(xs), nd), "p99": round(pct(xs, 99), nd), "n": len(xs)}


def log(*a) -> None:
    print(*a, flush=True)


# ------------------------------------------------------------------------------ 1. the step
def kernel_table(prof, steps: int, cuda: bool) -> dict:
    """Per family: launches and device µs per step, from the profiler's kernel events."""
    fam_us: dict[str, float] = defaultdict(float)
    fam_n: dict[str, int] = defaultdict(int)
    names: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        us = (getattr(e, "self_device_time_total", None) if cuda else None)
        if cuda:
            if not us or e.device_type != torch.autograd.DeviceType.CUDA:
                continue
        else:
            if e.key.startswith("ProfilerStep") or not e.key.startswith("aten::"):
                continue
            us = e.self_cpu_time_total
        f = family(e.key)
        fam_us[f] += us / steps
        fam_n[f] += e.count // steps if e.count >= steps else 0
        names[e.key[:90]] += us / steps
    total = sum(fam_us.values())
    return {"kernel_us_per_step": round(total, 1),
            "families": {f: {"us": round(fam_us[f], 1), "launches": fam_n[f], "share": round(fam_us[f] / total, 3)}
                         for f in sorted(fam_us, key=fam_us.get, reverse=True)},
            "top_kernels_us": {k: round(v, 1) for k, v in sorted(names.items(), key=lambda kv: -kv[1])[:15]}}


def time_graph(eng: HybridEngine, g, steps: int, reset=lambda: None) -> tuple[dict, dict]:
    """A CUDA graph replayed back to back on the engine's serving stream: µs per replay (p50/p99 over 5 windows
    of `steps`, CUDA events, no host sync inside a window) and its kernels per family (CUPTI, one more window).
    reset() restores the graph's inputs before each window (a decode graph advances its rows' positions).
    Call it on the engine thread (inside eng.scheduler.call)."""
    from torch.profiler import ProfilerActivity, profile

    with eng.runner.ctx():
        for _ in range(10):
            g.replay()
        per = []
        for _ in range(5):
            reset()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(steps):
                g.replay()
            b.record()
            b.synchronize()
            per.append(a.elapsed_time(b) * 1e3 / steps)
        reset()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                g.replay()
            torch.cuda.synchronize()
    return summ(per, 1), kernel_table(prof, steps, True)


def profile_step(eng: HybridEngine, steps: int, context: int = 100) -> dict:
    """One stream's decode step (batch 1) at `context` KV positions: the ("decode", 1) graph replayed back to back
    and runner.decode_fn(1) eagerly under the profiler, both on the engine thread over KV slot 0 (the slot the
    filling request used; the engine is idle, so no stream owns it)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = eng.cuda
    rng = random.Random(0)
    ids = [1] + [rng.randrange(3, eng.args.vocab_size) for _ in range(context - 1)]
    eng.generate(ids, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))   # KV of slot 0 filled past context
    pos = context + 1
    slot = 0
    r = eng.runner

    def reset() -> None:
        r.pos_s[slot:slot + 1].fill_(pos)

    def run() -> dict:
        out: dict = {"batch": 1}
        with r.ctx():
            r.set_rows([slot], 1)        # tok_s[slot] still holds the filling request's last token
        g = eng.graphs.get(("decode", 1)) if cuda else None
        if g is not None:
            out["graph_step_us"], out["graph_replay_kernels"] = time_graph(eng, g, steps, reset)
        elif cuda:
            out["graph_step_us_error"] = "no ('decode', 1) graph is warm"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with r.ctx():
            reset()
            for _ in range(3):
                r.decode_fn(1)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with profile(activities=acts) as prof:
                for _ in range(steps):
                    r.decode_fn(1)
                if cuda:
                    torch.cuda.synchronize()
            out["eager_step_ms_under_profiler"] = round((time.perf_counter() - t0) * 1e3 / steps, 3)
            r.pos_s[slot:slot + 1].zero_()
        out["eager_kernels"] = kernel_table(prof, steps, cuda)
        return out

    out = eng.scheduler.call(run).result()
    if cuda and "graph_replay_kernels" in out:
        busy = out["graph_replay_kernels"]["kernel_us_per_step"] or out["eager_kernels"]["kernel_us_per_step"]
        out["graph_gap_us_per_step"] = round(out["graph_step_us"]["p50"] - busy, 1)
        out["weight_bytes"] = eng.model.weight_bytes()
        out["graph_step_tb_s"] = round(eng.model.weight_bytes() / (out["graph_step_us"]["p50"] * 1e-6) / 1e12, 3)
    return out


def batch_steps(eng: HybridEngine, batches: list[int], steps: int, context: int) -> dict:
    """Decode step time per batch size at `context` positions (eng.time_decode_steps: CUDA events around each
    replay of the smallest warm decode graph >= the batch, or its JIT step; CPU: wall time), in µs; batch sizes
    above the engine's KV slots are skipped."""
    out: dict = {"context": context}
    for B in batches:
        if B > eng.max_batch:
            out[str(B)] = {"skipped": f"more than the {eng.max_batch} KV slots"}
            continue
        ts = eng.time_decode_steps(B, context, steps + 3)[3:]
        out[str(B)] = {"step_us": summ([t * 1e6 for t in ts], 1),
                       "tokens_per_s": round(B / statistics.median(ts), 1)}
    return out


def batch_kernels(eng: HybridEngine, batches: list[int], steps: int, context: int) -> dict:
    """The ("decode", B) graph of each batch size, every row at `context` positions: µs per replay and its kernels
    per family (time_graph), so the step's growth with B shows by kernel family."""
    r = eng.runner
    out: dict = {"context": context}

    def run(B: int) -> dict:
        g = eng.graphs.get(("decode", B))
        if g is None:
            return {"skipped": f"no ('decode', {B}) graph is warm"}
        with r.ctx():
            r.set_rows(list(range(B)), B)

        def reset() -> None:
            r.pos_s[:B].fill_(context)
        step, kernels = time_graph(eng, g, steps, reset)
        with r.ctx():
            r.pos_s[:B].zero_()
        return {"graph_step_us": step, "kernels": kernels,
                "gap_us_per_step": round(step["p50"] - kernels["kernel_us_per_step"], 1)}

    for B in batches:
        out[str(B)] = eng.scheduler.call(lambda B=B: run(B)).result() if eng.cuda and B <= eng.max_batch \
            else {"skipped": "CUDA graphs only, up to the KV slots"}
    return out


def profile_prefill(eng: HybridEngine, bucket: int, n_tokens: int, steps: int) -> dict:
    """The prefill of one bucket, like profile_step: its ("prefill", bucket) CUDA graph replayed back to back
    (CUDA events) and the kernels inside it per family (CUPTI); on CPU runner.prefill_fn(bucket) eagerly under
    the profiler. Both on the engine thread, into the scratch KV slot. TTFT at a short prompt is this plus the
    host's input copy, the token read and the request bookkeeping."""
    from torch.profiler import ProfilerActivity, profile

    cuda = eng.cuda
    rng = random.Random(1)
    ids = [1] + [rng.randrange(3, eng.args.vocab_size) for _ in range(n_tokens - 1)]
    r = eng.generate(ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    out: dict = {"bucket": bucket, "tokens": n_tokens, "request_ttft_ms": round(r.metrics.ttft_s * 1e3, 3),
                 "path": r.metrics.path}
    run_ = eng.runner

    def run() -> None:
        with run_.ctx():
            run_.ids[:n_tokens].copy_(torch.tensor(ids, dtype=torch.long))
            run_.seq_len.fill_(n_tokens)
            run_.slot.fill_(eng.kv.scratch)
        g = eng.graphs.get(("prefill", bucket)) if cuda else None
        if g is not None:
            out["graph_us"], out["graph_kernels"] = time_graph(eng, g, steps)
            out["graph_gap_us"] = round(out["graph_us"]["p50"] - out["graph_kernels"]["kernel_us_per_step"], 1)
        else:
            with run_.ctx(), profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    run_.prefill_fn(bucket)
            out["eager_kernels"] = kernel_table(prof, steps, False)

    eng.scheduler.call(run).result()
    return out


# ------------------------------------------------------------------------------ 2. streaming
def streaming(eng: HybridEngine, requests: int, n_out: int, long_out: int, long_reqs: int) -> dict:
    rng = random.Random(1)
    vocab = eng.args.vocab_size

    def ids(n: int) -> list[int]:
        return [1] + [rng.randrange(3, vocab) for _ in range(n - 1)]

    async def stream_one(p: list[int], n: int) -> tuple[list[float], list[float]]:
        arrivals, metrics = [], None
        async for c in eng.stream(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)):
            if c.token_id is not None:
                arrivals.append(time.perf_counter())
            if c.metrics is not None:
                metrics = c.metrics
        assert len(arrivals) == n and len(metrics.token_times_s) == n - 1, (len(arrivals), n)
        return metrics.token_times_s, [b - a for a, b in zip(arrivals, arrivals[1:])]

    plain, streamed, consumer = [], [], []
    for _ in range(requests):
        r = eng.generate(ids(32), SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True))
        plain += r.metrics.token_times_s
        tt, arr = asyncio.run(stream_one(ids(32), n_out))
        streamed += tt
        consumer += arr
    first, last = [], []
    for _ in range(long_reqs):
        tt, _ = asyncio.run(stream_one(ids(32), long_out))
        first += tt[:100]
        last += tt[-100:]
    def ms(xs: list[float]) -> dict | None:
        return summ([x * 1e3 for x in xs]) if xs else None

    return {"tokens_per_request": n_out, "requests": requests,
            "tpot_ms_generate": ms(plain), "tpot_ms_stream_engine": ms(streamed),
            "tpot_ms_stream_consumer": ms(consumer),
            "long_reply": {"tokens": long_out, "requests": long_reqs, "tpot_ms_first_100": ms(first),
                           "tpot_ms_last_100": ms(last)}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--preset", default="llama-2-7b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--steps", type=int, default=50, help="decode steps per profiled window")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--long-tokens", type=int, default=1024)
    ap.add_argument("--long-requests", type=int, default=3)
    ap.add_argument("--skip", default="",
                    help="comma list of parts to skip: step,batch_steps,batch_kernels,prefill_<bucket>,streaming")
    ap.add_argument("--prefill", default="16:10,64:50,128:100",
                    help="bucket:tokens of the prefill graphs profiled (buckets prewarmed)")
    ap.add_argument("--no-pdl", action="store_true", help="EngineConfig(pdl=False): kernels launched without PDL")
    ap.add_argument("--tag", default="", help="suffix of the result file names (a leading '-' is added: --tag run1)")
    ap.add_argument("--out", default=str(RESULTS), help="directory of the JSON")
    ap.add_argument("--contexts", type=int, nargs="+", default=[100], help="KV positions of the profiled steps")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32],
                    help="decode batch sizes timed by eng.time_decode_steps (batch_steps; above the slots: skipped)")
    a = ap.parse_args(argv)
    a.tag = "-" + a.tag.lstrip("-") if a.tag else ""   # "--tag -x" would parse as an option
    skip = set(filter(None, a.skip.split(",")))
    cuda = a.device == "cuda"
    info = {"date": dt.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "preset": a.preset, "layers": a.layers}
    if cuda:
        import triton
        info["triton"] = triton.__version__
    gpu = info["device"].split()[1].lower() if cuda and len(info["device"].split()) > 1 else a.device
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"profile-decode-{info['date'][:10]}-{gpu}{a.tag}.json"
    out: dict = {"benchmark": "profile-decode", **info}

    def save() -> None:
        path.write_text(json.dumps(out, indent=1))

    t0 = time.perf_counter()
    prefill = [tuple(int(v) for v in bt.split(":")) for bt in a.prefill.split(",") if bt]
    buckets = sorted({16} | {b for b, _ in prefill})
    eng = HybridEngine(EngineConfig(model=a.preset, device=a.device, num_layers=a.layers, max_context=1280,
                                    pdl=not a.no_pdl, buckets=buckets, prewarm_buckets=buckets if cuda else []))
    out["engine_start_s"] = round(time.perf_counter() - t0, 1)
    log(f"engine up in {out['engine_start_s']} s")
    def part(name: str, fn) -> None:
        """One part; an error is recorded and the next part still runs (a lease is short)."""
        if name in skip:
            return
        try:
            out[name] = fn()
        except Exception as e:
            import traceback
            out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        save()
        log(name, json.dumps(out[name])[:3000])

    part("step", lambda: profile_step(eng, a.steps, a.contexts[0]))
    part("batch_steps", lambda: batch_steps(eng, a.batches, a.steps, a.contexts[0]))
    part("batch_kernels", lambda: batch_kernels(eng, a.batches, a.steps, a.contexts[0]))
    if cuda:   # which config the autotuner chose for each GEMV key (N, K, BLOCK_M, NORM, RES, GATED, dtypes)
        from engine import kernels
        out["gemv_autotune_picks"] = {str(k): str(v) for k, v in kernels._skinny_kernel.cache.items()}
    for c in a.contexts[1:]:
        part(f"step_context_{c}", lambda c=c: profile_step(eng, a.steps, c))
    for b, n in prefill:    # the buckets prewarmed above: TTFT's GPU part at (by default) 10, 50 and 100 tokens
        part(f"prefill_{b}", lambda b=b, n=n: profile_prefill(eng, b, n, a.steps))
    part("streaming", lambda: streaming(eng, a.requests, a.tokens, a.long_tokens, a.long_requests))
    eng.shutdown()
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    save()
    log(f"wrote {path} ({out['wall_s']} s)")


if __name__ == "__main__":
    main()
