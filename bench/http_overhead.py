"""HTTP streaming TTFT vs the engine's own TTFT, through the full Ray Serve app.

Starts a local Ray Serve app with ONE model replica (GPU: llama-2-7b preset, ``--layers N`` for a
shorter model), sends ``--requests`` streaming /v1/completions per prompt length one at a time
over a keep-alive HTTP connection, and for each request compares

  client TTFT  = request sent -> first SSE event carrying a token arrives (client clock)
  engine TTFT  = the engine's RequestMetrics.ttft_s for that same request (reported in the
                 final SSE chunk's ``hybridserve.engine_ttft_ms``)

overhead = client - engine is what HTTP + proxy + ingress (validation, tokenization) + router +
Ray RPC + streaming back add. Target on an H100: p50 overhead <= 3 ms.

  python bench/http_overhead.py                       # CUDA, llama-2-7b
  python bench/http_overhead.py --layers 4            # CUDA, 4-layer 7B-shaped model
  python bench/http_overhead.py --device cpu --preset tiny --requests 30
Writes bench/results/http-overhead-<date>-<gpu|cpu>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(1, min(len(s), int(round(q / 100 * len(s) + 0.5))))
    return s[k - 1]


def summary(xs: list[float]) -> dict:
    return {"p50": round(pct(xs, 50), 3), "p90": round(pct(xs, 90), 3), "p99": round(pct(xs, 99), 3),
            "mean": round(statistics.fmean(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3),
            "n": len(xs)}


def one_request(client, url: str, prompt: str, max_tokens: int) -> tuple[float, float, dict]:
    """Returns (client_ttft_ms, client_e2e_ms, hybridserve meta of the final chunk); the meta's
    timeline gains client_send / client_first (wall clock, s)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    wall0 = time.time()
    t0 = time.perf_counter()
    ttft = None
    meta: dict = {}
    buf = b""
    with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
        for data in r.iter_raw():
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if not event.startswith(b"data: "):
                    continue
                payload = event[6:]
                if ttft is None and payload != b"[DONE]":
                    ttft = (time.perf_counter() - t0) * 1e3
                if payload != b"[DONE]":
                    obj = json.loads(payload)
                    if "hybridserve" in obj:
                        meta = obj["hybridserve"]
    e2e = (time.perf_counter() - t0) * 1e3
    assert ttft is not None and meta, "no token / no final chunk"
    meta.setdefault("timeline", {}).update(client_send=wall0, client_first=wall0 + ttft / 1e3)
    return ttft, e2e, meta


# wall-clock stages of one streamed request (same host, one clock): where the overhead goes
HOPS = {
    "client->ingress": ("client_send", "ingress_in"),
    "  client->ASGI app": ("client_send", "http_in"),
    "  ASGI app->handler (parse, validate, tokenize)": ("http_in", "ingress_in"),
    "ingress->replica": ("ingress_in", "replica_in"),
    "replica: queue+prefill+first token": ("replica_in", "replica_first"),
    "replica->ingress": ("replica_first", "ingress_first"),
    "ingress->client": ("ingress_first", "client_first"),
    "  ingress->first SSE chunk built": ("ingress_first", "sse_first"),
    "  first SSE chunk->client": ("sse_first", "client_first"),
}


