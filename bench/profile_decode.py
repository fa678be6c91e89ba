"""Where one decode step's time goes, and what the decode GEMV can reach (issue 3's next levers, measured).

    python bench/profile_decode.py                               # CUDA, LLaMA-2-7B shapes
    python bench/profile_decode.py --device cpu --preset tiny    # plumbing check, no GEMV sweep

Writes bench/results/profile-decode-<date>-<gpu|cpu>.json with:
  0. prefill_<bucket>: the same for the prefill graphs of buckets 16, 64 and 128 (TTFT's GPU part; --prefill);
  1. step: the decode graph replayed back to back (CUDA events, per step) vs the sum of the GPU time of
     the kernels in one step (torch.profiler over eager steps and over graph replays), per kernel family:
     launches and µs per step. step - kernels = the gaps between kernels inside the graph.
  2. streaming: per-token times (engine side, token on the host) of engine.stream() (text + a chunk per
     token on the host, overlapped with the next step) vs generate() (no text work), and how the
     streamed per-token time changes from the first to the last 100 tokens of a 1,024-token reply.
  3. gemv: each 7B weight shape at M=1 over a wider config grid than the autotuner's, plain and in the
     fused form the engine runs at decode, vs the autotuned pick, cuBLAS, and a read-only pass over the
     same bytes (the bandwidth roof of that size). The step part also records the autotuner's pick for
     every GEMV key the engine tuned (gemv_autotune_picks).
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


VARIANTS = {  # A/B of the decode step's levers (bench/NOTES.md steps 10-11); each sets engine or kernel knobs
    "default": {},
    "unfused-norm": {"fused_gemv_norm": False},     # an RMSNorm kernel before each projection
    "silu-kernel": {"ops.SWIGLU_DECODE": False, "ops.GATE_IN_GEMV": False},   # decode: a SiLU kernel before down
    "attn-8x64": {"kernels.ATTN_SPLITS": 8, "kernels.ATTN_BLOCK_N": 64},   # fewer, longer attention splits
    "no-pdl": {"kernels.PDL": False},               # plain stream-ordered launches (no programmatic dependent launch)
    "sdpa-prefill": {"ops.SHORT_PREFILL_KERNEL": False},   # bucket 16: rope kernel + SDPA, not the one-kernel form
    "rope-1tok": {"kernels.ROPE_TOKENS": 1},        # one rope program per (token, head), as before session 10
    "pdl1": {"kernels.PDL_ROWS": 1},                # PDL launches in the decode step only (before session 10)
    "silu-kernel16": {"ops.SWIGLU_PREFILL": False},   # bucket 16: a SiLU kernel, not the gate/up GEMV's epilogue
    "silu-in-down": {"ops.SWIGLU_DECODE": False},   # decode: SiLU in the down GEMV's loads (before session 10;
                                                    # session 10's file ...-s10c-swiglu-decode.json is the A/B)
    "rope-kernel-decode": {"ops.DECODE_ROPE_IN_ATTN": False},   # decode: a rope + KV-write kernel before the split
                                                    # attention (the default until session 12; session 12's
                                                    # ...-s12-default.json ran this, ...-s12-rope-in-attn.json the default now)
    "blas-lt": {"torch.blas": "cublaslt"},          # buckets > 16: cuBLASLt's heuristics instead of cuBLAS's
    "short-prefill-16": {"kernels.SHORT_PREFILL": 16},   # the one-kernel rope + attention up to bucket 16 only
                                                    # (before session 11; 32 / 64 were variants then, 64 the default now)
    "short-prefill-128": {"kernels.SHORT_PREFILL": 128},   # ... up to bucket 128 (one 128-row tile per query head)
    "skinny-16": {"ops.SKINNY_MAX_ROWS": 16},       # bucket 32 on cuBLAS (before session 16)
    "skinny-64": {"ops.SKINNY_MAX_ROWS": 64},       # buckets 32 and 64 on the Triton skinny kernel, not cuBLAS
                                                    # (64/128-row weight tiles: bench/gemm_mid.py, session 16)
    "unfolded-norm": {"ops.FOLD_NORM": False},      # norm weights kept apart, multiplied in the GEMV's / RMSNorm
                                                    # kernel's loads (before session 13)
}


def apply_variant(name: str) -> dict:
    """Module knobs are set here; returns the EngineConfig overrides."""
    from engine import kernels, ops
    cfg = {}
    for k, v in VARIANTS[name].items():
        mod, _, attr = k.rpartition(".")
        if k == "torch.blas":
            torch.backends.cuda.preferred_blas_library(v)
        elif mod:
            setattr({"ops": ops, "kernels": kernels}[mod], attr, v)
        else:
            cfg[k] = v
    return cfg


def time_graph(eng: HybridEngine, g, steps: int, reset=lambda: None) -> tuple[dict, dict]:
    """A CUDA graph replayed back to back on the engine's stream: µs per replay (p50/p99 over 5 windows of
    `steps`, CUDA events, no host sync inside a window) and its kernels per family (CUPTI, one more window).
    reset() restores the graph's inputs before each window (the decode graph advances its position)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.cuda.stream(eng.cuda_stream), torch.inference_mode():
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
    from torch.profiler import ProfilerActivity, profile

    cuda = eng.cuda
    rng = random.Random(0)
    ids = [1] + [rng.randrange(3, eng.args.vocab_size) for _ in range(context - 1)]
    eng.generate(ids, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))   # KV filled past context
    pos = context + 1
    out: dict = {}
    if cuda:
        out["graph_step_us"], out["graph_replay_kernels"] = time_graph(eng, eng._decode_graph, steps,
                                                                       lambda: eng.pos.fill_(pos))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    ctx = torch.cuda.stream(eng.cuda_stream) if cuda else torch.inference_mode()
    with ctx, torch.inference_mode():
        eng.pos.fill_(pos)
        for _ in range(3):
            eng._decode()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            for _ in range(steps):
                eng._decode()
            if cuda:
                torch.cuda.synchronize()
        out["eager_step_ms_under_profiler"] = round((time.perf_counter() - t0) * 1e3 / steps, 3)
    out["eager_kernels"] = kernel_table(prof, steps, cuda)
    if cuda and "graph_replay_kernels" in out:
        busy = out["graph_replay_kernels"]["kernel_us_per_step"] or out["eager_kernels"]["kernel_us_per_step"]
        out["graph_gap_us_per_step"] = round(out["graph_step_us"]["p50"] - busy, 1)
        out["weight_bytes"] = eng.model.weight_bytes()
        out["graph_step_tb_s"] = round(eng.model.weight_bytes() / (out["graph_step_us"]["p50"] * 1e-6) / 1e12, 3)
    return out


