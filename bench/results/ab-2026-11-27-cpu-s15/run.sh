#!/usr/bin/env bash
# A = HEAD (before the fast path), B = working tree; alternating A B A B
cd /work/main && . .venv/bin/activate
for r in A1 B1 A2 B2 A3 B3; do
  t=${r:0:1}; dir=/work/main; [ $t = A ] && dir=/tmp/A
  (cd $dir && python bench/http_overhead.py --device cpu --preset tiny --topology colocated --app local_first=true \
    --app user_code_thread=false --app access_log=false --env RAY_SERVE_ENABLE_HA_PROXY=1 --lengths 16,128 \
    --requests 80 --out /tmp/abs15 --tag $r > /tmp/abs15/$r.log 2>&1)
  echo "$r done $(date +%T)"
done
