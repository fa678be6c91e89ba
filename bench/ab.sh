#!/usr/bin/env bash
# Same-machine A/B of two trees of the engine, in alternating engine-only runs of bench/latency.py (lent H100s
# differ by up to ~0.45 ms on the same graph, so only runs on one machine compare). Any CUDA machine:
#   git archive <rev> engine bench | tar -x -C .ab/old      # here; carry .ab/old to the device
#   bash bench/ab.sh .ab/old 2 --lengths 10 50 500          # rounds, then latency.py arguments
# Writes ab-{new,old}-<round>.json/.log to ${OUT:-bench/results/ab-<date>}/ and prints each run's TTFT / TPOT.
# Both sides run this tree's bench/latency.py (copied into the old tree), so only engine/ differs.
set -uo pipefail
OLD=${1:?"usage: bash bench/ab.sh OLD_TREE [ROUNDS] [latency.py args]"}
ROUNDS=${2:-2}
shift $(( $# >= 2 ? 2 : 1 ))
ARGS=("$@")
[ ${#ARGS[@]} -eq 0 ] && ARGS=(--lengths 10 50 100 500)
OUT=${OUT:-bench/results/ab-$(date +%F)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
NEW=$(pwd)
cp bench/latency.py "$OLD/bench/latency.py"
export PYTHONUNBUFFERED=1
for r in $(seq 1 "$ROUNDS"); do
  for side in new old; do
    dir=$NEW; [ "$side" = old ] && dir=$OLD
    (cd "$dir" && python3 bench/latency.py --engines hybrid --requests 40 --random-requests 0 "${ARGS[@]}" \
       --out "$OUT/ab-$side-$r.json" > "$OUT/ab-$side-$r.log" 2>&1)
    grep -E "ttft p50|tpot p50" "$OUT/ab-$side-$r.log" | sed "s/^/$side$r /"
  done
done