def profile_prefill(eng: HybridEngine, bucket: int, n_tokens: int, steps: int) -> dict:
    """The prefill of one bucket, like profile_step: its CUDA graph replayed back to back (CUDA events) and
    the kernels inside it per family (CUPTI); on CPU the eager prefill under the profiler. TTFT at a short
    prompt is this plus the host's input copy, the token read and the request bookkeeping."""
    from torch.profiler import ProfilerActivity, profile

    cuda = eng.cuda
    rng = random.Random(1)
    ids = [1] + [rng.randrange(3, eng.args.vocab_size) for _ in range(n_tokens - 1)]
    r = eng.generate(ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))  # fills ids/seq_len
    out: dict = {"bucket": bucket, "tokens": n_tokens, "request_ttft_ms": round(r.metrics.ttft_s * 1e3, 3),
                 "path": r.metrics.path}
    g = eng._graphs.get(bucket) if cuda else None
    if g is not None:
        out["graph_us"], out["graph_kernels"] = time_graph(eng, g, steps)
        out["graph_gap_us"] = round(out["graph_us"]["p50"] - out["graph_kernels"]["kernel_us_per_step"], 1)
    else:
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                eng._prefill(bucket)
        out["eager_kernels"] = kernel_table(prof, steps, False)
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


# ------------------------------------------------------------------------------ 3. GEMV sweep
GRID = [(bn, bk, w, s) for bn in (2, 4, 8, 16, 32) for bk in (256, 512, 1024, 2048)
        for w, s in ((4, 3), (4, 5), (8, 3), (8, 4)) if bn * bk <= 16384 and bn * bk >= 1024]


