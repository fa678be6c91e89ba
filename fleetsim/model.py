"""The replica model, fitted from the project's measured GPU results in ``bench/results``.

Every parameter keeps the file it came from (``ReplicaModel.sources``); docs/simulation.md tabulates
them. Times are in seconds unless a name ends in ``_ms``.
"""
from __future__ import annotations

import glob
import json
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Optional, Sequence

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"

#: the H100 latency run whose TTFT-by-length curve gives the shape of prefill time vs bucket
CURVE_FILE = "latency-2026-11-27-h100.json"
#: the H200 fleet run whose engine-only figures and capture times set the at-scale replica
HOST_FILE = "fleet-2026-11-27-h200-hybrid300q-guard.json"
WARMSTART_FILE = "warmstart-2026-11-26-h100.json"
#: fleet runs whose decision -> new replica running time gives Ray's seeded replica start
FLEET_GLOB = "fleet-2026-11-2*-h*.json"
BATCHED_GLOB = "batched-*-h200.json"


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


@dataclass(frozen=True)
class ReplicaModel:
    """One model replica: prefill by path, decode step by batch size, capture, start time."""

    buckets: tuple                       # prefill buckets (ascending)
    graph_ms: Dict[int, float]           # prefill (first token) by CUDA graph, per bucket
    jit_factor: float                    # JIT prefill / graph prefill of the same bucket
    decode_ms: Dict[int, float]          # decode step time by batch size (batch 1 until batched results)
    capture_ms: Dict[int, float]         # background capture of one bucket's graph
    start_seeded_s: float                # scale-up decision -> replica serving, store-seeded
    start_cold_s: float                  # the same without the store (JIT + compile)
    max_batch: int = 1                   # KV slots; 1 = the batch-1 engine
    mixed_weight_ms: float = 0.0         # mixed steps: the weight read a prompt riding in a decode step shares
                                         # with it (0: every prompt prefills alone)
    sources: Dict[str, str] = field(default_factory=dict, compare=False)

    # ------------------------------------------------------------------ timing
    def prefill_ms(self, bucket: int, warm: frozenset | set) -> tuple[float, str]:
        """(first-token time, path) for a prompt of ``bucket`` on a replica warm for ``warm``:
        its own graph, else the smallest larger warm graph ("padded"), else JIT."""
        if bucket in warm:
            return self.graph_ms[bucket], "graph"
        larger = [b for b in self.buckets if b > bucket and b in warm]
        if larger:
            return self.graph_ms[larger[0]], "padded"
        return self.graph_ms[bucket] * self.jit_factor, "jit"

    def step_ms(self, batch: int) -> float:
        """Decode step at ``batch`` running streams: the table's entry for the smallest measured
        batch >= it (the engine replays the graph of the smallest warm batch size >= running)."""
        keys = sorted(self.decode_ms)
        for k in keys:
            if k >= batch:
                return self.decode_ms[k]
        return self.decode_ms[keys[-1]] * batch / keys[-1]

    def mixed_ms(self, prefill_ms: float, batch: int) -> float:
        """A decode step of ``batch`` streams carrying a prompt whose prefill alone takes prefill_ms: one pass, so
        the weights are read once (never shorter than either alone)."""
        step = self.step_ms(batch)
        return max(prefill_ms, step, prefill_ms + step - self.mixed_weight_ms)

    def service_ms(self, bucket: int, max_tokens: int, warm=None, batch: int = 1) -> float:
        pre, _ = self.prefill_ms(bucket, self.buckets if warm is None else warm)
        return pre + max(0, max_tokens - 1) * self.step_ms(batch)

    def mean_service_ms(self, bucket_probs: Dict[int, float], max_tokens: int) -> float:
        return sum(p * self.service_ms(b, max_tokens) for b, p in bucket_probs.items())

    def capacity_rps(self, bucket_probs: Dict[int, float], max_tokens: int) -> float:
        """Requests a saturated replica finishes per second: each costs its prefill (which stalls the
        batch) and (max_tokens - 1) / max_batch decode steps at the full batch (batch 1: its service)."""
        pre = sum(p * self.prefill_ms(b, self.buckets)[0] for b, p in bucket_probs.items())
        b = self.max_batch
        return 1000.0 / (pre + max(0, max_tokens - 1) / b * self.step_ms(b))

    def scaled(self, ttft_factor: float = 1.0, decode_ms: Optional[float] = None) -> "ReplicaModel":
        """The same shape on another host: prefill times x ttft_factor, batch-1 decode step set."""
        dm = dict(self.decode_ms)
        if decode_ms is not None:
            f = decode_ms / dm[1]
            dm = {k: v * f for k, v in dm.items()}
        return replace(self, graph_ms={b: v * ttft_factor for b, v in self.graph_ms.items()},
                       decode_ms=dm)

    # -------------------------------------------------------------- fitting
    @classmethod
    def fitted(cls, buckets: Optional[Sequence[int]] = None, results: Path = RESULTS,
               batched: bool = True) -> "ReplicaModel":
        """Fit from bench/results (see docs/simulation.md): the H100 TTFT curve's shape scaled to the
        H200 fleet host's engine-only TTFT, that host's TPOT and capture times, the warm-start run's
        cold/seeded gap and the fleet runs' Ray start times. A batched-*-h200.json with
        ``decode_by_batch`` replaces the batch-1 decode table when present."""
        global RESULTS
        RESULTS = Path(results)
        src: Dict[str, str] = {}
        host = _load(HOST_FILE)
        bks = tuple(sorted(int(b) for b in (buckets or host["seed"]["warm_buckets"])))
        # prefill graph time: linear in the bucket size through the H100 run's 5 lengths
        curve = _load(CURVE_FILE)["engines"][0]
        edges = sorted(_load(CURVE_FILE)["args"]["buckets"])
        pts = []
        for n, v in curve["ttft_ms"].items():
            b = next(e for e in edges if e >= int(n))
            pts.append((b, v["p50"]))
        a, slope = _linfit(pts)
        graph = {b: a + slope * b for b in bks}
        src["graph_ms shape"] = f"{CURVE_FILE} engines[hybrid].ttft_ms (p50 by length; linear fit a={a:.3f} ms, {slope*1e3:.3f} us/token)"
        # scale to the fleet host: its engine-only TTFT mean over its prompt mix
        mix = parse_mix(host["config"]["prompt_mix"])
        probs = bucket_probs(mix, bks)
        model_mean = sum(p * graph[b] for b, p in probs.items())
        f = host["seed"]["engine_only"]["ttft_ms"]["mean"] / model_mean
        graph = {b: v * f for b, v in graph.items()}
        src["graph_ms scale"] = f"{HOST_FILE} seed.engine_only.ttft_ms.mean (x{f:.3f} over the H100 curve)"
        jit = curve["jit_steady_ttft"]["p50"] / curve["unseen_bucket_steady_ttft"]["p50"]
        src["jit_factor"] = f"{CURVE_FILE} jit_steady_ttft.p50 / unseen_bucket_steady_ttft.p50"
        src["padded"] = f"{CURVE_FILE} first_unseen_path=padded, first_unseen_ratio: the larger warm graph's time"
        dec = {1: host["seed"]["engine_only"]["tpot_ms"]["mean"]}
        src["decode_ms[1]"] = f"{HOST_FILE} seed.engine_only.tpot_ms.mean"
        max_batch, mixed_w = 1, 0.0
        if batched:
            files = sorted(glob.glob(str(Path(results) / BATCHED_GLOB)))
            if files:
                bd = json.loads(Path(files[-1]).read_text())["decode_by_batch"]
                dec = {int(k): float(v["step_ms_p50"]) for k, v in bd.items()}
                max_batch = max(dec)
                src.pop("decode_ms[1]")               # the table's own batch-1 step replaces it
                src["decode_ms"] = f"{Path(files[-1]).name} decode_by_batch.*.step_ms_p50"
                mixed_w = float(bd["1"].get("floor_ms", 0.0))   # the weights' read at the copy bandwidth
                src["mixed_weight_ms"] = f"{Path(files[-1]).name} decode_by_batch.1.floor_ms"
        cap = {int(k): float(v) for k, v in host["seed"]["capture_ms"].items()}
        capture = {b: cap.get(b, max(cap.values())) for b in bks}
        src["capture_ms"] = f"{HOST_FILE} seed.capture_ms"
        # Ray's start of a seeded replica: decision -> new replica RUNNING, median over the fleet runs
        starts = []
        for p in sorted(glob.glob(str(Path(results) / FLEET_GLOB))):
            d = json.loads(Path(p).read_text())
            for c in ("hybrid", "baseline"):
                s = (d.get(c) or {}).get("step") if isinstance(d.get(c), dict) else None
                if s and s.get("decision_rel_s") is not None and s.get("new_replica_running_rel_s") is not None:
                    starts.append(s["new_replica_running_rel_s"] - s["decision_rel_s"])
        seeded = statistics.median(starts)
        src["start_seeded_s"] = f"{FLEET_GLOB} step.new_replica_running_rel_s - decision_rel_s, median of {len(starts)}"
        ws = _load(WARMSTART_FILE)["summary"]
        cold = seeded + ws["cold_ready_s"] - ws["seeded_ready_s"]
        src["start_cold_s"] = f"start_seeded_s + {WARMSTART_FILE} summary.cold_ready_s - seeded_ready_s"
        return cls(bks, graph, jit, dec, capture, seeded, cold, max_batch, mixed_w, src)

    @classmethod
    def for_run(cls, run: dict, base: "ReplicaModel") -> "ReplicaModel":
        """The model on one fleet run's host: prefill scaled to its engine-only TTFT mean, its TPOT."""
        mix = parse_mix(run["config"]["prompt_mix"])
        probs = bucket_probs(mix, base.buckets)
        mean = sum(p * base.graph_ms[b] for b, p in probs.items())
        eo = run["seed"]["engine_only"]
        return base.scaled(eo["ttft_ms"]["mean"] / mean, eo["tpot_ms"]["mean"])


