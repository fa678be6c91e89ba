"""Replay the 2-GPU fleet runs (bench/results/fleet-*.json, docs/fleet.md) in the simulator.

Each run is replayed as it was driven: Locust users at ``constant_throughput`` (one user through
warm-up and steady, 5 after the step, the 4 new ones spawned together: the measured rolling P99
is ~4 service times in the first second after the step), its prompt mix,
its policy's kwargs (or Ray's queue-length policy and default router for the baseline), the replica
model scaled to its host's engine-only TTFT and TPOT, its HTTP overhead. Compared: the scale-up time
(decision -> the new replica's first graph request), recovery of the rolling P99 and the step P99.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import statistics
from pathlib import Path
from typing import Dict, List

from fleetsim import adapters
from fleetsim.model import RESULTS, PlatformModel, ReplicaModel, parse_mix
from fleetsim.sim import SimConfig, Simulation

_spec = importlib.util.spec_from_file_location("bench_fleet", Path(__file__).resolve().parents[1] / "bench" / "fleet.py")
bench_fleet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_fleet)        # its recovery() defines the measured figure


def fleet_runs(results: Path = RESULTS) -> List[tuple]:
    """(file, config name, run dict) of every 2-GPU fleet run with step figures."""
    out = []
    for p in sorted(glob.glob(str(Path(results) / "fleet-2026-*.json"))):
        d = json.loads(Path(p).read_text())
        if len(d.get("device_info", {}).get("gpus") or []) != 2:
            continue
        for c in ("hybrid", "baseline"):
            s = (d.get(c) or {}).get("step") if isinstance(d.get(c), dict) else None
            if s and s.get("recovery_s") is not None and s.get("decision_to_first_graph_request_s"):
                out.append((Path(p).name, c, d))
    return out


def _mix_draw(spec: str):
    mix = parse_mix(spec)
    weights = [w for *_, w in mix]

    def draw(rng):
        lo, hi, _ = rng.choices(mix, weights=weights)[0]
        return rng.randint(lo, hi)
    return draw


def replay(run: dict, config: str, base: ReplicaModel, seed: int = 0) -> Dict[str, float]:
    cfgj, app = run["config"], run[config]["app_args"]
    model = ReplicaModel.for_run(run, base)
    auto = app["autoscaling"]
    if config == "hybrid":
        policy = adapters.P99Policy(**auto["policy"]["policy_kwargs"])
        router = "warm_bucket"
    else:
        policy = adapters.QueueLengthPolicy(auto["target_ongoing_requests"], auto["upscale_delay_s"],
                                            auto["downscale_delay_s"], auto["min_replicas"], auto["max_replicas"])
        router = "po2"
    eo = run["seed"]["engine_only"]["tpot_ms"]
    oh = run[config]["steady"]["overhead_ms"]
    sim = Simulation(SimConfig(
        model=model, platform=PlatformModel(metrics_interval_s=auto["metrics_interval_s"],
                                            look_back_period_s=auto["look_back_period_s"],
                                            routing_stats_period_s=app["router"]["stats_period_s"],
                                            max_ongoing_requests=app["max_ongoing_requests"]),
        policy=policy, min_replicas=auto["min_replicas"], max_replicas=auto["max_replicas"],
        initial_replicas=auto["initial_replicas"], max_tokens=cfgj["max_tokens"], router=router,
        http_overhead_ms=oh["p50"], overhead_jitter_ms=max(0.0, (oh["p90"] - oh["p50"]) / 1.2816),
        decode_jitter=max(0.0, (eo["p99"] - eo["p50"]) / 2.326 / eo["p50"]), seed=seed))
    rps = run["load"]["user_rps"]
    t_step = cfgj["warmup_s"] + cfgj["steady_s"]
    t_end = t_step + cfgj["steady_after_s"]
    draw = _mix_draw(cfgj["prompt_mix"])
    users = [(rps, (0.0, t_end), draw, sim.rng.random() / rps)]
    users += [(rps, (t_step, t_end), draw, t_step) for _ in range(cfgj["step_factor"] - 1)]
    sim.run(t_end, users=users)
    ups = [e for e in sim.events if e["t"] >= t_step and e["to"] > e["from"]]
    out: Dict[str, float] = {"decision_rel_s": round(ups[0]["t"] - t_step, 2) if ups else None}
    new = [r for r in list(sim.replicas.values()) + sim.stopped if r.id != "r1" and r.first_graph_t]
    if ups and new:
        out["decision_to_first_graph_request_s"] = round(min(r.first_graph_t for r in new) - ups[0]["t"], 2)
    roll = [(round(t - t_step, 1), p, n, 0) for t, p, n in sim.rolling_p99(t_step, t_end, cfgj["window_s"])]
    out["breached"], out["recovery_s"] = bench_fleet.recovery(roll, run["load"]["objective_ms"], int(cfgj["hold_s"]))
    ttft = [v for a, v in zip(sim.r_arrival, sim.r_ttft) if a >= t_step]
    out["step_p99_ttft_ms"] = round(bench_fleet.pct(ttft, 99), 1)
    dirs = [1 if e["to"] > e["from"] else -1 for e in sim.events if e["t"] >= t_step]
    out["direction_changes"] = sum(1 for a, b in zip(dirs, dirs[1:]) if a != b)
    return out


KEYS = (("scale_up_s", "decision_to_first_graph_request_s"), ("recovery_s", "recovery_s"),
        ("p99_ttft_ms", "step_p99_ttft_ms"))


def validate(seeds: int = 5, base: ReplicaModel = None, tolerance: float = 0.2) -> List[dict]:
    """Per fleet run: measured vs simulated (median over seeds) and whether within tolerance."""
    base = base or ReplicaModel.fitted(batched=False)
    rows = []
    for name, config, run in fleet_runs():
        s = run[config]["step"]
        measured = {"scale_up_s": s["decision_to_first_graph_request_s"], "recovery_s": s["recovery_s"],
                    "p99_ttft_ms": s["client_ttft_ms"]["p99"], "decision_rel_s": s["decision_rel_s"],
                    "direction_changes": s["direction_changes"]}
        reps = [replay(run, config, base, seed=k) for k in range(seeds)]
        sim = {}
        for key, sk in KEYS + (("decision_rel_s", "decision_rel_s"), ("direction_changes", "direction_changes")):
            vals = [r[sk] for r in reps if r.get(sk) is not None]
            sim[key] = round(statistics.median(vals), 2) if vals else None
        within = {k: (sim[k] is not None and abs(sim[k] - measured[k]) <= tolerance * measured[k])
                  for k, _ in KEYS}
        rows.append({"run": name, "config": config, "measured": measured, "simulated": sim,
                     "seeds": seeds, "within_20pct": within})
    return rows


if __name__ == "__main__":
    for r in validate():
        print(json.dumps(r))


def batched_replica(results: Path = RESULTS, seeds: int = 3) -> dict:
    """The batched replica model against the batched engine's own load sweep (bench/batched.py
    ``part_load``: one engine, Poisson arrivals at each ``load[].rate_rps`` for ``load_s``, prompts
    uniform 10-500 tokens, ``out_tokens`` each, no HTTP): TTFT p50/p99, TPOT p50 and mean running
    streams, measured vs simulated (median over seeds)."""
    import numpy as np
    files = sorted(glob.glob(str(Path(results) / "batched-*-h200.json")))
    if not files:
        return {}
    d = json.loads(Path(files[-1]).read_text())
    a = d["args"]
    model = ReplicaModel.fitted(results=results)
    rows = []
    for row in d["load"]:
        sims = []
        for k in range(seeds):
            rng = np.random.default_rng(100 + k)
            n = rng.poisson(row["rate_rps"] * a["load_s"])
            t = np.sort(rng.uniform(0.0, a["load_s"], n))
            lengths = rng.integers(10, 501, n)
            done: List[tuple] = []
            sim = Simulation(SimConfig(model=model, policy=lambda *x: 1, max_tokens=a["out_tokens"],
                                       http_overhead_ms=0.0, seed=k))
            sim._finished = lambda rep, req, tf, done=done: done.append((req[4], tf - req[1], tf - req[3]))
            sim.run(a["load_s"], arrivals=(t, lengths))
            ttft = [x[0] * 1000 for x in done]
            tpot = [(x[1] - x[0]) * 1000 / (a["out_tokens"] - 1) for x in done]
            span = max(tf for tf in [x[1] for x in done]) if done else 1.0
            sims.append({"ttft_p50": bench_fleet.pct(ttft, 50), "ttft_p99": bench_fleet.pct(ttft, 99),
                         "tpot_p50": bench_fleet.pct(tpot, 50),
                         "mean_running": sum(x[2] for x in done) / max(a["load_s"], span)})
        sim_med = {k: round(statistics.median(s[k] for s in sims), 2) for k in sims[0]}
        measured = {"ttft_p50": row["ttft_ms"]["p50"], "ttft_p99": row["ttft_ms"]["p99"],
                    "tpot_p50": row["tpot_ms"]["p50"], "mean_running": row["mean_running"]}
        rows.append({"utilization": row["utilization"], "rate_rps": row["rate_rps"], "measured": measured,
                     "simulated": sim_med, "seeds": seeds})
    return {"file": Path(files[-1]).name, "out_tokens": a["out_tokens"], "load_s": a["load_s"], "rows": rows}
