"""Simulate the fleet at 10, 100 and 1,000 replicas under the project's P99 policy + warm-bucket router
and under Ray's queue-length autoscaling + default router; validate against the 2-GPU runs.

    python -m fleetsim.run --out bench/results/sim-2026-12-02.json --plots docs/img --before
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from fleetsim import adapters, traces
from fleetsim.model import PlatformModel, ReplicaModel
from fleetsim.sim import SimConfig, Simulation

BUCKETS = (16, 32, 64, 128, 256, 384, 512, 1024, 2048)    # EngineConfig's default buckets
STORE_BUCKETS = (16, 32, 64, 128, 256, 384, 512)          # the store seeds these; longer ones warm at run time
MAX_TOKENS = 32


#: the at-scale knobs (docs/simulation.md): the first four at their defaults; downscale_repeat_s,
#: fleet_p99 "mixture", scale_up_utilization and busy_per_slot are off by default (the 2-GPU behaviour)
AT_SCALE: Dict[str, object] = {"max_step_up_fraction": 1.0, "max_step_down_fraction": 0.1,
                               "demand_utilization": 0.65, "max_utilization_pooled": 0.65,
                               "downscale_repeat_s": 15.0, "fleet_p99": "mixture",
                               "scale_up_utilization": 0.85, "busy_per_slot": True}


def p99_kwargs(objective_ms: float, n: int, fixed: bool) -> dict:
    """The policy's kwargs as the 2-GPU fleet runs set them (bench/fleet.py), objective 4 x service,
    with the at-scale knobs (fixed) or without them (the policy before the 2026-12-01 fix)."""
    kw = dict(p99_ttft_ms=objective_ms, upscale_delay_s=5.0, downscale_delay_s=60.0, min_samples=10,
              queue_signal=True, max_utilization=0.6, **AT_SCALE)
    if not fixed:
        kw.update(BEFORE_FIX)
    return kw


#: the policy before the 2026-12-01 fix (the straggler case): fixed step caps only
BEFORE_FIX: Dict[str, object] = {"max_step_up_fraction": None, "max_step_down_fraction": None,
                                  "demand_utilization": None, "max_utilization_pooled": None,
                                  "downscale_repeat_s": None, "fleet_p99": "max",
                                  "scale_up_utilization": None, "busy_per_slot": False}

#: "before" in the results: the policy as on main before this change, its own decide (git show of
#: autoscale/policy.py at MAIN_REV) with the kwargs the 2026-12-01 results ran it with
MAIN_REV = "40e1f42"
MAIN_KWARGS: Dict[str, object] = {"max_step_up_fraction": 1.0, "max_step_down_fraction": 0.1,
                                   "demand_utilization": 0.75}
ROOT = Path(__file__).resolve().parents[1]


def main_decide(rev: str = MAIN_REV):
    """``decide`` of autoscale/policy.py at ``rev``, imported beside the current one (its types are
    a subset of today's autoscale/types.py)."""
    name = f"autoscale._policy_{rev}"
    if name not in sys.modules:
        src = subprocess.run(["git", "show", f"{rev}:autoscale/policy.py"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
        mod = types.ModuleType(name)
        mod.__package__ = "autoscale"
        sys.modules[name] = mod              # (its dataclasses look their module up)
        exec(compile(src, f"{rev}:autoscale/policy.py", "exec"), mod.__dict__)
    return sys.modules[name].decide


def engine_model(engine: str) -> ReplicaModel:
    """batch1: the batch-1 engine (the 2-GPU runs'); batched: decode by batch size from
    bench/results/batched-*-h200.json (fleetsim/batched.py runs it)."""
    m = ReplicaModel.fitted(buckets=BUCKETS, batched=engine == "batched")
    if engine == "batched" and m.max_batch == 1:
        raise SystemExit("no bench/results/batched-*-h200.json with decode_by_batch: no batched model")
    return m


def run_one(n: int, policy_name: str, lengths: str, model: ReplicaModel, seed: int = 0,
            fixed: bool = True, candidates: int = 16, tick_s: Optional[float] = None,
            trace_kw: Optional[dict] = None, variant: str = "p99") -> dict:
    """One fleet of ``n`` on the diurnal-step trace. The trace's peak is n replicas' worth of load at
    60% of a replica's capacity (its saturated throughput: ``ReplicaModel.capacity_rps``); the
    objective 4 x one request's mean service time alone on a replica; variant "main": the policy as
    on main (MAIN_REV)."""
    rng = np.random.default_rng(seed)
    probs_mix = _length_probs(lengths, model)
    svc_ms = sum(p * model.service_ms(b, MAX_TOKENS) for b, p in probs_mix.items())
    cap = model.capacity_rps(probs_mix, MAX_TOKENS)
    objective = round(4.0 * svc_ms, 1)
    rate, dur, phases, t_step = traces.diurnal_step_rate(n, cap, **(trace_kw or {}))
    t = traces.arrivals(rate, dur, float(np.max(rate(np.linspace(0, dur, 20001)))) * 1.0001, rng)
    ln = (traces.lengths_uniform if lengths == "uniform" else traces.lengths_long_tail)(len(t), rng)
    lo_rep = max(1, math.ceil(n / 5))
    if policy_name == "p99":
        kw = p99_kwargs(objective, n, fixed)
        if variant == "main":
            kw = {k: v for k, v in kw.items() if k not in AT_SCALE} | MAIN_KWARGS
        pol = adapters.P99Policy(decide_fn=main_decide() if variant == "main" else None, **kw)
        router = "warm_bucket"
    else:   # Ray's queue-length policy: target 1 ongoing request at batch 1 (the fleet runs'), half the slots batched
        target = 1.0 if model.max_batch == 1 else model.max_batch / 2
        pol = adapters.QueueLengthPolicy(target, 5.0, 60.0, 1, 2 * n)
        router = "po2"
    sim = Simulation(SimConfig(model=model, platform=PlatformModel(max_ongoing_requests=model.max_batch + 7),
                               policy=pol, min_replicas=1,
                               max_replicas=2 * n, initial_replicas=lo_rep, max_tokens=MAX_TOKENS,
                               store_buckets=STORE_BUCKETS, router=router, candidates=candidates,
                               tick_s=tick_s or (0.1 if n <= 100 else 1.0), seed=seed,
                               http_overhead_ms=3.0))
    w0 = time.time()
    sim.run(dur, arrivals=(t, ln))
    wall = time.time() - w0
    out = summarise(sim, rate, dur, phases, t_step, objective, 1.0 / cap, n, policy_name, wall)
    out["capacity_rps"] = round(cap, 3)
    return out


def _length_probs(lengths: str, model: ReplicaModel) -> Dict[int, float]:
    rng = np.random.default_rng(12345)
    ln = (traces.lengths_uniform if lengths == "uniform" else traces.lengths_long_tail)(200000, rng)
    bks = np.array(model.buckets)
    idx = np.minimum(np.searchsorted(bks, ln), len(bks) - 1)
    cnt = np.bincount(idx, minlength=len(bks))
    return {int(b): c / cnt.sum() for b, c in zip(bks, cnt) if c}


ORACLE_UTIL = 0.85

#: coarsening at 1,000 replicas (2 cores, minutes): a shorter trace (2 min low, 5 min at the step,
#: the 10 min diurnal swing of the smaller fleets), 4 replicas ranked per request, the control loop
#: at 1 s (metrics arrive every 1 s anyway)
LARGE = {"candidates": 4, "trace_kw": {"low_s": 120.0, "step_s": 300.0, "diurnal_s": 600.0}}


def summarise(sim: Simulation, rate, dur, phases, t_step, objective, svc_s, n, policy, wall) -> dict:
    roll = sim.rolling_p99(0.0, dur)
    excl = lambda t: t_step <= t < t_step + 60.0
    evals = [(t, p) for t, p, c in roll if not excl(t) and t > 10.0]
    ok = sum(1 for t, p in evals if p is not None and p <= objective)
    ser = np.array(sim.series)
    ts = np.arange(0.0, dur, 1.0)
    orc = traces.oracle_replicas(rate(ts), svc_s, ORACLE_UTIL)
    warm = np.frombuffer(sim.r_warm, dtype=np.int8)
    arr = np.frombuffer(sim.r_arrival, dtype=np.float64)
    # direction changes among scaling actions inside steady phases, per hour of steady load
    steady = [ph for ph in phases if ph.steady]
    changes, hours = 0, 0.0
    for ph in steady:
        ev = [e for e in sim.events if ph.t0 <= e["t"] < ph.t1]
        dirs = [1 if e["to"] > e["from"] else -1 for e in ev]
        changes += sum(1 for a, b in zip(dirs, dirs[1:]) if a != b)
        hours += (ph.t1 - ph.t0) / 3600.0
    actions_steady = sum(1 for ph in steady for e in sim.events if ph.t0 <= e["t"] < ph.t1)
    ev_all = [1 if e["to"] > e["from"] else -1 for e in sim.events]
    return {
        "fleet_size": n, "policy": policy,
        "slo_attainment": round(ok / max(1, len(evals)), 4),
        "gpu_seconds": round(sim.gpu_seconds, 1),
        "oracle_gpu_seconds": round(float(orc.sum()), 1),
        "gpu_vs_oracle": round(sim.gpu_seconds / float(orc.sum()), 3),
        "hit_rate": round(float(warm.mean()), 4),
        "hit_rate_after_first_minute": round(float(warm[arr >= 60.0].mean()), 4),
        "direction_changes_per_hour": round(changes / hours, 2) if hours else None,
        "scaling_actions_at_steady_load": actions_steady,
        "direction_changes_total": sum(1 for a, b in zip(ev_all, ev_all[1:]) if a != b),
        "scaling_actions": len(sim.events),
        "objective_ms": objective, "requests": len(warm), "duration_s": dur,
        "peak_replicas": int(ser[:, 3].max()), "sim_wall_s": round(wall, 1),
        "series": {"t": ts[::5].tolist(),
                   "replicas": np.interp(ts[::5], ser[:, 0], ser[:, 1]).round(1).tolist(),
                   "oracle": orc[::5].tolist(),
                   "p99_ms": [None if p is None else round(p, 1) for _, p, _ in roll[::5]]},
    }


def plot(results: dict, out_dir: Path) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    for key, runs in results.items():
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
        for name, r in runs.items():
            s = r["series"]
            a1.plot(s["t"], s["replicas"], label=name)
            a2.plot(s["t"], [float("nan") if v is None else v for v in s["p99_ms"]], label=name)
        any_r = next(iter(runs.values()))
        a1.plot(any_r["series"]["t"], any_r["series"]["oracle"], "k:", label="oracle")
        a2.axhline(any_r["objective_ms"], color="k", ls=":", label="objective")
        a1.set_ylabel("running replicas"); a2.set_ylabel("rolling P99 TTFT (ms)"); a2.set_xlabel("s")
        a2.set_yscale("log"); a1.legend(fontsize=7); a2.legend(fontsize=7)
        a1.set_title(f"fleet simulation: {key}")
        fig.tight_layout()
        p = out_dir / f"sim-{key}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        files.append(str(p))
    return files


def sizes_from_log(path: Path) -> dict:
    """The 'n=N [batched-]LENGTHS CONFIG: {...}' lines this module prints, as the JSON's sizes entries."""
    sizes: dict = {}
    for line in path.read_text().splitlines():
        if not line.startswith("n=") or ": {" not in line:
            continue
        head, _, body = line.partition(": ")
        n, lengths, cfg = head[2:].split(" ")
        r = json.loads(body)
        e = sizes.setdefault(n, {})
        if lengths.startswith("batched-"):
            e = e.setdefault("batched", {})
            lengths = lengths[len("batched-"):]
        e = e.setdefault("by_lengths", {}).setdefault(lengths, {})
        if cfg == "p99":
            e.update(r)
        else:
            e["baseline" if cfg == "baseline" else "before_fix"] = r
    for e in list(sizes.values()) + [v["batched"] for v in sizes.values() if "batched" in v]:
        if e.get("by_lengths"):
            e.update(next(iter(e["by_lengths"].values())))
    return sizes


def stragglers() -> dict:
    """One replica 4x slower among 10 at half load: the policy before and after the fix."""
    from fleetsim import straggler
    return {"before_fix": straggler.run(fixed=False), "after_fix": straggler.run(fixed=True)}


def _model_json(m: ReplicaModel) -> dict:
    return {"buckets": list(m.buckets), "graph_ms": m.graph_ms, "jit_factor": m.jit_factor,
            "decode_ms": m.decode_ms, "capture_ms": m.capture_ms, "start_seeded_s": m.start_seeded_s,
            "start_cold_s": m.start_cold_s, "max_batch": m.max_batch, "mixed_weight_ms": m.mixed_weight_ms,
            "sources": m.sources}


def _strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "series"}


def merge(paths: List[str], from_log: Optional[str] = None, plots_dir: Optional[str] = None) -> dict:
    """The parts' sizes per engine, one validation; --from-log: a part whose process died before it
    wrote its JSON, from its summary lines (its plots are on disk: --plots lists them)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    if from_log:
        parts.append({"sizes": sizes_from_log(Path(from_log))})
    out = parts[0]
    for p in parts[1:]:
        for n, e in p["sizes"].items():
            out["sizes"].setdefault(n, {}).update(e)
        out["plots"] = out.get("plots", []) + p.get("plots", [])
        for k in ("validation", "batched_replica_check", "model", "model_batched"):
            out[k] = out.get(k) or p.get(k)
    out["sizes"] = dict(sorted(out["sizes"].items(), key=lambda kv: int(kv[0])))
    if plots_dir:
        out["plots"] = sorted(set(out.get("plots", [])) | {str(p) for p in Path(plots_dir).glob("sim-*.png")})
    if any("batched" in e for e in out["sizes"].values()) and not out.get("model_batched"):
        out["model_batched"] = _model_json(engine_model("batched"))
    out["p99_kwargs_at_scale"] = AT_SCALE
    for n in out["sizes"]:
        out["sizes"][n]["validation"] = out.get("validation")
    out["straggler"] = stragglers()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/sim-2026-12-02.json")
    ap.add_argument("--plots", default="docs/img")
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--engines", default="batch1,batched", help="batch1 and/or batched replicas")
    ap.add_argument("--batched-sizes", default="10,100", help="fleet sizes of the batched case")
    ap.add_argument("--lengths", default="uniform,long_tail")
    ap.add_argument("--lengths-large", default="uniform", help="prompt lengths at 1,000 replicas")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--validation-seeds", type=int, default=5)
    ap.add_argument("--before", action="store_true", help=f"also run the policy as on main ({MAIN_REV})")
    ap.add_argument("--before-large", action="store_true", help="the before run at 1,000 replicas too")
    ap.add_argument("--from-log", help="build sizes from this run log's summary lines (no series, no plots)")
    ap.add_argument("--merge", nargs="*", help="merge these JSONs' sizes (and validation) into --out")
    args = ap.parse_args(argv)
    if args.merge:
        Path(args.out).write_text(json.dumps(merge(args.merge, args.from_log, args.plots), indent=1))
        print("wrote", args.out)
        return 0
    engines = args.engines.split(",")
    models = {e: engine_model(e) for e in engines}
    out: dict = {"benchmark": "fleetsim", "issue": 29, "date": dt.date.today().isoformat(),
                 "host": {"python": sys.version.split()[0], "cpus": __import__("os").cpu_count(),
                          "platform": platform.platform()},
                 "oracle_util": ORACLE_UTIL, "p99_kwargs_at_scale": AT_SCALE,
                 "before_fix": {"rev": MAIN_REV, "kwargs": MAIN_KWARGS}, "sizes": {}}
    if "batch1" in models:
        out["model"] = _model_json(models["batch1"])
    if "batched" in models:
        out["model_batched"] = _model_json(models["batched"])
    plots: dict = {}
    first_len = args.lengths.split(",")[0]
    for n in [int(x) for x in args.sizes.split(",")]:
        kw = LARGE if n >= 1000 else {}
        size: dict = {}
        for eng in engines:
            if eng == "batched" and str(n) not in args.batched_sizes.split(","):
                continue
            entry: dict = {}
            for lengths in (args.lengths_large if n >= 1000 else args.lengths).split(","):
                m = models[eng]
                runs = {"p99": run_one(n, "p99", lengths, m, args.seed, **kw),
                        "baseline": run_one(n, "queue_length", lengths, m, args.seed, **kw)}
                if args.before and lengths == first_len and (n < 1000 or args.before_large):
                    runs["p99_before_fix"] = run_one(n, "p99", lengths, m, args.seed, variant="main", **kw)
                tag = lengths if eng == "batch1" else f"batched-{lengths}"
                for k, r in runs.items():
                    print(f"n={n} {tag} {k}: " + json.dumps(_strip(r)), flush=True)
                plots[f"{n}-{tag}"] = runs
                entry[lengths] = {**_strip(runs["p99"]), "baseline": _strip(runs["baseline"]),
                                  **({"before_fix": _strip(runs["p99_before_fix"])} if "p99_before_fix" in runs else {})}
            # the fields at the top level: the uniform 10-500 trace
            top = {**entry[first_len], "by_lengths": entry}
            if eng == "batch1":
                size.update(top)
            else:
                size["batched"] = top
        out["sizes"][str(n)] = size
    if args.plots:
        Path(args.plots).mkdir(parents=True, exist_ok=True)
        out["plots"] = plot(plots, Path(args.plots))
    if args.validation_seeds:
        from fleetsim.validate import batched_replica, validate
        out["validation"] = validate(seeds=args.validation_seeds)
        out["batched_replica_check"] = batched_replica()
    for n in out["sizes"]:
        out["sizes"][n]["validation"] = out.get("validation")
    out["straggler"] = stragglers()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