FUSED = {"qkv": "norm", "gate_up": "norm", "lm_head": "norm", "o": "res", "down": "gated+res"}   # as the engine runs them


def fused_launch(name: str, x, w, y, ln, bn: int, bk: int, nw: int, ns: int):
    """One launch of the skinny kernel at a fixed config, plain (name "plain") or as the engine fuses that
    projection at decode (FUSED): x is [gate | up] for gated, y is the residual for res (added into)."""
    import triton

    from engine import kernels as K
    kind = "plain" if name == "plain" else FUSED[name]
    N, Kd = w.shape
    K._skinny_kernel.fn[(triton.cdiv(N, bn),)](
        x, ln if "norm" in kind else w, w, y, 1, N, Kd, 1e-5, BLOCK_M=1, NORM="norm" in kind, RES="res" in kind,
        GATED="gated" in kind, SWIGLU=False, USE_PDL=False, WX=False, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)


def fused_reference(name: str, x, w, ln):
    kind = FUSED[name]
    xf = x.float()
    if "gated" in kind:
        g, u = xf.chunk(2, dim=-1)
        xf = (g / (1 + torch.exp(-g))).half().float() * u
    if "norm" in kind:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * ln.float()
    return xf @ w.float().t()


def gemv_sweep(hidden: int, inter: int, heads: int, kv_heads: int, vocab: int, on_row=None) -> dict:
    """Each 7B shape at M=1 over GRID: the plain GEMV (what the autotuner picks vs the best config) and the
    fused form the engine runs at decode (norm in the loads / residual epilogue / silu*up in the loads)."""
    from triton.testing import do_bench

    from engine import kernels as K

    hd = hidden // heads
    shapes = {"qkv": ((heads + 2 * kv_heads) * hd, hidden), "o": (hidden, hidden), "gate_up": (2 * inter, hidden),
              "down": (hidden, inter), "lm_head": (vocab, hidden)}
    res: dict = {"grid": len(GRID)}
    for name, (N, Kd) in shapes.items():
        w = torch.randn(N, Kd, device="cuda", dtype=torch.float16) * 0.02
        x = torch.randn(1, Kd, device="cuda", dtype=torch.float16)
        xg = torch.randn(1, 2 * Kd, device="cuda", dtype=torch.float16)      # [gate | up] for the gated form
        ln = 1 + 0.1 * torch.randn(Kd, device="cuda", dtype=torch.float16)
        y = torch.empty(1, N, device="cuda", dtype=torch.float16)
        nbytes = w.numel() * 2
        xf_in = xg if "gated" in FUSED[name] else x
        refs = {"plain": x.float() @ w.float().t(), "fused": fused_reference(name, xf_in, w, ln)}

        def gbs(us: float) -> float:
            return round(nbytes / (us * 1e-6) / 1e9, 0)

        row = {"N": N, "K": Kd, "MB": round(nbytes / 1e6, 1), "fused_as": FUSED[name]}
        us = do_bench(lambda: K.skinny_matmul(x, w), warmup=10, rep=40) * 1e3
        row["autotuned"] = {"us": round(us, 1), "GB_s": gbs(us), "config": str(K._skinny_kernel.best_config)}
        us = do_bench(lambda: x @ w.t(), warmup=10, rep=40) * 1e3
        row["cublas"] = {"us": round(us, 1), "GB_s": gbs(us)}
        flat = w.view(-1)
        us = do_bench(lambda: flat.sum(dtype=torch.float32), warmup=10, rep=40) * 1e3
        row["read_roof"] = {"us": round(us, 1), "GB_s": gbs(us)}
        for variant in ("plain", "fused"):
            best = None
            xin = x if variant == "plain" else xf_in
            for bn, bk, nw, ns in GRID:
                def run(bn=bn, bk=bk, nw=nw, ns=ns):
                    fused_launch("plain" if variant == "plain" else name, xin, w, y, ln, bn, bk, nw, ns)
                try:
                    y.zero_()             # the residual form adds into y: from zero it equals the product
                    run()
                    err = (y.float() - refs[variant]).abs().max().item()
                    if err > 1e-2 * max(1.0, refs[variant].abs().max().item()):
                        log(f"  {name} {variant} {bn}x{bk} w{nw} s{ns}: wrong result (err {err:.2g})")
                        continue
                    us = do_bench(run, warmup=5, rep=25) * 1e3
                except Exception as e:  # a config the compiler refuses (registers / shared memory)
                    log(f"  {name} {variant} {bn}x{bk} w{nw} s{ns}: {type(e).__name__}")
                    continue
                if best is None or us < best["us"]:
                    best = {"us": round(us, 1), "GB_s": gbs(us),
                            "config": f"BLOCK_N={bn} BLOCK_K={bk} warps={nw} stages={ns}"}
            row[f"best_{variant}"] = best
        res[name] = row
        if on_row:
            on_row(res)          # partial results survive a cut-off run
        b1, b2 = row["best_plain"] or {}, row["best_fused"] or {}
        log(f"  {name:8s} autotuned {row['autotuned']['GB_s']:5.0f} GB/s | best plain {b1.get('GB_s', 0):5.0f} "
            f"({b1.get('config')}) | best fused ({FUSED[name]}) {b2.get('GB_s', 0):5.0f} ({b2.get('config')}) | "
            f"cublas {row['cublas']['GB_s']:5.0f} | read roof {row['read_roof']['GB_s']:5.0f} GB/s")
    return res


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
    ap.add_argument("--skip", default="", help="comma list of parts to skip: step,prefill_<bucket>,streaming,gemv")
    ap.add_argument("--prefill", default="16:10,64:50,128:100",
                    help="bucket:tokens of the prefill graphs profiled (buckets prewarmed)")
    ap.add_argument("--tag", default="", help="suffix of the result file names (a leading '-' is added: --tag run1)")
    ap.add_argument("--out", default=str(RESULTS), help="directory of the JSON")
    ap.add_argument("--variant", default="default", choices=list(VARIANTS), help="engine/kernel knobs (A/B)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[100], help="KV positions of the profiled steps")
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
    out: dict = {"benchmark": "profile-decode", **info, "variant": a.variant, "knobs": VARIANTS[a.variant]}
    overrides = apply_variant(a.variant) if cuda else {}

    def save() -> None:
        path.write_text(json.dumps(out, indent=1))

    t0 = time.perf_counter()
    prefill = [tuple(int(v) for v in bt.split(":")) for bt in a.prefill.split(",") if bt]
    buckets = sorted({16} | {b for b, _ in prefill})
    eng = HybridEngine(EngineConfig(model=a.preset, device=a.device, num_layers=a.layers, max_context=1280,
                                    buckets=buckets, prewarm_buckets=buckets if cuda else [], **overrides))
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
    if cuda:   # which config the autotuner chose for each GEMV key (N, K, BLOCK_M, NORM, RES, GATED, dtypes)
        from engine import kernels
        out["gemv_autotune_picks"] = {str(k): str(v) for k, v in kernels._skinny_kernel.cache.items()}
    for c in a.contexts[1:]:
        part(f"step_context_{c}", lambda c=c: profile_step(eng, a.steps, c))
    for b, n in prefill:    # the buckets prewarmed above: TTFT's GPU part at (by default) 10, 50 and 100 tokens
        part(f"prefill_{b}", lambda b=b, n=n: profile_prefill(eng, b, n, a.steps))
    part("streaming", lambda: streaming(eng, a.requests, a.tokens, a.long_tokens, a.long_requests))
    ar = eng.args
    eng.shutdown()
    if cuda:
        del eng                   # the weights' memory goes back before the GEMV sweep allocates its own
        torch.cuda.empty_cache()
        part("gemv", lambda: gemv_sweep(ar.hidden_size, ar.intermediate_size, ar.n_heads, ar.n_kv_heads,
                                        ar.vocab_size, on_row=lambda r: (out.__setitem__("gemv", r), save())))
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    save()
    log(f"wrote {path} ({out['wall_s']} s)")


if __name__ == "__main__":
    main()
