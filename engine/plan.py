"""Which kernels the model runs: one frozen plan derived from EngineConfig and the device, passed to every op
(no module switches flipped at run time)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import EngineConfig


@dataclass(frozen=True)
class KernelPlan:
    triton: bool = False          # CUDA: Triton kernels for the non-matmul ops (else the PyTorch reference)
    skinny: bool = False          # CUDA: the Triton skinny matmul for up to skinny_max_rows rows (else cuBLAS)
    fused_norm: bool = False      # CUDA, one row: the GEMV applies the RMSNorm of its input in its own loads
    pdl: bool = False             # CUDA sm_90+: programmatic dependent launch in one-row steps (kernels.PDL_ROWS)
    skinny_max_rows: int = 32     # prefill buckets up to this many rows run the skinny kernel too
    decode_tile: int = 32         # decode at >= 2 rows: one row tile for every batch size (batch-invariant rows)
    batch_invariant: bool = False  # decode at one row on the same tile as every other batch size (no GEMV)
    attn_programs: int = 132      # decode attention: split the KV until rows x kv heads x splits reach this (1 per SM)

    def attention_shape(self, rows: int, n_kv: int) -> tuple[int, int, int, int]:
        """(splits, BLOCK_N, warps, stages) of the decode attention at `rows` rows: fewer splits as rows fill the
        GPU (one split of a short context is mostly launch and reduce); 64-position tiles; 8 warps and 3 stages
        while the programs fit one wave, 4 warps and no pipeline past it; batch-invariant plans keep one shape for
        every row count, so a row's sums do not depend on its company (docs/decisions/kernels.md, "Decode attention
        at 2-32 rows")."""
        def pow2(n: int) -> int:
            return min(16, 1 << max(0, n.bit_length() - 1))
        if self.batch_invariant:
            return 4, 64, 8, 3
        if rows == 1:      # one row: 4-warp programs without a cp.async pipeline, two per SM
            return pow2(2 * self.attn_programs // n_kv), 64, 4, 1
        splits = pow2(self.attn_programs // (rows * n_kv))
        if rows * n_kv * splits <= 3 * self.attn_programs:     # one wave at three 8-warp pipelined programs per SM
            return splits, 64, 8, 3
        return splits, 64, 4, 1      # past one wave: lighter programs, more of them resident, no part-filled wave

    @classmethod
    def from_config(cls, cfg: EngineConfig, device: torch.device) -> "KernelPlan":
        if device.type != "cuda":
            return cls()
        triton = cfg.kernels == "triton"
        return cls(triton=triton, skinny=triton and cfg.skinny_matmul, fused_norm=cfg.fused_gemv_norm,
                   pdl=triton and cfg.pdl, decode_tile=32 if max(cfg.batch_sizes(True)) <= 32 else 64,
                   batch_invariant=cfg.batch_invariant,
                   attn_programs=torch.cuda.get_device_properties(device).multi_processor_count)
