#!/usr/bin/env bash
# One-command set-up (CPU machine or GPU host): Prometheus for the observability tests, then the
# project with its test extras. torch is pinned to the 2.13.0 CPU wheel where the default index
# would pull a multi-GB CUDA build; on a GPU host keep its own torch: HYBRIDSERVE_KEEP_TORCH=1.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v prometheus >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq prometheus >/dev/null
fi
python -m pip install -q --upgrade pip
if [ "${HYBRIDSERVE_KEEP_TORCH:-0}" = 1 ]; then
  python -m pip install -q -e '.[dev]'
else
  python -m pip install -q torch==2.13.0 -e '.[dev]'
fi
