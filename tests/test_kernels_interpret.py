"""The Triton kernels (engine/kernels/) on CPU, through Triton's interpreter: their indexing, masking,
loop bounds and merges run in CI, not only on a GPU. The interpreter runs programs one after another, so
it checks the logic, not timing, memory ordering or PDL (off without sm_90); tests/test_kernels_gpu.py
checks those on the device. Triton reads TRITON_INTERPRET when it is imported (its own library functions
are jit functions too), so the kernel tests (tests/interpret_kernels.py) run in a fresh interpreter."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernels_under_the_triton_interpreter():
    tests = Path(__file__).resolve().parent
    # -n 0: one process (pyproject's addopts would start two xdist workers for this one file)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                        str(tests / "interpret_kernels.py")],
                       env=dict(os.environ, TRITON_INTERPRET="1"), cwd=tests.parent, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "20 passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]
