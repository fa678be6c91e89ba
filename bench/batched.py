"""The batched engine on one GPU in ONE run, against its bandwidth floor and the strongest baselines.

    python bench/batched.py                       # H200: every part, ~8 min; bench/results/batched-<date>-h200.json
    python bench/batched.py --parts copy,engine   # the engine only; --parts baselines --resume adds the rest
    python bench/batched.py --dry-run             # CPU, tiny preset, tiny durations (tests/test_bench_batched_cpu.py)

Each part runs in its own subprocess (a crash or a timeout costs that part only; the GPU is free for the
next) and the parent merges their JSON into one file, rewritten after every part:
  copy       device-to-device copy bandwidth (bytes read + written / time) -> copy_bandwidth_tbs
  engine     one HybridEngine, parts in order: bs1 (TTFT per length, random lengths, TPOT, first request at
             an unseen length), decode (time per step at each batch size, every stream at --context),
             load (max throughput, then open-loop Poisson at fractions of it), capacity (closed-loop sweep
             over stream counts: the most streams within the SLO)
  baselines  bench/baselines/{gptfast,hf_static,hf_eager}.py, one process each
decode_by_batch's floor = (weight bytes + KV bytes read at batch B, every stream at --context) / copy bandwidth.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.baselines.common import (DEFAULT_BASELINE_BUCKETS, decode_bytes, finite, greedy_check,  # noqa: E402
                                    hf_dict, measure_bs1, pct, rand_ids, summ)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BASELINES = ["gptfast", "hf_static", "hf_eager"]
ENGINE_PARTS = ["bs1", "decode", "load", "capacity"]
# serve_config.gpu.yaml's prefill buckets (measured on an H100 for LLaMA-2-7B, bench/bucket_edges.py)
EDGES = [16, 32, 64, 128, 176, 208, 256, 272, 304, 336, 368, 384, 400, 432, 480, 512, 1024, 2048]
UTILIZATIONS = [0.25, 0.5, 0.75, 0.9]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


# ------------------------------------------------------------------ copy bandwidth (worker)
def copy_worker(a) -> dict:
    import torch

    cuda = a.device == "cuda"
    n = (a.copy_mib << 20) // 2
    src = torch.randn(n, dtype=torch.float16, device=a.device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(a.copy_iters):
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            dst.copy_(src)
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    moved = 2 * src.numel() * src.element_size()          # read + written
    t = statistics.median(times)
    return {"copy_bandwidth_tbs": round(moved / t / 1e12, 4), "copy": {
        "buffer_mib": a.copy_mib, "iters": a.copy_iters, "median_s": t,
        "best_tbs": round(moved / min(times) / 1e12, 4)}}


# ------------------------------------------------------------------ the engine (worker)
def build_engine(a, unseen_bucket: int):
    from engine import EngineConfig, HybridEngine

    buckets = [b for b in a.buckets if b < a.max_context]
    want = dict(model=a.preset, device=a.device, dtype=a.dtype, max_context=a.max_context, buckets=buckets,
                seed=a.seed, num_layers=a.layers, max_batch=a.max_batch, decode_batch_sizes=a.decode_batch_sizes,
                prewarm_buckets=[b for b in buckets + [a.max_context] if b != unseen_bucket],
                mixed_prefill=not a.no_mixed_prefill)
    known = set(EngineConfig.model_fields)
    dropped = sorted(k for k in want if k not in known)    # today's batch-1 engine lacks the batching fields
    cfg = EngineConfig(**{k: v for k, v in want.items() if k in known})
    t0 = time.perf_counter()
    eng = HybridEngine(cfg)
    return eng, {"start_s": round(time.perf_counter() - t0, 2), "config_fields_missing": dropped,
                 "compile_s": round(getattr(eng, "compile_s", float("nan")), 2)}


def engine_gen(eng, paths: set):
    from engine import SamplingParams

    def gen(ids: list[int], n: int):
        r = eng.generate(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        paths.add(r.metrics.path)
        return list(r.token_ids), r.metrics.ttft_s, list(r.metrics.token_times_s)
    return gen


def mixed_steps(eng) -> int:
    """Decode steps that carried a prompt so far (0 on an engine without mixed steps)."""
    return int(eng.stats().get("mixed_steps", 0))


def running_now(eng) -> int:
    """Streams in the batch now (``in_flight`` on the batch-1 engine, which has no ``running``)."""
    st = eng.stats()
    return int(st["running"] if "running" in st else st["in_flight"])


def part_bs1(eng, a, vocab: int, unseen_len: int) -> dict:
    paths: set = set()
    gen = engine_gen(eng, paths)
    rng = random.Random(4321)
    _, ttft, _ = gen(rand_ids(rng, unseen_len, vocab), 4)      # its bucket has no graph yet
    first = {"first_unseen_ms": round(ttft * 1e3, 3), "first_unseen_path": sorted(paths)[0] if paths else None,
             "unseen_length": unseen_len}
    deadline = time.time() + (120 if a.device == "cuda" else 0)   # let the background capture finish
    while eng.bucket_for(unseen_len) not in eng.warm_buckets() and time.time() < deadline:
        time.sleep(0.05)
    paths.clear()
    out = measure_bs1(gen, vocab, a.lengths, a.requests, a.decode_tokens, a.random_requests,
                      a.random_decode_tokens, log=log)
    out.update(first)
    out["paths"] = sorted(paths)
    if a.check_lengths:
        out["greedy"] = greedy_check(gen, vocab, a.check_lengths, a.check_tokens)
    return out


def part_decode(eng, a) -> dict:
    out = {}
    for b in a.decode_batch_sizes:
        eng.time_decode_steps(b, a.context, 3)                 # warm-up (a JIT size gets its graph here)
        st = eng.time_decode_steps(b, a.context, a.steps)
        s = summ(st)
        out[str(b)] = {"step_ms_p50": s["p50"], "step_ms_p99": s["p99"], "n": s["n"]}
        log(f"  decode B={b}: p50 {s['p50']:.3f} ms p99 {s['p99']:.3f} ms")
    return out


async def _request(eng, ids: list[int], n: int, t_arrival: float) -> dict:
    from engine import SamplingParams

    r = await eng.generate_async(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    m = r.metrics
    return {"arrival": t_arrival, "done": time.perf_counter(), "ttft_s": m.ttft_s, "e2e_s": m.e2e_s,
            "gaps": list(m.token_times_s), "n": len(r.token_ids)}


async def _sample_running(eng, stop: asyncio.Event, samples: list, every_s: float) -> None:
    while not stop.is_set():
        samples.append((time.perf_counter(), running_now(eng)))
        await asyncio.sleep(every_s)


def _stats(reqs: list[dict], t0: float, t1: float, running: list) -> dict:
    """Per-request TTFT and TPOT ((e2e - ttft)/(n - 1)), inter-token gaps over all requests, output tokens/s
    from the first arrival to the last completion, mean running streams while requests arrived."""
    tpot = [(r["e2e_s"] - r["ttft_s"]) / (r["n"] - 1) for r in reqs if r["n"] > 1]
    gaps = [g for r in reqs for g in r["gaps"]]
    end = max((r["done"] for r in reqs), default=t1)
    inside = [n for t, n in running if t0 <= t <= t1]
    return {"requests": len(reqs), "ttft_ms": summ([r["ttft_s"] for r in reqs]), "tpot_ms": summ(tpot),
            "itl_ms_p99": round(pct(gaps, 99) * 1e3, 4) if gaps else float("nan"),
            "output_tok_s": round(sum(r["n"] for r in reqs) / max(end - t0, 1e-9), 2),
            "mean_running": round(statistics.fmean(inside), 3) if inside else float("nan")}


async def closed_loop(eng, streams: int, duration_s: float, vocab: int, n_out: int, seed: int,
                      sample_s: float, stagger: bool = False) -> dict:
    """``streams`` clients, each sending its next request (prompt uniform 10-500) when the last ends, for
    duration_s; in-flight requests are then awaited. Tokens/s counts requests finished in the last 3/4.
    stagger: client i starts i/streams of the first quarter in, and latencies count only requests sent after
    that quarter (equal-length requests started together would arrive in waves, each prompt queued behind
    every other one's prefill: a property of the load, not of the engine)."""
    rng = random.Random(seed)
    stop, samples, reqs = asyncio.Event(), [], []
    m0 = mixed_steps(eng)
    t0 = time.perf_counter()
    t_end = t0 + duration_s
    w0 = t0 + duration_s / 4

    async def client(i: int):
        if stagger:
            await asyncio.sleep(i / streams * (w0 - t0))
        while time.perf_counter() < t_end:
            reqs.append(await _request(eng, rand_ids(rng, rng.randint(10, 500), vocab), n_out, time.perf_counter()))

    sampler = asyncio.create_task(_sample_running(eng, stop, samples, sample_s))
    await asyncio.gather(*(client(i) for i in range(streams)))
    stop.set()
    await sampler
    kept = [r for r in reqs if r["arrival"] >= w0] if stagger else reqs
    out = _stats(kept or reqs, t0, t_end, samples)     # (none kept: a dry run shorter than one request)
    out["latency_over"] = "sent after the stagger" if stagger and kept else "all requests"
    done = [r for r in reqs if w0 <= r["done"] <= t_end]
    out["window_tok_s"] = round(sum(r["n"] for r in done) / (t_end - w0), 2)
    out["streams"] = streams
    out["staggered"] = stagger
    out["mixed_steps"] = mixed_steps(eng) - m0
    return out


async def open_loop(eng, rate: float, duration_s: float, vocab: int, n_out: int, seed: int,
                    sample_s: float, drain_s: float) -> dict:
    """Poisson arrivals at ``rate``/s for duration_s, each launched at its arrival time as a task on this
    loop (never waiting for earlier ones)."""
    rng = random.Random(seed)
    stop, samples, tasks = asyncio.Event(), [], []
    sampler = asyncio.create_task(_sample_running(eng, stop, samples, sample_s))
    m0 = mixed_steps(eng)
    t0 = time.perf_counter()
    t = t0
    while True:
        t += rng.expovariate(rate)
        if t > t0 + duration_s:
            break
        await asyncio.sleep(max(0.0, t - time.perf_counter()))
        tasks.append(asyncio.create_task(_request(eng, rand_ids(rng, rng.randint(10, 500), vocab), n_out, t)))
    t_last = time.perf_counter()
    done, pending = await asyncio.wait(tasks, timeout=drain_s) if tasks else (set(), set())
    for p in pending:
        p.cancel()
    stop.set()
    await sampler
    reqs = [d.result() for d in done if not d.exception()]
    out = _stats(reqs, t0, t_last, samples)
    out.update({"rate_rps": round(rate, 3), "arrivals": len(tasks), "unfinished": len(pending),
                "failed": sum(1 for d in done if d.exception()), "mixed_steps": mixed_steps(eng) - m0})
    return out


def part_load(eng, a, vocab: int) -> dict:
    log(f"  max throughput: {a.max_batch} streams closed-loop for {a.saturate_s} s")
    sat = asyncio.run(closed_loop(eng, a.max_batch, a.saturate_s, vocab, a.out_tokens, 7, a.sample_s))
    max_tok_s = sat["window_tok_s"]
    max_rps = max_tok_s / a.out_tokens
    log(f"  max {max_tok_s:.0f} tok/s = {max_rps:.2f} req/s, mean running {sat['mean_running']}")
    rows = []
    for i, u in enumerate(a.utilizations):
        r = asyncio.run(open_loop(eng, u * max_rps, a.load_s, vocab, a.out_tokens, 100 + i, a.sample_s,
                                  a.drain_s))
        r["utilization"] = u
        r["achieved_utilization"] = round(r["output_tok_s"] / max_tok_s, 3) if max_tok_s else float("nan")
        rows.append(r)
        log(f"  load {u:.0%} ({r['rate_rps']} req/s, {r['arrivals']} req): ttft p50/p99 "
            f"{r['ttft_ms']['p50']:.2f}/{r['ttft_ms']['p99']:.2f} tpot p50/p99 {r['tpot_ms']['p50']:.2f}/"
            f"{r['tpot_ms']['p99']:.2f} ms, {r['output_tok_s']} tok/s, running {r['mean_running']}")
    return {"max_throughput": {"output_tok_s": max_tok_s, "rps": round(max_rps, 3), "saturate": sat},
            "load": rows}


def part_capacity(eng, a, vocab: int, bs1: dict) -> dict:
    """Closed-loop sweep: the most streams with TTFT p99 <= 2x idle random-length TTFT p99 and TPOT p99 <=
    1.5x idle TPOT (p50)."""
    slo = {"ttft_p99_ms": round(a.ttft_slo_x * bs1["ttft_ms"]["random"]["p99"], 4),
           "tpot_p99_ms": round(a.tpot_slo_x * bs1["tpot_ms"]["p50"], 4)}
    sweep, best = [], 0
    for n in [s for s in a.capacity_streams if s <= a.max_batch]:
        r = asyncio.run(closed_loop(eng, n, a.capacity_s, vocab, a.out_tokens, 1000 + n, a.sample_s, stagger=True))
        r["meets_slo"] = r["ttft_ms"]["p99"] <= slo["ttft_p99_ms"] and r["tpot_ms"]["p99"] <= slo["tpot_p99_ms"]
        sweep.append(r)
        best = n if r["meets_slo"] else best
        log(f"  {n} streams: ttft p99 {r['ttft_ms']['p99']:.2f} tpot p99 {r['tpot_ms']['p99']:.2f} ms, "
            f"{r['window_tok_s']} tok/s, slo {'met' if r['meets_slo'] else 'missed'}")
    at = next((r for r in sweep if r["streams"] == best), None)
    bs1_tok_s = 1e3 / bs1["tpot_ms"]["p50"]
    return {"capacity_at_slo_streams": best, "capacity": {
        "slo": slo, "sweep": sweep, "output_tok_s_at_capacity": at["window_tok_s"] if at else None,
        "x_batch1_tok_s": round(at["window_tok_s"] / bs1_tok_s, 2) if at else None,
        "batch1_tok_s": round(bs1_tok_s, 2)}}


def engine_worker(a) -> dict:
    from engine.presets import PRESETS  # noqa: F401  (the engine's own import path: fails early if broken)

    vocab = hf_dict(a.preset, a.layers)["vocab_size"]
    unseen_bucket = min(b for b in a.buckets + [a.max_context] if b >= a.unseen_length)
    out_path = Path(a.out)
    res: dict = {"errors": {}, "wall_s": {}}
    eng, res["engine"] = build_engine(a, unseen_bucket)
    log(f"engine ready in {res['engine']['start_s']} s "
        f"(config fields this engine lacks: {res['engine']['config_fields_missing']})")
    try:
        for part in a.engine_parts:
            t0 = time.perf_counter()
            log(f"engine part {part}")
            try:
                if part == "bs1":
                    res["bs1"] = part_bs1(eng, a, vocab, a.unseen_length)
                elif part == "decode":
                    res["decode_by_batch"] = part_decode(eng, a)
                elif part == "load":
                    res.update(part_load(eng, a, vocab))
                elif part == "capacity":
                    if "bs1" not in res:
                        raise RuntimeError("capacity needs the bs1 part first (its SLO is relative to idle)")
                    res.update(part_capacity(eng, a, vocab, res["bs1"]))
            except Exception as e:  # one part's failure is recorded; the next part still runs
                import traceback
                res["errors"][part] = f"{type(e).__name__}: {e}"
                log(traceback.format_exc())
            res["wall_s"][part] = round(time.perf_counter() - t0, 1)
            write(out_path, res)
        st = eng.stats()
        res["engine"]["stats"] = {k: v for k, v in st.items() if isinstance(v, (int, float, str, list))}
    finally:
        eng.shutdown()
    write(out_path, res)
    return res


# ------------------------------------------------------------------ the parent: subprocesses, merge
def child(cmd: list[str], timeout_s: float, env: dict | None = None) -> tuple[int, str]:
    log("$ " + " ".join(cmd))
    try:
        p = subprocess.run(cmd, cwd=ROOT, timeout=timeout_s, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        sys.stdout.write(p.stdout)
        return p.returncode, p.stdout[-3000:]
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        sys.stdout.write(out)
        return 124, f"timed out after {timeout_s} s\n" + out[-3000:]


def worker_args(a) -> list[str]:
    """The measurement arguments, passed on to the engine worker unchanged."""
    keys = ["preset", "layers", "device", "dtype", "seed", "max_context", "max_batch", "context", "steps",
            "requests", "decode_tokens", "random_requests", "random_decode_tokens", "unseen_length",
            "out_tokens", "saturate_s", "load_s", "drain_s", "capacity_s", "sample_s", "ttft_slo_x",
            "tpot_slo_x", "copy_mib", "copy_iters", "check_tokens"]
    lists = ["buckets", "decode_batch_sizes", "lengths", "utilizations", "capacity_streams", "check_lengths"]
    args = []
    for k in keys:
        v = getattr(a, k)
        if v is not None:
            args += [f"--{k.replace('_', '-')}", str(v)]
    for k in lists:
        args += [f"--{k.replace('_', '-')}", *map(str, getattr(a, k))]
    return args + ["--engine-parts", ",".join(a.engine_parts)] + (["--no-mixed-prefill"] if a.no_mixed_prefill else [])


def baseline_cmd(a, name: str, f: Path) -> list[str]:
    cmd = [sys.executable, "-m", f"bench.baselines.{name}", "--out", str(f), "--preset", a.preset,
           "--device", a.device, "--dtype", a.dtype, "--seed", str(a.seed),
           "--max-context", str(a.max_context), "--context", str(a.context),
           "--buckets", *map(str, a.baseline_buckets), "--batches", *map(str, a.baseline_batches),
           "--lengths", *map(str, a.lengths)]
    cmd += ["--layers", str(a.layers)] if a.layers else []
    cmd += ["--check-lengths", *map(str, a.check_lengths), "--check-tokens", str(a.check_tokens)] \
        if a.check_lengths else []
    if a.dry_run:
        cmd += ["--requests", str(a.requests), "--decode-tokens", str(a.decode_tokens),
                "--random-requests", str(a.random_requests), "--steps", str(a.steps)]
        cmd += ["--compile-backend", "eager" if name == "gptfast" else "none"] if name != "hf_eager" else []
    return cmd + a.baseline_args.split()


def run_baselines(a, res: dict, tmp: Path, env: dict, out: Path) -> None:
    """Start every baseline at once so their compiles (minutes of host work each) overlap; once all are
    compiled (or gone), let them measure one at a time, each with the GPU to itself."""
    names = [x for x in a.baselines.split(",") if x]
    procs = {}
    t0 = time.perf_counter()
    for name in names:
        res["errors"].pop(f"baselines.{name}", None)
        f, ready, go = tmp / f"{name}.json", tmp / f"{name}.ready", tmp / f"{name}.go"
        for x in (f, ready, go):
            x.unlink(missing_ok=True)
        logf = open(tmp / f"{name}.log", "w")
        cmd = baseline_cmd(a, name, f) + ["--ready-file", str(ready), "--go-file", str(go)]
        log("$ " + " ".join(cmd))
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT), logf)
    deadline = t0 + a.baseline_compile_timeout_s
    while time.perf_counter() < deadline and not all(
            (tmp / f"{n}.ready").exists() or p.poll() is not None for n, (p, _) in procs.items()):
        time.sleep(0.5)
    log(f"baselines compiled (or stopped) after {time.perf_counter() - t0:.0f} s")
    for name, (p, logf) in procs.items():
        t1 = time.perf_counter()
        (tmp / f"{name}.go").touch()
        try:
            rc = p.wait(timeout=a.baseline_timeout_s if (tmp / f"{name}.ready").exists() else 1)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
            rc = 124 if rc != 0 else rc
        logf.close()
        text = (tmp / f"{name}.log").read_text()
        sys.stdout.write(text)
        f = tmp / f"{name}.json"
        if f.exists():
            got = json.loads(f.read_text())
            res["baselines"][name] = {k: got[k] for k in got if k not in ("date", "torch", "triton", "device")}
        if rc:
            res["errors"][f"baselines.{name}"] = f"exit {rc}: {text[-1500:]}"
        res["wall_s"][f"baselines.{name}.measure"] = round(time.perf_counter() - t1, 1)
        add_floors(res, a)
        write(out, res)



