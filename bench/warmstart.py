#!/usr/bin/env python
"""Warm start through the artifact store: process start -> first token, cold vs seeded.

Each measurement is a fresh Python process (a new replica): the parent notes the time just before
it spawns the child, the child builds ``HybridEngine(EngineConfig(model=..., store=..., ...))``,
reports when the engine is ready, then serves one request and reports when its first token was
on the host and which path served it ("graph" = CUDA-graph replay).

  (a) cold:   empty store, empty Triton cache -> compiles, serves, then captures the buckets to
              publish (``--publish-buckets``) and shuts down (the engine publishes).
  (b) seeded: same config, empty Triton cache, the store filled by (a) -> loads the artifacts,
              captures the store's warm buckets before ready, serves.

The store's entries are signed: the run makes a fresh Ed25519 key pair, the cold child holds the
private key ($HYBRIDSERVE_STORE_SIGNING_KEY) and publishes, the seeded child trusts only the
public key (``store_public_keys``), as a replica does.

Both children get their own empty TRITON_CACHE_DIR / TORCHINDUCTOR_CACHE_DIR / XDG_CACHE_HOME, so
nothing but the store carries compile work from (a) to (b).

    python bench/warmstart.py --preset llama-2-7b                       # H100: the real number
    python bench/warmstart.py --preset llama-2-7b --layers 4 --repeat 3
    python bench/warmstart.py --device cpu --preset tiny --out /tmp/ws   # CPU dry run of the harness

Writes bench/results/warmstart-<date>-<gpu>.json (``--out`` to change the directory).
Target (issue 4): seeded ready <= 30 s and the first request after ready served by graph replay;
``--check`` exits 1 when it is not met (ignored on CPU, where there are no graphs).
"""
from __future__ import annotations

import time

_T_MAIN = time.time()          # as early as possible: the child's "interpreter is up" stamp

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULT_TAG = "WARMSTART_RESULT "
TARGET_READY_S = 30.0


# --------------------------------------------------------------------------------------------
# child: one replica start
# --------------------------------------------------------------------------------------------
def _parse_buckets(s: str | None):
    if s is None or s == "" or s == "none":
        return []
    if s == "all":
        return "all"
    return [int(x) for x in s.split(",") if x]


def _count_files(d: str | None) -> int:
    if not d or not os.path.isdir(d):
        return 0
    return sum(len(f) for _, _, f in os.walk(d))