def device_info(device: str) -> dict:
    import ray
    import torch

    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count()}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_mem_gib=round(p.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--preset", default="llama-2-7b")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--lengths", default="16,128,512", help="prompt lengths in tokens (BOS included)")
    ap.add_argument("--requests", type=int, default=30, help="measured requests per length (>= 30)")
    ap.add_argument("--warmup", type=int, default=5, help="unmeasured requests per length")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--port", type=int, default=18200)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for every Ray process (e.g. RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0)")
    ap.add_argument("--tag", default="", help="suffix of the result file names (a leading '-' is added: --tag run1)")
    ap.add_argument("--topology", choices=["split", "colocated"], default="split")
    ap.add_argument("--app", action="append", default=[], metavar="KEY=JSON",
                    help="extra AppConfig field, e.g. user_code_thread=false access_log=false")
    ap.add_argument("--client-port", type=int, default=None,
                    help="send requests to this port instead of the proxy's (e.g. the ingress replica's own "
                         "port with RAY_SERVE_ENABLE_DIRECT_INGRESS=1: 30000)")
    args = ap.parse_args(argv)
    args.tag = "-" + args.tag.lstrip("-") if args.tag else ""   # "--tag -x" would parse as an option
    for kv in args.env:
        k, _, v = kv.partition("=")
        os.environ[k] = v
    # a stopping direct-ingress replica waits 30 s for load balancers by default: nothing to wait for here,
    # and a replica still draining would load the next run's machine
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")
    lengths = [int(x) for x in args.lengths.split(",")]

    import httpx
    import ray
    from ray import serve

    from deployments.app import build_app
    from engine.config import DEFAULT_BUCKETS

    max_context = 2048
    buckets = [b for b in DEFAULT_BUCKETS if b <= max_context]
    warm = sorted({min(b for b in buckets if b >= n) for n in lengths})
    engine = {"model": args.preset, "device": args.device, "max_context": max_context, "buckets": buckets,
              "prewarm_buckets": warm if args.device == "cuda" else []}
    if args.layers:
        engine["num_layers"] = args.layers
    extra = {k: json.loads(v) for k, v in (kv.partition("=")[::2] for kv in args.app)}
    app_args = {"engine": engine, "num_replicas": 1, "topology": args.topology, "num_gpus": 1 if args.device == "cuda" else 0,
                "num_cpus": 1, "router": {"stats_period_s": 1.0}, **extra}

    info = device_info(args.device)
    import torch

    # every GPU of the host: --app num_replicas=2 puts one replica on each of two
    ray.init(num_cpus=max(2, min(8, os.cpu_count() or 2)),
             num_gpus=torch.cuda.device_count() if args.device == "cuda" else 0,
             include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                 [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}})
    results: dict = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        t0 = time.perf_counter()
        serve.run(build_app(app_args), name="hybridserve", route_prefix="/")
        startup_s = time.perf_counter() - t0
        cport = args.client_port or args.port
        url = f"http://127.0.0.1:{cport}/v1/completions"
        with httpx.Client(timeout=600) as client:
            # floor: proxy + ingress round trip without the model (GET /healthz)
            hz = []
            for i in range(args.requests + args.warmup):
                t = time.perf_counter()
                client.get(f"http://127.0.0.1:{cport}/healthz").raise_for_status()
                if i >= args.warmup:
                    hz.append((time.perf_counter() - t) * 1e3)
            results["healthz_roundtrip_ms"] = summary(hz)
            print(f"GET /healthz round trip p50 {results['healthz_roundtrip_ms']['p50']:.2f} ms")
            for n in lengths:
                prompt = "x" * (n - 1)  # byte tokenizer presets: BOS + one token per byte
                for _ in range(args.warmup):
                    one_request(client, url, prompt, args.max_tokens)
                client_ttft, engine_ttft, overhead, e2e, paths, served_by = [], [], [], [], [], []
                hops: dict[str, list[float]] = {h: [] for h in HOPS}
                for _ in range(args.requests):
                    c, e, meta = one_request(client, url, prompt, args.max_tokens)
                    tl = meta["timeline"]
                    for h, (a, b) in HOPS.items():
                        if a in tl and b in tl:
                            hops[h].append((tl[b] - tl[a]) * 1e3)
                    client_ttft.append(c)
                    engine_ttft.append(meta["engine_ttft_ms"])
                    overhead.append(c - meta["engine_ttft_ms"])
                    e2e.append(e)
                    paths.append(meta["path"])
                    served_by.append(str(meta.get("replica")))
                results[str(n)] = {
                    "bucket": meta["bucket"], "paths": {p: paths.count(p) for p in set(paths)},
                    "replicas": {x: served_by.count(x) for x in set(served_by)},
                    "client_ttft_ms": summary(client_ttft), "engine_ttft_ms": summary(engine_ttft),
                    "overhead_ms": summary(overhead), "client_e2e_ms": summary(e2e),
                    "hops_ms": {h: summary(v) for h, v in hops.items() if v},
                }
                r = results[str(n)]
                print(f"len {n:5d} bucket {r['bucket']:5d} paths {r['paths']}: client TTFT p50 "
                      f"{r['client_ttft_ms']['p50']:.2f} ms, engine p50 {r['engine_ttft_ms']['p50']:.2f} ms, "
                      f"overhead p50 {r['overhead_ms']['p50']:.2f} / p99 {r['overhead_ms']['p99']:.2f} ms")
                print("   hops p50 (ms): " + ", ".join(f"{h} {v['p50']:.2f}" for h, v in r["hops_ms"].items()))
    finally:
        serve.shutdown()
        ray.shutdown()

    all_over = [v["overhead_ms"]["p50"] for k, v in results.items() if k.isdigit()]
    tag = info.get("gpu", "cpu").replace("NVIDIA ", "").replace(" ", "-").lower() + args.tag
    out = {
        "benchmark": "http-overhead",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "definition": "overhead = client TTFT (request sent -> first SSE token event, keep-alive HTTP) "
                      "- engine TTFT (RequestMetrics.ttft_s of the same request)",
        "target": "p50 overhead <= 3 ms on an H100",
        "config": {"device": args.device, "preset": args.preset, "layers": args.layers, "lengths": lengths,
                   "requests_per_length": args.requests, "warmup_per_length": args.warmup,
                   "max_tokens": args.max_tokens, "replicas": app_args["num_replicas"], "app_args": app_args, "env": args.env},
        "startup_s": round(startup_s, 2),
        "device_info": info,
        "results": results,
        "max_p50_overhead_ms": max(all_over) if all_over else None,
        "meets_target": bool(all_over) and max(all_over) <= 3.0,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"http-overhead-{dt.date.today().isoformat()}-{tag}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