def add_floors(res: dict, a) -> None:
    bw = res.get("copy_bandwidth_tbs")
    hf = hf_dict(a.preset, a.layers)
    nbytes = {"float16": 2, "bfloat16": 2, "float32": 4}[a.dtype]
    tables = [res.get("decode_by_batch") or {}] + [b.get("decode_by_batch") or {}
                                                   for b in res.get("baselines", {}).values()]
    for table in tables:
        for b, row in table.items():
            w, kv = decode_bytes(hf, int(b), a.context, nbytes)
            row["bytes_read"] = w + kv
            if bw:
                row["floor_ms"] = round((w + kv) / (bw * 1e12) * 1e3, 4)
                row["x_floor"] = round(row["step_ms_p50"] / row["floor_ms"], 3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, durations of seconds")
    p.add_argument("--parts", default="copy,engine,baselines")
    p.add_argument("--engine-parts", default=",".join(ENGINE_PARTS))
    p.add_argument("--baselines", default=",".join(BASELINES))
    p.add_argument("--out", default=None, help="default bench/results/batched-<date>-<gpu>.json")
    p.add_argument("--resume", action="store_true", help="keep the parts of an existing --out not run now")
    p.add_argument("--preset", default="llama-2-7b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--seed", type=int, default=0, help="weight seed, the same for every engine")
    p.add_argument("--max-context", type=int, default=1024)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--decode-batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--buckets", type=int, nargs="+", default=EDGES, help="engine prefill buckets")
    p.add_argument("--baseline-buckets", type=int, nargs="+", default=DEFAULT_BASELINE_BUCKETS,
                   help="prefill buckets the compiled baselines compile (one compile each)")
    p.add_argument("--baseline-batches", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--context", type=int, default=300, help="every stream's context in the decode timing")
    p.add_argument("--steps", type=int, default=100, help="decode steps timed per batch size")
    p.add_argument("--lengths", type=int, nargs="+", default=[10, 50, 100, 200, 500])
    p.add_argument("--requests", type=int, default=30, help="engine: requests per length")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--random-requests", type=int, default=200)
    p.add_argument("--random-decode-tokens", type=int, default=8)
    p.add_argument("--unseen-length", type=int, default=300)
    p.add_argument("--out-tokens", type=int, default=128, help="load/capacity: output tokens per request")
    p.add_argument("--saturate-s", type=float, default=8.0)
    p.add_argument("--utilizations", type=float, nargs="+", default=UTILIZATIONS)
    p.add_argument("--load-s", type=float, default=15.0, help="arrival window per load rate")
    p.add_argument("--drain-s", type=float, default=30.0, help="most seconds to wait for a rate's last requests")
    p.add_argument("--capacity-streams", type=int, nargs="+", default=[8, 12, 16, 20, 24, 28, 32])
    p.add_argument("--capacity-s", type=float, default=6.0)
    p.add_argument("--ttft-slo-x", type=float, default=2.0)
    p.add_argument("--tpot-slo-x", type=float, default=1.5)
    p.add_argument("--sample-s", type=float, default=0.005, help="how often stats()['running'] is sampled")
    p.add_argument("--no-mixed-prefill", action="store_true", help="the engine without mixed steps (an A/B)")
    p.add_argument("--copy-mib", type=int, default=2048)
    p.add_argument("--copy-iters", type=int, default=30)
    p.add_argument("--check-lengths", type=int, nargs="*", default=[], help="greedy tokens recorded (dry run)")
    p.add_argument("--check-tokens", type=int, default=8)
    p.add_argument("--engine-timeout-s", type=float, default=330)
    p.add_argument("--baseline-compile-timeout-s", type=float, default=420,
                   help="most seconds for the baselines' compiles, which run side by side")
    p.add_argument("--baseline-timeout-s", type=float, default=150, help="most seconds for one baseline's measuring")
    p.add_argument("--baseline-args", default="", help="extra arguments for every baseline (quoted)")
    p.add_argument("--worker", choices=["copy", "engine"], default=None, help=argparse.SUPPRESS)
    pre, _ = p.parse_known_args(argv)
    if pre.dry_run:
        p.set_defaults(preset="tiny", device="cpu", dtype="float32", max_context=640, max_batch=8,
                       decode_batch_sizes=[1, 2, 4, 8], buckets=[16, 32, 64, 128, 256, 512],
                       baseline_batches=[1, 4], context=40, steps=5, requests=2, decode_tokens=4,
                       random_requests=4, random_decode_tokens=2, out_tokens=6, saturate_s=1.0, load_s=1.0,
                       drain_s=20.0, capacity_streams=[2, 4, 8], capacity_s=1.0, copy_mib=16, copy_iters=5,
                       check_lengths=[5, 17, 40], check_tokens=6, engine_timeout_s=600, baseline_timeout_s=600,
                       baseline_compile_timeout_s=600)
    a = p.parse_args(argv)
    a.engine_parts = [x for x in a.engine_parts.split(",") if x] if isinstance(a.engine_parts, str) else a.engine_parts
    if a.worker == "copy":
        write(Path(a.out), copy_worker(a))
        return 0
    if a.worker == "engine":
        engine_worker(a)
        return 0

    # parent
    import torch  # only for names and versions: CUDA stays uninitialised here, the children own the GPU

    from bench.baselines.common import env_info
    info = {}
    if a.device == "cuda":
        info = json.loads(subprocess.run([sys.executable, "-c", "import json, torch; from bench.baselines.common "
                                          "import env_info; print(json.dumps(env_info('cuda')))"], cwd=ROOT,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                                         text=True, check=True).stdout)
    else:
        info = env_info("cpu")
    words = info["device"].split()
    gpu = "cpu" if a.device == "cpu" else (words[1].lower() if len(words) > 1 else "gpu")
    out = Path(a.out) if a.out else RESULTS / f"batched-{info['date'][:10]}-{gpu}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    res: dict = json.loads(out.read_text()) if a.resume and out.exists() else {}
    res.update(info)
    res.update({"preset": a.preset, "layers": a.layers or hf_dict(a.preset)["num_hidden_layers"],
                "cuda": torch.version.cuda, "args": {k: v for k, v in vars(a).items() if k != "worker"}})
    res.setdefault("errors", {})
    res.setdefault("wall_s", {})
    res.setdefault("baselines", {})
    tmp = out.parent / f".{out.stem}.parts"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    me = [sys.executable, str(Path(__file__).resolve())]
    parts = [x for x in a.parts.split(",") if x]
    for part in parts:
        t0 = time.perf_counter()
        if part in ("copy", "engine"):
            for k in [k for k in res["errors"] if k == part or k.startswith(f"{part}.")]:
                del res["errors"][k]      # --resume: an earlier run's error of a part run again now
            f = tmp / f"{part}.json"
            f.unlink(missing_ok=True)
            rc, tail = child(me + ["--worker", part, "--out", str(f)] + worker_args(a),
                             a.engine_timeout_s if part == "engine" else 120, env)
            if f.exists():
                got = json.loads(f.read_text())
                res["errors"].update({f"engine.{k}": v for k, v in got.pop("errors", {}).items()})
                res["wall_s"].update({f"engine.{k}": v for k, v in got.pop("wall_s", {}).items()})
                res.update(got)
            if rc:
                res["errors"][part] = f"exit {rc}: {tail[-1500:]}"
        elif part == "baselines":
            run_baselines(a, res, tmp, env, out)
        else:
            raise SystemExit(f"unknown part {part!r}: choose from copy, engine, baselines")
        res["wall_s"][part] = round(time.perf_counter() - t0, 1)
        add_floors(res, a)
        write(out, res)
    res["finite"] = finite({k: res[k] for k in ("copy_bandwidth_tbs", "bs1", "decode_by_batch", "load") if k in res})
    write(out, res)
    log(f"wrote {out}")
    for k, v in res["errors"].items():
        log(f"ERROR {k}: {v.splitlines()[0] if v else ''}")
    print(summary(res))
    return 1 if res["errors"] else 0


def summary(res: dict) -> str:
    """A short markdown digest of the run (the JSON holds everything)."""
    lines = [f"{res.get('device')} torch {res.get('torch')} copy {res.get('copy_bandwidth_tbs')} TB/s"]

    def bs1_row(name, b):
        t = b.get("ttft_ms", {})
        cells = " | ".join(f"{t[k]['p50']:.2f}" for k in ("10", "50", "100", "200", "500", "random") if k in t)
        return f"| {name} | {cells} | {b.get('tpot_ms', {}).get('p50', float('nan')):.3f} |"
    lines += ["| engine | TTFT p50 10/50/100/200/500/random (ms) | TPOT p50 |", "|---|---|---|"]
    if "bs1" in res:
        lines.append(bs1_row("hybrid", res["bs1"]))
    for n, b in res.get("baselines", {}).items():
        if "bs1" in b:
            lines.append(bs1_row(n, b["bs1"]))
    for name, table in [("hybrid", res.get("decode_by_batch"))] + \
            [(n, b.get("decode_by_batch")) for n, b in res.get("baselines", {}).items()]:
        if table:
            lines.append(f"decode {name}: " + ", ".join(
                f"B={k} {v['step_ms_p50']:.3f} ms" + (f" (x{v['x_floor']} floor)" if "x_floor" in v else "")
                for k, v in table.items()))
    if "capacity_at_slo_streams" in res:
        lines.append(f"capacity at SLO: {res['capacity_at_slo_streams']} streams")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