#: Ray Serve's control-plane timing, as the fleet runs configured it (bench/fleet.py app_args)
@dataclass(frozen=True)
class PlatformModel:
    metrics_interval_s: float = 1.0       # replicas push autoscaling metrics this often
    look_back_period_s: float = 5.0       # Ray averages ongoing requests over this
    control_loop_s: float = 0.1           # the Serve controller's autoscaling tick
    routing_stats_period_s: float = 0.5   # router.stats_period_s: warm/capturing buckets reach the router
    latency_window_s: float = 30.0        # deployments/config.py latency_window_s (LatencyWindow)
    hint_ttl_s: float = 10.0              # WarmBucketRouter hint_ttl_s
    max_ongoing_requests: int = 8


def parse_mix(spec: str) -> list:
    """'10-50:50,51-150:30' -> [(10, 50, 50.0), (51, 150, 30.0)] (locustfiles/short_prompts.py's format)."""
    out = []
    for part in spec.split(","):
        rng, _, w = part.strip().partition(":")
        lo, _, hi = rng.partition("-")
        out.append((int(lo), int(hi or lo), float(w or 1.0)))
    return out


def bucket_probs(mix: list, buckets: Sequence[int]) -> Dict[int, float]:
    """Probability of each bucket under a length mix (uniform within each part)."""
    bks = sorted(buckets)
    tot = sum(w for *_, w in mix)
    probs: Dict[int, float] = {}
    for lo, hi, w in mix:
        for n in range(lo, hi + 1):
            b = next((e for e in bks if e >= n), bks[-1])
            probs[b] = probs.get(b, 0.0) + w / tot / (hi - lo + 1)
    return probs


def _linfit(pts):
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    sxy = sum((x - mx) * (y - my) for x, y in pts)
    b = sxy / sxx
    return my - b * mx, b
