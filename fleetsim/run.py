"""Simulate the fleet at 10, 100 and 1,000 replicas under the project's P99 policy + warm-bucket router
and under Ray's queue-length autoscaling + default router; validate against the 2-GPU runs.

    python -m fleetsim.run --out bench/results/sim-2026-12-01.json --plots docs/img
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from fleetsim import adapters, traces
from fleetsim.model import PlatformModel, ReplicaModel
from fleetsim.sim import SimConfig, Simulation

BUCKETS = (16, 32, 64, 128, 256, 384, 512, 1024, 2048)    # EngineConfig's default buckets
STORE_BUCKETS = (16, 32, 64, 128, 256, 384, 512)          # the store seeds these; longer ones warm at run time
MAX_TOKENS = 32


def p99_kwargs(objective_ms: float, n: int, fixed: bool) -> dict:
    """The policy's kwargs as the 2-GPU fleet runs set them (bench/fleet.py), objective 4 x service."""
    kw = dict(p99_ttft_ms=objective_ms, upscale_delay_s=5.0, downscale_delay_s=60.0, min_samples=10,
              queue_signal=True, max_utilization=0.6, max_step_up_fraction=1.0, max_step_down_fraction=0.1,
              demand_utilization=0.75)
    if not fixed:
        kw.update(BEFORE_FIX)
    return kw


#: the policy as it was before the at-scale fix (docs/simulation.md): fixed step caps only
BEFORE_FIX: Dict[str, object] = {"max_step_up_fraction": None, "max_step_down_fraction": None,
                                  "demand_utilization": None}


def run_one(n: int, policy_name: str, lengths: str, model: ReplicaModel, seed: int = 0,
            fixed: bool = True, candidates: int = 16, tick_s: Optional[float] = None,
            trace_kw: Optional[dict] = None) -> dict:
    rng = np.random.default_rng(seed)
    probs_mix = _length_probs(lengths, model)
    svc_ms = sum(p * model.service_ms(b, MAX_TOKENS) for b, p in probs_mix.items())
    cap = 1000.0 / svc_ms
    objective = round(4.0 * svc_ms, 1)
    rate, dur, phases, t_step = traces.diurnal_step_rate(n, cap, **(trace_kw or {}))
    t = traces.arrivals(rate, dur, float(np.max(rate(np.linspace(0, dur, 20001)))) * 1.0001, rng)
    ln = (traces.lengths_uniform if lengths == "uniform" else traces.lengths_long_tail)(len(t), rng)
    lo_rep = max(1, math.ceil(n / 5))
    if policy_name == "p99":
        pol = adapters.P99Policy(**p99_kwargs(objective, n, fixed))
        router = "warm_bucket"
    else:
        pol = adapters.QueueLengthPolicy(1.0, 5.0, 60.0, 1, 2 * n)
        router = "po2"
    sim = Simulation(SimConfig(model=model, platform=PlatformModel(), policy=pol, min_replicas=1,
                               max_replicas=2 * n, initial_replicas=lo_rep, max_tokens=MAX_TOKENS,
                               store_buckets=STORE_BUCKETS, router=router, candidates=candidates,
                               tick_s=tick_s or (0.1 if n <= 100 else 1.0), seed=seed,
                               http_overhead_ms=3.0))
    w0 = time.time()
    sim.run(dur, arrivals=(t, ln))
    wall = time.time() - w0
    return summarise(sim, rate, dur, phases, t_step, objective, svc_ms / 1000.0, n, policy_name, wall)


def _length_probs(lengths: str, model: ReplicaModel) -> Dict[int, float]:
    rng = np.random.default_rng(12345)
    ln = (traces.lengths_uniform if lengths == "uniform" else traces.lengths_long_tail)(200000, rng)
    bks = np.array(model.buckets)
    idx = np.minimum(np.searchsorted(bks, ln), len(bks) - 1)
    cnt = np.bincount(idx, minlength=len(bks))
    return {int(b): c / cnt.sum() for b, c in zip(bks, cnt) if c}


ORACLE_UTIL = 0.85

#: coarsening at 1,000 replicas (2 cores, minutes): a shorter trace (2 min low, 6 min at the step,
#: 2 min of the diurnal swing), 4 replicas ranked per request, the control loop at 1 s (metrics
#: arrive every 1 s anyway)
LARGE = {"candidates": 4, "trace_kw": {"low_s": 120.0, "step_s": 300.0, "diurnal_s": 120.0}}


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
    """The 'n=N LENGTHS CONFIG: {...}' lines this module prints, as the JSON's sizes entries."""
    sizes: dict = {}
    for line in path.read_text().splitlines():
        if not line.startswith("n=") or ": {" not in line:
            continue
        head, _, body = line.partition(": ")
        n, lengths, cfg = head[2:].split(" ")
        r = json.loads(body)
        e = sizes.setdefault(n, {}).setdefault("by_lengths", {}).setdefault(lengths, {})
        if cfg == "p99":
            e.update(r)
        else:
            e["baseline" if cfg == "baseline" else "before_fix"] = r
    for n, e in sizes.items():
        first = next(iter(e["by_lengths"].values()))
        e.update(first)
    return sizes


