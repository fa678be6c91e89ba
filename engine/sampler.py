"""Per-row sampling on device for a batch of streams.

Each KV slot carries its stream's sampling parameters in device tensors, so one batched pass picks every row's
token: logit bias and penalties, temperature, top-k, top-p, then the Gumbel-max draw. The noise of a row is a
hash of (its seed, its position, the token id): a seeded stream draws the same tokens whatever shares its batch."""
from __future__ import annotations

import os

import torch

from .api import SamplingParams

_M32 = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 values in [0, 2^32) (every product stays below 2^63)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x6B43A9B5) & _M32
    return x ^ (x >> 16)


def gumbel(seed: torch.Tensor, step: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Gumbel noise (n, V) float32 for rows with seeds (n,) at steps (n,), one value per token id in ids (n, V)
    or (V,)."""
    key = _mix(_mix((seed & _M32) ^ _mix((seed >> 32) & _M32)) ^ (step & _M32))
    h = _mix(_mix(key[:, None] ^ ((ids * 0x9E3779B1) & _M32)))
    u = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))


class SlotSampler:
    """Sampling parameters per KV slot (device tensors) and the batched pick over rows of logits."""

    def __init__(self, slots: int, vocab: int, device: torch.device):
        self.vocab, self.device = vocab, device
        self.f = torch.zeros(slots, 4, device=device)                        # temperature, top_p, presence, frequency
        self.i = torch.zeros(slots, 2, dtype=torch.long, device=device)      # top_k, seed
        self.counts: torch.Tensor | None = None     # (slots, V) output-token counts, made at the first penalty
        self.bias: torch.Tensor | None = None       # (slots, V) logit bias, made at the first bias
        self._biased: set[int] = set()
        self._ids = torch.arange(vocab, device=device)

    def set(self, slot: int, p: SamplingParams) -> None:
        """Load a new stream's parameters into its slot (two small copies, more only for bias / penalties)."""
        seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.f[slot].copy_(torch.tensor([p.temperature, p.top_p, p.presence_penalty, p.frequency_penalty]))
        self.i[slot].copy_(torch.tensor([p.top_k, seed % (1 << 63)]))
        if p.presence_penalty or p.frequency_penalty:
            if self.counts is None:
                self.counts = torch.zeros(self.f.shape[0], self.vocab, device=self.device)
            self.counts[slot].zero_()
        if p.logit_bias or slot in self._biased:
            if self.bias is None:
                self.bias = torch.zeros(self.f.shape[0], self.vocab, device=self.device)
            self.bias[slot].zero_()
            self._biased.discard(slot)
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
                vals = torch.tensor(list(p.logit_bias.values()), dtype=self.bias.dtype)
                self.bias[slot, ids.to(self.device)] = vals.to(self.device)
                self._biased.add(slot)

    def pick(self, logits: torch.Tensor, slots: torch.Tensor, step: torch.Tensor, shaped: bool, top_k: bool,
             top_p: bool) -> torch.Tensor:
        """Tokens (n,) for logits (n, V) of rows in slots (n,) at steps (n,). shaped / top_k / top_p: whether any
        row has bias or penalties / a top-k / a top-p (the host knows; rows without one are unaffected)."""
        f, i = self.f[slots], self.i[slots]
        x = logits
        if shaped:
            if self.bias is not None:
                x = x + self.bias[slots]
            if self.counts is not None:
                c = self.counts[slots]
                x = x - f[:, 3:4] * c - f[:, 2:3] * (c > 0).to(x.dtype)
        greedy = x.argmax(-1)
        temp = f[:, 0:1]
        # scaled logits <= 0 (max subtracted first), so tiny temperatures give -inf, never nan
        y = (x - x.max(-1, keepdim=True).values) / temp.clamp(min=1e-6)
        if top_k or top_p:
            srt, idx = y.sort(-1, descending=True)
            if top_k:
                k = i[:, 0:1]
                srt = srt.masked_fill((k > 0) & (self._ids[None, :] >= k), float("-inf"))
            if top_p:
                probs = torch.softmax(srt, -1)
                drop = (probs.cumsum(-1) - probs > f[:, 1:2]) & (f[:, 1:2] < 1)   # keep the smallest set reaching top_p
                srt = srt.masked_fill(drop, float("-inf"))
            j = (srt + gumbel(i[:, 1], step, idx)).argmax(-1, keepdim=True)
            drawn = idx.gather(1, j)[:, 0]
        else:
            drawn = (y + gumbel(i[:, 1], step, self._ids)).argmax(-1)
        return torch.where(temp[:, 0] > 0, drawn, greedy)

    def count(self, slots: torch.Tensor, tok: torch.Tensor) -> None:
        """Each row's new token joins its slot's penalty counts."""
        if self.counts is not None:
            self.counts.index_put_((slots, tok), torch.ones_like(tok, dtype=self.counts.dtype), accumulate=True)


def logprob_rows(logits: torch.Tensor, tok: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax of raw logits (n, V): (chosen token's value and the top k values (n, 1 + k), top ids (n, k))."""
    lp = torch.log_softmax(logits, dim=-1)
    top = lp.topk(k, dim=-1) if k else None
    chosen = lp.gather(1, tok[:, None])
    if not k:
        return chosen, torch.zeros(chosen.shape[0], 0, dtype=torch.long, device=logits.device)
    return torch.cat([chosen, top.values], 1), top.indices