def child(opts: dict) -> dict:
    sys.path.insert(0, str(REPO))
    import torch

    from engine import EngineConfig, HybridEngine, SamplingParams

    t_imported = time.time()
    kw = dict(model=opts["preset"], device=opts["device"], store=opts["store"],
              prewarm_buckets=_parse_buckets(opts["prewarm"]), store_public_keys=[opts["public_key"]])
    if opts.get("dtype"):
        kw["dtype"] = opts["dtype"]
    if opts.get("layers"):
        kw["num_layers"] = opts["layers"]
    if opts.get("buckets"):
        kw["buckets"] = _parse_buckets(opts["buckets"])
    if opts.get("max_context"):
        kw["max_context"] = opts["max_context"]
    if opts.get("cache_dir") and "cache_dir" in EngineConfig.model_fields:
        kw["cache_dir"] = opts["cache_dir"]     # a fresh local compile cache: only the store carries work
    cfg = EngineConfig(**kw)
    events: list[dict] = []

    t_ctor = time.time()
    eng = HybridEngine(cfg)
    t_ready = time.time()
    eng.add_listener(lambda ev: events.append(
        {k: v for k, v in ev.items() if k != "metrics"} | {"t": time.time()})
        if ev.get("type") in ("store", "capture") else None)
    warm_at_ready = sorted(eng.warm_buckets())
    capturing_at_ready = sorted(eng.capturing_buckets())

    # the first request: a prompt in a fixed bucket
    n = int(opts["prompt_tokens"])
    text = "the quick brown fox jumps over the lazy dog " * (n // 4 + 8)
    ids = eng.tokenizer.encode(text)[: max(1, n - 1)]
    params = SamplingParams(max_tokens=int(opts["max_tokens"]), temperature=0.0, ignore_eos=True)
    t_req = time.time()
    res = eng.generate(ids, params)
    t_first = t_req + res.metrics.ttft_s
    t_done = time.time()
    first = {"path": res.metrics.path, "bucket": res.metrics.bucket,
             "prompt_tokens": res.metrics.prompt_tokens, "ttft_s": res.metrics.ttft_s,
             "tpot_s": res.metrics.tpot_s, "queue_s": res.metrics.queue_s,
             "output_tokens": len(res.token_ids)}
    res2 = eng.generate(ids, params)            # steady state, for reference
    second = {"path": res2.metrics.path, "ttft_s": res2.metrics.ttft_s, "tpot_s": res2.metrics.tpot_s}

    out: dict = {
        "mode": opts["mode"], "t_main": _T_MAIN, "t_imported": t_imported, "t_ctor": t_ctor,
        "t_ready": t_ready, "t_request": t_req, "t_first_token": t_first, "t_first_done": t_done,
        "first_request": first, "second_request": second,
        "warm_at_ready": warm_at_ready, "capturing_at_ready": capturing_at_ready,
        "device": str(eng.device), "device_name": (torch.cuda.get_device_name(eng.device)
                                                   if eng.device.type == "cuda" else "cpu"),
        "load_s": getattr(eng, "load_s", None), "compile_s": getattr(eng, "compile_s", None),
        "dtype": str(getattr(eng, "dtype", "")).replace("torch.", ""),
    }
    mgr = getattr(eng, "artifacts", None)
    if mgr is not None:
        out["fingerprint"] = getattr(mgr, "fingerprint", None)
        out["fingerprint_fields"] = getattr(mgr, "fields", None)
    restore = getattr(eng, "restore_result", None)
    if restore is not None:
        out["restore"] = {k: getattr(restore, k, None)
                          for k in ("loaded", "entry", "files", "warm_buckets", "warm_batches",
                                    "rejected", "skipped", "error", "seconds")}
        for k in ("warm_buckets", "warm_batches"):
            if isinstance(out["restore"].get(k), dict):
                out["restore"][k] = {str(b): v for b, v in out["restore"][k].items()}

    if opts["mode"] == "cold":
        # what this replica publishes: the buckets a warm fleet should capture before ready
        pub = opts["publish_buckets"]
        want = list(eng.buckets) if pub == "all" else _parse_buckets(pub) if pub != "served" else []
        t0 = time.time()
        if want and eng.device.type == "cuda" and hasattr(eng, "capture"):
            eng.capture(sorted(want, reverse=True), wait=True)
        deadline = time.time() + float(opts["capture_timeout"])
        while eng.capturing_buckets() and time.time() < deadline:
            time.sleep(0.05)
        out["captured_for_publish_s"] = time.time() - t0
        out["warm_at_exit"] = sorted(eng.warm_buckets())
    t_sd = time.time()
    eng.shutdown()
    out["shutdown_s"] = time.time() - t_sd
    out["events"] = events
    # the engine may point TRITON_CACHE_DIR at its own cache dir: count what it compiled/loaded there
    out["triton_cache_dir"] = os.environ.get("TRITON_CACHE_DIR")
    out["triton_cache_files"] = _count_files(os.environ.get("TRITON_CACHE_DIR"))
    out["engine_cache_files"] = _count_files(opts.get("cache_dir"))
    return out


# --------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------
def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "unknown"


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "triton", "transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def run_child(args, mode: str, store: str, work: Path, tag: str, keys: tuple[str, str]) -> dict:
    caches = {k: work / f"{tag}-{k.lower()}" for k in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
                                                      "XDG_CACHE_HOME", "HYBRIDSERVE_CACHE_DIR")}
    for d in caches.values():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    env = dict(os.environ, **{k: str(v) for k, v in caches.items()})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("HYBRIDSERVE_STORE_SIGNING_KEY", None)
    if mode == "cold":                  # the publisher holds the private key, the replica does not
        env["HYBRIDSERVE_STORE_SIGNING_KEY"] = keys[0]
    opts = {"mode": mode, "store": store, "public_key": keys[1], "preset": args.preset, "device": args.device,
            "dtype": args.dtype, "layers": args.layers, "buckets": args.buckets,
            "max_context": args.max_context, "prewarm": args.prewarm,
            "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
            "publish_buckets": args.publish_buckets, "capture_timeout": args.capture_timeout,
            "cache_dir": str(caches["HYBRIDSERVE_CACHE_DIR"])}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(opts)]
    t_spawn = time.time()
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=args.child_timeout)
    t_exit = time.time()
    line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith(RESULT_TAG)), None)
    if p.returncode != 0 or line is None:
        sys.stderr.write(p.stderr[-6000:])
        raise SystemExit(f"{mode} child failed (rc={p.returncode})")
    r = json.loads(line[len(RESULT_TAG):])
    r["stderr_tail"] = p.stderr[-3000:]
    # all times relative to the spawn of the process
    r["process_start_to_python_s"] = r["t_main"] - t_spawn
    r["process_start_to_ready_s"] = r["t_ready"] - t_spawn
    r["process_start_to_first_token_s"] = r["t_first_token"] - t_spawn
    r["engine_ctor_s"] = r["t_ready"] - r["t_ctor"]
    r["imports_s"] = r["t_imported"] - r["t_main"]
    r["process_total_s"] = t_exit - t_spawn
    return r


def _store_entries(store: str, public_key: str) -> list[dict]:
    sys.path.insert(0, str(REPO))
    from artifacts import ArtifactStore, Trust, load_public_key

    return [{"fingerprint": i.fingerprint, "entry": i.entry, "complete": i.complete,
             "trusted": i.trusted, "files": i.files, "bytes": i.bytes,
             "warm_buckets": {str(k): v for k, v in i.warm_buckets.items()},
             "warm_batches": {str(k): v for k, v in i.warm_batches.items()}}
            for i in ArtifactStore(store, Trust((load_public_key(public_key),))).ls()]


