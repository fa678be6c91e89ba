"""One slow replica in a fleet at steady load: does the fleet P99 (the max of the replica P99s) keep
the fleet scaling up? ``python -m fleetsim.straggler`` prints the policy before and after the fix."""
from __future__ import annotations

import json

import numpy as np

from fleetsim import adapters, traces
from fleetsim.model import ReplicaModel
from fleetsim.run import BUCKETS, MAX_TOKENS, STORE_BUCKETS, _length_probs, p99_kwargs
from fleetsim.sim import SimConfig, Simulation


def run(n: int = 10, factor: float = 4.0, util: float = 0.5, dur: float = 600.0, fixed: bool = True,
        seed: int = 0) -> dict:
    """``n`` replicas at ``util`` of their capacity, replica r1 ``factor`` x slower; max 2n."""
    m = ReplicaModel.fitted(buckets=BUCKETS, batched=False)   # the batch-1 engine (slow: its service times)
    probs = _length_probs("uniform", m)
    svc_ms = sum(p * m.service_ms(b, MAX_TOKENS) for b, p in probs.items())
    objective = round(4.0 * svc_ms, 1)
    rng = np.random.default_rng(seed)
    lam = n * util * 1000.0 / svc_ms
    t = traces.arrivals(lambda x: np.full(np.shape(x), lam), dur, lam * 1.0001, rng)
    ln = traces.lengths_uniform(len(t), rng)
    pol = adapters.P99Policy(**p99_kwargs(objective, n, fixed))
    sim = Simulation(SimConfig(model=m, policy=pol, min_replicas=1, max_replicas=2 * n, initial_replicas=n,
                               max_tokens=MAX_TOKENS, store_buckets=STORE_BUCKETS, seed=seed,
                               slow={"r1": factor}))
    sim.run(dur, arrivals=(t, ln))
    ser = np.array(sim.series)
    return {"fleet_size": n, "slow_factor": factor, "util": util, "fixed": fixed,
            "final_replicas": int(ser[-1, 1]), "peak_replicas": int(ser[:, 3].max()),
            "scaling_actions": [(round(e["t"]), e["from"], e["to"]) for e in sim.events],
            "gpu_seconds": round(sim.gpu_seconds, 1), "last_reason": getattr(pol.last, "reason", None)}


if __name__ == "__main__":
    for fixed in (False, True):
        print(json.dumps(run(fixed=fixed)))
