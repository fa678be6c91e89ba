#!/usr/bin/env bash
# Does TTFT at 10 tokens move between processes because of the GPU or the host? (bench/NOTES.md step 34:
# 5.48-6.28 ms from one engine process to the next on one H100 host kind, same tree.) Runs K fresh
# processes of bench/ttft_breakdown.py at 10 tokens, one after another on the same GPU, each preceded by
# an nvidia-smi snapshot (clocks, temperature, power), then prints and writes one summary:
# per process, the engine's TTFT (request), the bare host sequence (raw) and the bucket-16 graph's GPU
# time alone (graph_gpu), and the GEMV autotune picks. If graph_gpu moves with request, the swing is on
# the GPU side (kernel picks, memory placement, clocks); if graph_gpu stays put, it is the host's.
#   bash bench/ttft_swing.sh [K=5]            # CUDA machine, LLaMA-2-7B preset (~30 s a process)
# Writes ${OUT:-bench/results}/ttft-swing-<date>.json: one file, each process's ttft-breakdown JSON inside.
set -uo pipefail
K=${1:-5}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DAY=$(date +%F)
WORK=$(mktemp -d)
for i in $(seq 1 "$K"); do
  nvidia-smi --query-gpu=pci.bus_id,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader \
    > "$WORK/p$i.smi" 2>/dev/null || true
  python3 bench/ttft_breakdown.py --lengths 10 --requests 40 --out "$WORK/p$i.json" 2>&1 \
    | grep -v -i warn | grep "^len"
done
python3 - "$OUT" "$DAY" "$K" "$WORK" <<'EOF'
import json, sys, statistics
from pathlib import Path
out, day, k, work = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
rows = []
for i in range(1, k + 1):
    f = work / f"p{i}.json"
    if not f.exists():
        continue
    d = json.loads(f.read_text())
    r = d["lengths"]["10"]
    smi = work / f"p{i}.smi"
    rows.append({"process": i, "request_p50_ms": r["request"]["p50"], "raw_p50_ms": r["raw"]["p50"],
                 "graph_gpu_p50_ms": r["graph_gpu"]["p50"],
                 "host_ms": round(r["request"]["p50"] - r["graph_gpu"]["p50"], 3),
                 "picks": sorted(d.get("gemv_autotune_picks", {}).values()),
                 "smi": smi.read_text().strip() if smi.exists() else None, "device": d["device"],
                 "breakdown": d})
    print(f"process {i}: request {r['request']['p50']:.3f}  raw {r['raw']['p50']:.3f}  "
          f"graph_gpu {r['graph_gpu']['p50']:.3f}  host {rows[-1]['host_ms']:.3f} ms  [{rows[-1]['smi']}]")
def spread(key):
    xs = [r[key] for r in rows]
    return {"min": min(xs), "max": max(xs), "median": statistics.median(xs)} if xs else None
picks = {json.dumps(r["picks"]) for r in rows}
summary = {"benchmark": "ttft-swing", "date": day, "processes": rows,
           "spread": {k: spread(k) for k in ("request_p50_ms", "raw_p50_ms", "graph_gpu_p50_ms", "host_ms")},
           "distinct_autotune_pick_sets": len(picks)}
print(json.dumps(summary["spread"]), "distinct pick sets:", len(picks))
(out / f"ttft-swing-{day}.json").write_text(json.dumps(summary, indent=1) + "\n")
EOF
