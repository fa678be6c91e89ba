"""Engine settings: one pydantic model, embedded by the serving config (deployments.config)."""
from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from artifacts.config import StoreConfig

DEFAULT_BUCKETS = [16, 32, 64, 128, 256, 384, 512, 1024, 2048]


class EngineConfig(StoreConfig):
    """Everything one HybridEngine needs. serve_config.yaml's ``engine:`` section is this model; the
    artifact store's settings (``store``, ``store_public_keys``, ...) come from artifacts.StoreConfig."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("tiny", description="preset name (tiny, llama-2-7b, llama-3-8b) or HF checkpoint dir")
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="auto: float16 on CUDA, float32 on CPU")
    max_context: int = Field(2048, ge=16, description="tokens of the static KV cache (prompt + output)")
    buckets: list[int] = Field(default_factory=lambda: list(DEFAULT_BUCKETS),
                               description="prefill prompt-length buckets; one CUDA graph each")
    prewarm_buckets: list[int] | Literal["all"] = Field(
        default_factory=list, description="buckets captured before ready (plus the store's warm list)")
    max_batch: int | None = Field(None, ge=1, le=64, description="KV slots: streams decoded together in one step "
                                                               "(None: 32 on CUDA, 8 on CPU)")
    decode_batch_sizes: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32],
                                          description="decode graphs by batch size; a step replays the smallest "
                                                      ">= its running streams (max_batch is always added)")
    prewarm_batch_sizes: list[int] | Literal["all"] = Field(
        "all", description="decode batch sizes captured before ready; others run by the JIT path and are captured "
                           "in the background")
    max_waiting: int | None = Field(None, ge=0, description="requests queued for a free slot before new ones are "
                                                           "refused as busy (None: 4 x max_batch)")
    tpot_slo_ms: float | None = Field(None, gt=0, description="cap the batch at the largest size whose measured "
                                                              "decode step stays under this (the replica reads as "
                                                              "full beyond it)")
    batch_invariant: bool = Field(False, description="CUDA: one stream alone decodes on the same kernel tile as a "
                                                     "batch (bit-identical rows at every batch size; slower at 1)")
    pdl: bool = Field(True, description="CUDA sm_90+: programmatic dependent launch between the kernels of a "
                                        "one-row decode step")
    cuda_graphs: bool = True
    kernels: Literal["triton", "torch"] = Field("triton", description="CUDA non-matmul ops: Triton or PyTorch")
    skinny_matmul: bool = Field(True, description="CUDA: Triton GEMV for decode and prefill buckets of <= 32 rows instead of cuBLAS")
    fused_gemv_norm: bool = Field(True, description="CUDA, decode (one row): each RMSNorm runs inside the GEMV that "
                                                   "reads its output (no norm kernels); off: an RMSNorm kernel first")
    background_capture: bool = True
    max_pad_factor: float = Field(
        4.0, ge=0, description="CUDA: a prompt whose bucket has no graph yet replays the smallest warm bucket "
                               "up to this many times larger (padding) instead of the JIT path; 0 = off")
    spin_s: float = Field(0.5, ge=0, description="CUDA: once idle the engine thread polls for the next request "
                                                 "this long before it sleeps (waking a sleeping thread costs TTFT); "
                                                 "it busies one CPU core meanwhile")
    admit_window: float = Field(0.75, ge=0, lt=1, description="CUDA: for this fraction of a running decode step, "
                                "before the next step is queued, an arriving request is admitted at once (its "
                                "prefill runs right after the running step); the rest of the step is the slack "
                                "for queueing the next one; 0 = admit only between steps")
    mixed_prefill: bool = Field(True, description="a prompt admitted while other streams decode rides in their next "
                                "decode step (one pass over the prompt's rows and the batch's reads the weights once) "
                                "instead of a prefill of its own before it; off under batch_invariant (the rows' "
                                "projections would run on the prompt's tiles)")
    mixed_max_bucket: int = Field(512, ge=1, description="longest prompt bucket that rides in a decode step (CUDA: "
                                  "one graph per bucket and decode batch size up to it); longer prompts prefill alone")
    num_layers: int | None = Field(None, ge=1, description="presets only: override layer count (benchmarks)")
    seed: int = Field(0, description="seed for random preset weights")
    cache_dir: str | None = Field(None, description="local compile cache (default ~/.cache/hybridserve/<fingerprint>)")

    @field_validator("buckets")
    @classmethod
    def _sorted_buckets(cls, v: list[int]) -> list[int]:
        """Sorted, unique, positive."""
        if not v:
            raise ValueError("buckets must not be empty")
        if any(b <= 0 for b in v):
            raise ValueError("buckets must be positive")
        return sorted(set(v))

    @field_validator("decode_batch_sizes")
    @classmethod
    def _sorted_sizes(cls, v: list[int]) -> list[int]:
        if not v or any(b <= 0 or b > 64 for b in v):
            raise ValueError("decode_batch_sizes must be a non-empty list of sizes in 1..64")
        return sorted(set(v))

    def slots(self, cuda: bool) -> int:
        """KV slots (max_batch, or its device default)."""
        return self.max_batch or (32 if cuda else 8)

    def mixed_buckets(self) -> list[int]:
        """The prompt buckets that ride in decode steps (none when mixing is off or rows must stay batch-invariant)."""
        if not self.mixed_prefill or self.batch_invariant:
            return []
        return [b for b in self.buckets if b <= self.mixed_max_bucket]

    def batch_sizes(self, cuda: bool) -> list[int]:
        """Decode batch sizes up to the slots, the slot count included."""
        n = self.slots(cuda)
        return sorted({b for b in self.decode_batch_sizes if b <= n} | {n})

    @model_validator(mode="after")
    def _fit_context(self) -> "EngineConfig":
        self.buckets = [b for b in self.buckets if b < self.max_context] + [self.max_context]
        self.buckets = sorted(set(self.buckets))
        if self.prewarm_batch_sizes != "all":
            bad = [b for b in self.prewarm_batch_sizes if b not in self.decode_batch_sizes]
            if bad:
                raise ValueError(f"prewarm_batch_sizes {bad} are not among decode_batch_sizes {self.decode_batch_sizes}")
        if self.prewarm_buckets != "all":
            bad = [b for b in self.prewarm_buckets if b not in self.buckets]
            if bad:
                raise ValueError(f"prewarm_buckets {bad} are not among buckets {self.buckets}")
        return self
