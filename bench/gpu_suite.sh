#!/usr/bin/env bash
# Everything GPU-side in one go on any CUDA machine: the GPU tests, the GEMV microbenchmark, the
# decode-step profile (kernels, streaming TPOT, GEMV config sweep) and the latency benchmark
# (engine A/B + baselines). Results go to ${OUT:-bench/results}/.
#   bash bench/gpu_suite.sh [engines]        # default engines: hybrid,hf-eager,torch.compile (A/B: hybrid-unfused, hybrid-cublas)
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
ENGINES=${1:-hybrid,hf-eager,torch.compile}
python3 -m pytest -q -m gpu tests/test_engine_gpu.py tests/test_kernels_gpu.py -p no:cacheprovider 2>&1 \
  | tail -25 | tee "$OUT/gpu-tests.log"
python3 bench/gemv.py 2>&1 | tee "$OUT/gemv.log"
python3 bench/profile_decode.py --requests 12 --long-requests 2 2>&1 | grep -v -i warn | tee "$OUT/profile.log"
cp bench/results/profile-decode-*.json "$OUT/" 2>/dev/null || true
python3 bench/latency.py --engines "$ENGINES" --out "$OUT/latency.json" 2>&1 | grep -v Warning | tail -40
