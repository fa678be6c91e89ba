"""Programmatic dependent launch (sm_90+) for the kernels of a step."""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl


def _pdl_supported() -> bool:
    """Programmatic dependent launch: Hopper or newer, and a Triton with griddepcontrol and `launch_pdl`."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda as tl_cuda
    except ImportError:
        return False
    return (hasattr(tl_cuda, "gdc_wait") and hasattr(tl_cuda, "gdc_launch_dependents")
            and "launch_pdl" in {f.name for f in dataclasses.fields(CUDAOptions)}
            and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9)


# Programmatic dependent launch (sm_90+): each kernel lets the next one launch early (gdc_launch_dependents)
# and waits for the previous one's writes (gdc_wait) before reading them; inside a graph these become
# programmatic edges. The engine's KernelPlan decides whether to use it (engine/plan.py); a launch uses it
# for one row only (batch-1 decode): at 2-16 rows, where the tensor-core tiles run, it made the steps slower
# (docs/decisions/kernels.md).
PDL_SUPPORTED = _pdl_supported()
PDL_ROWS = 1


def _pdl(pdl: bool, rows: int) -> bool:
    return pdl and PDL_SUPPORTED and rows <= PDL_ROWS


@triton.jit
def _pdl_start(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _pdl_wait(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
