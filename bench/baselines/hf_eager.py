"""HF transformers eager, the floor of effort: LlamaForCausalLM with its default dynamic cache, no
compile, no graphs; prefill at the prompt's own length, then one forward per token, by our own loop.

    python -m bench.baselines.hf_eager --out /tmp/hf_eager.json         # LLaMA-2-7B shapes, CUDA
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.baselines.common import StepTimer, baseline_parser, run_baseline  # noqa: E402
from bench.baselines.hf_static import build_hf_model, cache_kwarg  # noqa: E402


class HFEager:
    def __init__(self, a):
        self.model, self.cfg, hf = build_hf_model(a)
        self.device = torch.device(a.device)
        self.kw = cache_kwarg(self.model)
        self.vocab = hf["vocab_size"]
        self.batches = sorted(set([1] + list(a.batches)))

    def _fwd(self, x: torch.Tensor, cache):
        out = self.model(input_ids=x, use_cache=True, logits_to_keep=1, **{self.kw: cache})
        return out.logits[:, -1].argmax(-1), getattr(out, "cache", None) or out.past_key_values

    @torch.no_grad()
    def generate(self, ids: list[int], n: int) -> tuple[list[int], float, list[float]]:
        t0 = time.perf_counter()
        nxt, cache = self._fwd(torch.tensor([ids], device=self.device), None)
        toks, times = [int(nxt.item())], [time.perf_counter()]
        for _ in range(n - 1):
            nxt, cache = self._fwd(nxt.view(1, 1), cache)
            toks.append(int(nxt.item()))
            times.append(time.perf_counter())
        return toks, times[0] - t0, [b - a for a, b in zip(times, times[1:])]

    def warm(self) -> dict:
        t0 = time.perf_counter()
        self.generate([1] * 16, 4)
        return {"first_call": round(time.perf_counter() - t0, 2)}

    @torch.no_grad()
    def time_decode(self, batch: int, context: int, steps: int) -> list[tuple[float, float]]:
        """Steps at ``batch`` rows after one prefill of ``context`` random tokens each (the cache grows).
        Run twice, the second timed: eager kernels pay once per new shape (each step's KV length is one)."""
        for timed in (False, True):
            x = torch.randint(3, self.vocab, (batch, context), device=self.device)
            nxt, cache = self._fwd(x, None)
            out = []
            for _ in range(steps):
                with StepTimer(self.device) as t:
                    nxt, cache = self._fwd(nxt.view(batch, 1), cache)
                    nxt.tolist()
                out.append((t.gpu_s, t.wall_s))
        return out


def main(argv=None) -> None:
    p = baseline_parser(__doc__)
    p.set_defaults(requests=8, decode_tokens=16, random_requests=30, steps=20)
    a = p.parse_args(argv)
    run_baseline("hf_eager", a, HFEager)


if __name__ == "__main__":
    main()