def _median(xs):
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.median(xs) if xs else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-2-7b")
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers (quick runs)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None)
    ap.add_argument("--buckets", default=None, help="comma-separated prefill buckets (default: engine's)")
    ap.add_argument("--max-context", type=int, default=None)
    ap.add_argument("--prewarm", default="none",
                    help="prewarm_buckets of both replicas: none | all | 16,128 (default none: "
                         "the seeded replica's warm list comes from the store)")
    ap.add_argument("--publish-buckets", default="all",
                    help="what the cold replica captures before it shuts down and publishes: "
                         "all | served | 16,128 (default all, like `hybridserve warm`)")
    ap.add_argument("--prompt-tokens", type=int, default=100, help="first request's prompt length")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1, help="cold+seeded pairs (medians reported)")
    ap.add_argument("--store", default=None, help="store root (default: a fresh temp dir); each "
                    "repeat uses an empty sub-directory")
    ap.add_argument("--workdir", default=None, help="scratch dir for caches (default: temp)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--child-timeout", type=float, default=1800)
    ap.add_argument("--capture-timeout", type=float, default=600)
    ap.add_argument("--check", action="store_true", help="exit 1 if the target is not met (CUDA)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child is not None:
        res = child(json.loads(args.child))
        print(RESULT_TAG + json.dumps(res, default=str), flush=True)
        return 0

    sys.path.insert(0, str(REPO))
    from artifacts import generate

    work = Path(args.workdir or tempfile.mkdtemp(prefix="warmstart-"))
    work.mkdir(parents=True, exist_ok=True)
    store_root = Path(args.store) if args.store else work / "store"
    runs = []
    for rep in range(args.repeat):
        store = store_root / f"rep{rep}"
        shutil.rmtree(store, ignore_errors=True)
        store.mkdir(parents=True)
        print(f"[{rep}] cold start (empty store {store}) ...", file=sys.stderr, flush=True)
        keys = generate()
        cold = run_child(args, "cold", str(store), work, f"cold{rep}", keys)
        entries = _store_entries(str(store), keys[1])
        print(f"[{rep}]   ready {cold['process_start_to_ready_s']:.1f}s, first token "
              f"{cold['process_start_to_first_token_s']:.1f}s ({cold['first_request']['path']}); "
              f"published {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}",
              file=sys.stderr, flush=True)
        if not entries:
            print(f"[{rep}]   WARNING: the cold replica published nothing to the store "
                  "(engine not wired to the store, or nothing to publish on this device)",
                  file=sys.stderr, flush=True)
        print(f"[{rep}] seeded start ...", file=sys.stderr, flush=True)
        seeded = run_child(args, "seeded", str(store), work, f"seeded{rep}", keys)
        print(f"[{rep}]   ready {seeded['process_start_to_ready_s']:.1f}s, first token "
              f"{seeded['process_start_to_first_token_s']:.1f}s ({seeded['first_request']['path']})",
              file=sys.stderr, flush=True)
        runs.append({"rep": rep, "store_entries": entries, "cold": cold, "seeded": seeded})

    def med(mode, key):
        return _median([r[mode][key] for r in runs])

    device_name = runs[0]["cold"]["device_name"]
    paths = [r["seeded"]["first_request"]["path"] for r in runs]
    summary = {
        "cold_ready_s": med("cold", "process_start_to_ready_s"),
        "cold_first_token_s": med("cold", "process_start_to_first_token_s"),
        "cold_first_path": [r["cold"]["first_request"]["path"] for r in runs],
        "seeded_ready_s": med("seeded", "process_start_to_ready_s"),
        "seeded_first_token_s": med("seeded", "process_start_to_first_token_s"),
        "seeded_first_path": paths,
        "seeded_warm_at_ready": runs[0]["seeded"]["warm_at_ready"],
        "cold_compile_s": med("cold", "compile_s"),
        "seeded_compile_s": med("seeded", "compile_s"),
        "published_entries": [len(r["store_entries"]) for r in runs],
    }
    if summary["cold_first_token_s"] and summary["seeded_first_token_s"]:
        summary["first_token_speedup"] = summary["cold_first_token_s"] / summary["seeded_first_token_s"]
    met = (summary["seeded_ready_s"] is not None and summary["seeded_ready_s"] <= TARGET_READY_S
           and all(p == "graph" for p in paths))
    now = _dt.datetime.now(_dt.timezone.utc)
    doc = {
        "bench": "warmstart", "date": now.isoformat(timespec="seconds"),
        "device": args.device, "device_name": device_name, **_versions(),
        "cuda": None, "config": {k: v for k, v in vars(args).items() if k not in ("child",)},
        "summary": summary,
        "target": {"seeded_ready_s_max": TARGET_READY_S, "seeded_first_path": "graph", "met": met},
        "runs": runs,
    }
    try:
        import torch

        doc["cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001
        pass
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"warmstart-{now:%Y%m%d}-{_slug(device_name)}.json"
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(json.dumps({"out": str(out), **summary, "target_met": met}, indent=1, default=str))
    if args.check and args.device == "cuda" and not met:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