def stragglers() -> dict:
    """One replica 4x slower among 10 at half load: the policy before and after the fix."""
    from fleetsim import straggler
    return {"before_fix": straggler.run(fixed=False), "after_fix": straggler.run(fixed=True)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/sim-2026-12-01.json")
    ap.add_argument("--plots", default="docs/img")
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--lengths", default="uniform,long_tail")
    ap.add_argument("--lengths-large", default="uniform", help="prompt lengths at 1,000 replicas")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--validation-seeds", type=int, default=5)
    ap.add_argument("--before", action="store_true", help="also run the P99 policy without the at-scale fix")
    ap.add_argument("--before-large", action="store_true",
                    help="the before-fix run at 1,000 replicas too (its backlog makes it very slow)")
    ap.add_argument("--from-log", help="build sizes from this run log's summary lines (no series, no plots)")
    ap.add_argument("--merge", nargs="*", help="merge these JSONs' sizes (and validation) into --out")
    args = ap.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        if args.from_log:
            parts.append({"sizes": sizes_from_log(Path(args.from_log))})
        out = parts[0]
        for p in parts[1:]:
            out["sizes"].update(p["sizes"])
            out["plots"] = out.get("plots", []) + p.get("plots", [])
            out["validation"] = out.get("validation") or p.get("validation")
        out["sizes"] = dict(sorted(out["sizes"].items(), key=lambda kv: int(kv[0])))
        for n in out["sizes"]:
            out["sizes"][n]["validation"] = out.get("validation")
        out["straggler"] = stragglers()
        Path(args.out).write_text(json.dumps(out, indent=1))
        print("wrote", args.out)
        return 0
    model = ReplicaModel.fitted(buckets=BUCKETS)
    out: dict = {"benchmark": "fleetsim", "issue": 29, "date": dt.date.today().isoformat(),
                 "host": {"python": sys.version.split()[0], "cpus": __import__("os").cpu_count(),
                          "platform": platform.platform()},
                 "model": {"buckets": list(model.buckets), "graph_ms": model.graph_ms,
                           "jit_factor": model.jit_factor, "decode_ms": model.decode_ms,
                           "capture_ms": model.capture_ms, "start_seeded_s": model.start_seeded_s,
                           "start_cold_s": model.start_cold_s, "max_batch": model.max_batch,
                           "sources": model.sources},
                 "oracle_util": ORACLE_UTIL, "before_fix_kwargs": BEFORE_FIX, "sizes": {}}
    plots: dict = {}
    for n in [int(x) for x in args.sizes.split(",")]:
        entry: dict = {}
        kw = LARGE if n >= 1000 else {}
        for lengths in (args.lengths_large if n >= 1000 else args.lengths).split(","):
            runs = {"p99": run_one(n, "p99", lengths, model, args.seed, **kw),
                    "baseline": run_one(n, "queue_length", lengths, model, args.seed, **kw)}
            if args.before and lengths == args.lengths.split(",")[0] and (n < 1000 or args.before_large):
                runs["p99_before_fix"] = run_one(n, "p99", lengths, model, args.seed, fixed=False, **kw)
            for k, r in runs.items():
                print(f"n={n} {lengths} {k}: " + json.dumps({x: v for x, v in r.items() if x != "series"}),
                      flush=True)
            plots[f"{n}-{lengths}"] = runs
            entry[lengths] = {**{k: v for k, v in runs["p99"].items() if k != "series"},
                              "baseline": {k: v for k, v in runs["baseline"].items() if k != "series"},
                              **({"before_fix": {k: v for k, v in runs["p99_before_fix"].items() if k != "series"}}
                                 if "p99_before_fix" in runs else {})}
        # the fields at the top level of each size: the uniform 10-500 trace
        first = entry[args.lengths.split(",")[0]]
        out["sizes"][str(n)] = {**first, "by_lengths": entry}
    if args.plots:
        Path(args.plots).mkdir(parents=True, exist_ok=True)
        out["plots"] = plot(plots, Path(args.plots))
    if args.validation_seeds:
        from fleetsim.validate import validate
        out["validation"] = validate(seeds=args.validation_seeds)
    for n in out["sizes"]:
        out["sizes"][n]["validation"] = out.get("validation")
    out["straggler"] = stragglers()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
