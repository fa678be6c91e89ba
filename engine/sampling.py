"""Sampling on device: logit bias and OpenAI's presence/frequency penalties, temperature, top-k, top-p,
seeded per request. Plain greedy stays inside the graphs."""
from __future__ import annotations

import torch

from .api import SamplingParams


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> torch.Tensor:
    """logits: (V,) float32 -> (1,) token id, without a host sync."""
    # Shifted by the max (softmax is unchanged) so the scaled logits are <= 0 and the max stays 0, never
    # inf - inf = nan; temperatures below 1e-6 (down to 5e-324, which is 0 in float32) act as 1e-6: that is
    # greedy already, up to near-ties within ~1e-5 of the top logit.
    x = (logits - logits.max()) / max(p.temperature, 1e-6)
    if p.top_k and p.top_k < x.numel():
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        srt, idx = torch.sort(x, descending=True)
        probs = torch.softmax(srt, dim=-1)
        drop = probs.cumsum(-1) - probs > p.top_p          # keep the smallest set reaching top_p
        x = x.scatter(0, idx, srt.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(x, dim=-1), 1, generator=gen)


def shape_logits(logits: torch.Tensor, p: SamplingParams, counts: torch.Tensor | None,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """OpenAI's logit adjustments, on device: logits + bias - frequency_penalty * count
    - presence_penalty * (count > 0), count = each token's occurrences in the output so far."""
    x = logits if bias is None else logits + bias
    if counts is not None:
        x = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(x.dtype)
    return x
