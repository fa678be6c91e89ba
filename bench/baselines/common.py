"""Shared by the baselines and bench/batched.py: the engine's random weights, timing summaries, CLI and JSON.

Imports neither the engine package (its pydantic config) nor Ray, so a baseline runs on a bare torch +
transformers GPU image. ``random_weights`` repeats engine.model.random_weights draw for draw (a CPU test
checks they stay bitwise equal), so every engine in a run computes with the same weights.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import random
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# buckets the compiled baselines compile a prefill for: the smallest set holding the bench lengths 10-500
DEFAULT_BASELINE_BUCKETS = [16, 64, 128, 256, 512]


def presets() -> dict[str, dict]:
    """engine/presets.py's PRESETS, loaded from its file (a plain dict module) without importing the engine."""
    spec = importlib.util.spec_from_file_location("_hs_presets", ROOT / "engine" / "presets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.PRESETS


def hf_dict(preset: str, num_layers: int | None = None) -> dict:
    """The preset as an HF config dict (LlamaConfig(**it)), layers overridden for quick runs."""
    d = dict(presets()[preset])
    if num_layers:
        d["num_hidden_layers"] = num_layers
    return d


def random_weights(hf: dict, device: torch.device | str, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """HF-named random weights, drawn in engine.model.random_weights' order from one seeded generator."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    D, I = hf["hidden_size"], hf["intermediate_size"]
    nh, nkv = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    hd = hf.get("head_dim") or D // nh

    def rnd(*shape: int) -> torch.Tensor:
        return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=g)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=dtype)

    wts = {"model.embed_tokens.weight": rnd(hf["vocab_size"], D), "model.norm.weight": ones(D)}
    if not hf.get("tie_word_embeddings", False):
        wts["lm_head.weight"] = rnd(hf["vocab_size"], D)
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        wts.update({
            p + "self_attn.q_proj.weight": rnd(nh * hd, D),
            p + "self_attn.k_proj.weight": rnd(nkv * hd, D),
            p + "self_attn.v_proj.weight": rnd(nkv * hd, D),
            p + "self_attn.o_proj.weight": rnd(D, nh * hd),
            p + "mlp.gate_proj.weight": rnd(I, D), p + "mlp.up_proj.weight": rnd(I, D),
            p + "mlp.down_proj.weight": rnd(D, I),
            p + "input_layernorm.weight": ones(D), p + "post_attention_layernorm.weight": ones(D),
        })
    return wts


def decode_bytes(hf: dict, batch: int, context: int, dtype_bytes: int = 2) -> tuple[int, int]:
    """(weight bytes, KV bytes) one decode step must read at ``batch`` streams of ``context`` tokens each:
    every layer's matrices, the final norm and lm_head, one embedding row per stream; K and V of each
    stream's context."""
    D, I, L = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    nh, nkv = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    hd = hf.get("head_dim") or D // nh
    per_layer = D * (nh * hd) + 2 * D * (nkv * hd) + (nh * hd) * D + 3 * D * I + 2 * D
    weights = L * per_layer + D + hf["vocab_size"] * D + batch * D
    kv = batch * L * 2 * nkv * hd * context
    return weights * dtype_bytes, kv * dtype_bytes


# ------------------------------------------------------------------ timing
def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summ(xs_s: list[float]) -> dict:
    """p50/p99 in ms of samples in seconds (n: how many)."""
    if not xs_s:
        return {"p50": float("nan"), "p99": float("nan"), "n": 0}
    ms = [x * 1e3 for x in xs_s]
    return {"p50": round(statistics.median(ms), 4), "p99": round(pct(ms, 99), 4), "n": len(ms)}


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def rand_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    """A prompt of n random token ids, BOS first (ids 0-2 are pad/bos/eos)."""
    return [1] + [rng.randrange(3, vocab) for _ in range(n - 1)]


class StepTimer:
    """Times one step: CUDA events on the current stream (GPU time from the step's start to its end,
    launch gaps included) and host wall time; CPU: wall time only."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.a.record()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.b.record()
            torch.cuda.synchronize()
        self.wall_s = time.perf_counter() - self.t0
        self.gpu_s = self.a.elapsed_time(self.b) / 1e3 if self.cuda else self.wall_s


# generate(ids, n) -> (token ids, ttft_s, gaps_s): n greedy tokens, each read on the host as it is made
GenerateFn = Callable[[list[int], int], tuple[list[int], float, list[float]]]


def measure_bs1(gen: GenerateFn, vocab: int, lengths: list[int], requests: int, decode_tokens: int,
                random_requests: int, random_decode_tokens: int, seed: int = 1234, log=print) -> dict:
    """Batch-1 TTFT per prompt length and over uniform random lengths 10-500, TPOT from the per-length runs.
    Each length is run once first (warm-up; a compiled baseline compiles its bucket there)."""
    rng = random.Random(seed)
    for n in lengths:
        gen(rand_ids(rng, n, vocab), 2)
    ttft, tpot = {}, []
    for n in lengths:
        tt = []
        for _ in range(requests):
            _, t, gaps = gen(rand_ids(rng, n, vocab), decode_tokens)
            tt.append(t)
            tpot += gaps
        ttft[str(n)] = summ(tt)
        log(f"    len {n:4d}: ttft p50 {ttft[str(n)]['p50']:.3f} ms  p99 {ttft[str(n)]['p99']:.3f} ms")
    tt = []
    for _ in range(random_requests):
        _, t, gaps = gen(rand_ids(rng, rng.randint(10, 500), vocab), random_decode_tokens)
        tt.append(t)
    ttft["random"] = summ(tt)
    out = {"ttft_ms": ttft, "tpot_ms": summ(tpot)}
    log(f"    random ttft p50 {ttft['random']['p50']:.3f} p99 {ttft['random']['p99']:.3f}  "
        f"tpot p50 {out['tpot_ms']['p50']:.3f} p99 {out['tpot_ms']['p99']:.3f} ms")
    return out


def greedy_check(gen: GenerateFn, vocab: int, lengths: list[int], n_tokens: int, seed: int = 99) -> dict:
    """Greedy tokens for fixed seeded prompts: the dry-run test compares them across engines."""
    rng = random.Random(seed)
    prompts = [rand_ids(rng, n, vocab) for n in lengths]
    return {"prompts": prompts, "tokens": [gen(p, n_tokens)[0] for p in prompts]}


def finite(obj) -> bool:
    """True when every number in a JSON-like tree is finite."""
    if isinstance(obj, dict):
        return all(finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(finite(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


def env_info(device: str) -> dict:
    info = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    info["device"] = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu"
    return info


# ------------------------------------------------------------------ baseline CLI
def pad_to_bucket(ids: list[int], buckets: list[int], device) -> torch.Tensor:
    """ids right-padded with zeros to the smallest bucket that holds them, as a (1, bucket) tensor."""
    n = len(ids)
    b = next((b for b in buckets if b >= n), None)
    if b is None:
        raise ValueError(f"prompt of {n} tokens exceeds the largest bucket {buckets[-1]}: add --buckets")
    x = torch.zeros((1, b), dtype=torch.long, device=device)
    x[0, :n] = torch.tensor(ids, device=device)
    return x


def baseline_parser(doc: str, compiled: bool = False) -> argparse.ArgumentParser:
    """The options every baseline takes; compiled: also its torch.compile backend and modes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if compiled:
        p.add_argument("--compile-backend", default="inductor", choices=["inductor", "eager", "none"],
                       help="eager: dynamo traces fullgraph without codegen (CPU dry run); none: no torch.compile")
        p.add_argument("--decode-mode", default="reduce-overhead",
                       help="torch.compile mode of the decode step (reduce-overhead | max-autotune)")
        p.add_argument("--prefill-mode", default="reduce-overhead",
                       help="torch.compile mode of each prefill bucket "
                            "(reduce-overhead | max-autotune-no-cudagraphs | default)")
    p.add_argument("--preset", default="llama-2-7b")
    p.add_argument("--layers", type=int, default=None, help="fewer layers (quick runs)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16", choices=list(DTYPES))
    p.add_argument("--seed", type=int, default=0, help="weight seed (the engine's EngineConfig.seed)")
    p.add_argument("--max-context", type=int, default=1024, help="static KV cache length")
    p.add_argument("--buckets", type=int, nargs="+", default=DEFAULT_BASELINE_BUCKETS,
                   help="prefill buckets (compiled baselines: one compile each)")
    p.add_argument("--lengths", type=int, nargs="+", default=[10, 50, 100, 200, 500])
    p.add_argument("--requests", type=int, default=20, help="requests per length")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--random-requests", type=int, default=60)
    p.add_argument("--random-decode-tokens", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8, 16], help="decode batch sizes timed")
    p.add_argument("--context", type=int, default=300, help="context of every stream in the decode timing")
    p.add_argument("--steps", type=int, default=50, help="decode steps timed per batch size")
    p.add_argument("--check-lengths", type=int, nargs="*", default=[],
                   help="prompt lengths whose greedy tokens are recorded (consistency check)")
    p.add_argument("--check-tokens", type=int, default=8)
    p.add_argument("--out", required=True)
    p.add_argument("--ready-file", default=None, help="written once compiled; then wait for --go-file to measure "
                                                       "(bench/batched.py compiles the baselines side by side)")
    p.add_argument("--go-file", default=None)
    p.add_argument("--go-timeout-s", type=float, default=1800)
    return p


def run_baseline(name: str, a: argparse.Namespace, build: Callable[[argparse.Namespace], object]) -> dict:
    """Build the baseline (timed: compile_s covers its compile and warm-up calls), measure, write JSON.

    ``build(a)`` returns an object with ``generate(ids, n)`` (GenerateFn), ``time_decode(batch, context,
    steps) -> list of (gpu_s, wall_s)``, ``warm()`` (compiles every shape it will run; returns per-shape
    seconds) and ``batches`` (the decode batch sizes it supports)."""
    out: dict = {"name": name, **env_info(a.device), "args": vars(a)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    eng = build(a)
    out["build_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    out["compile_by_shape_s"] = eng.warm()
    out["compile_s"] = round(time.perf_counter() - t0, 2)
    print(f"  {name}: built in {out['build_s']} s, compiled/warmed in {out['compile_s']} s", flush=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    if a.ready_file:            # compiled: measure only when the GPU is ours alone
        Path(a.ready_file).write_text(str(out["compile_s"]))
        deadline = time.time() + a.go_timeout_s
        while not Path(a.go_file).exists():
            if time.time() > deadline:
                raise SystemExit(f"{name}: no go file {a.go_file} within {a.go_timeout_s} s")
            time.sleep(0.1)
    t_measure = time.perf_counter()
    vocab = hf_dict(a.preset, a.layers)["vocab_size"]
    if a.check_lengths:
        out["greedy"] = greedy_check(eng.generate, vocab, a.check_lengths, a.check_tokens)
    out["bs1"] = measure_bs1(eng.generate, vocab, a.lengths, a.requests, a.decode_tokens,
                             a.random_requests, a.random_decode_tokens, log=lambda s: print(s, flush=True))
    Path(a.out).write_text(json.dumps(out, indent=1))
    out["decode_by_batch"] = {}
    for b in [b for b in a.batches if b in eng.batches]:
        st = eng.time_decode(b, a.context, a.steps)
        out["decode_by_batch"][str(b)] = {"step_ms_p50": summ([g for g, _ in st])["p50"],
                                          "step_ms_p99": summ([g for g, _ in st])["p99"],
                                          "wall_ms_p50": summ([w for _, w in st])["p50"], "n": len(st)}
        print(f"    decode B={b}: {out['decode_by_batch'][str(b)]}", flush=True)
        Path(a.out).write_text(json.dumps(out, indent=1))
    out["measure_s"] = round(time.perf_counter() - t_measure, 1)
    Path(a.out).write_text(json.dumps(out, indent=1))
    return out
