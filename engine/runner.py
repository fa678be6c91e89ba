"""The device side of a step: static buffers, the two captured functions (a prompt's prefill into its slot, a
decode step over the batch's rows), their launch by graph or eagerly (JIT), and the asynchronous read-back of
tokens and logprobs into pinned host memory.

Device state per KV slot: the stream's last token (tok_s) and next position (pos_s). A decode step of B rows
gathers them by `rows` (the slot of each row; padding rows point at the scratch slot), runs the model, picks each
row's greedy token and scatters token and position back, so the next step needs nothing from the host."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from .api import MAX_LOGPROBS
from .model import Llama
from .sampler import SlotSampler, logprob_rows
from .sequence import Stream


@dataclass
class Step:
    """A launched decode step: its rows' streams and where their tokens land."""
    streams: list[Stream]
    buf: int
    k: int | None                # logprobs: alternatives read back (None: none asked)
    size: int                    # the graph / JIT batch size that ran
    cpu_s: float                 # CPU: the step ran at its launch, in this many seconds
    prompt: Stream | None = None  # a mixed step: the prompt that rode in it (its first token in read-back row `row`)
    row: int = 0


class Runner:
    def __init__(self, model: Llama, buckets: list[int], max_batch: int, max_rows: int, device: torch.device):
        self.model, self.device, self.cuda = model, device, device.type == "cuda"
        kv, V = model.kv, model.args.vocab_size
        self.scratch = kv.scratch
        maxb = buckets[-1]
        dev, pin = device, self.cuda
        self.ids = torch.zeros(maxb, dtype=torch.long, device=dev)
        self.positions = torch.arange(maxb, dtype=torch.long, device=dev)
        self.seq_len = torch.ones(1, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.tok_s = torch.zeros(kv.slots + 1, dtype=torch.long, device=dev)
        self.pos_s = torch.zeros(kv.slots + 1, dtype=torch.long, device=dev)
        self.rows = torch.full((max_rows,), kv.scratch, dtype=torch.long, device=dev)
        self.logits = torch.zeros(max_rows, V, dtype=torch.float32, device=dev)
        self.out = torch.zeros(max_rows, dtype=torch.long, device=dev)
        self.plogits = torch.zeros(1, V, dtype=torch.float32, device=dev)
        self.ptok = torch.zeros(1, dtype=torch.long, device=dev)
        self.sampler = SlotSampler(kv.slots + 1, V, dev)
        # pinned host buffers: prompt ids (one row per admission of an iteration, then one per step buffer for a
        # mixed step's prompt), each step's tokens and logprobs (two buffers: step i+1 is queued before step i's
        # are read)
        self._ids_host = torch.zeros(max_batch + 2, maxb, dtype=torch.long, pin_memory=pin)
        self._ids_np = self._ids_host.numpy()
        self._tok_host = torch.zeros(2, max_rows, dtype=torch.long, pin_memory=pin)
        self._lp_vals = torch.zeros(2, max_rows, MAX_LOGPROBS + 1, pin_memory=pin)
        self._lp_ids = torch.zeros(2, max_rows, MAX_LOGPROBS, dtype=torch.long, pin_memory=pin)
        # prompts' first tokens: one row per admission of an iteration, then one per step buffer (a mixed step's)
        self.mixed_row = max_batch
        self._ptok_host = torch.zeros(max_batch + 2, dtype=torch.long, pin_memory=pin)
        self._plp_vals = torch.zeros(max_batch + 2, MAX_LOGPROBS + 1, pin_memory=pin)
        self._plp_ids = torch.zeros(max_batch + 2, MAX_LOGPROBS, dtype=torch.long, pin_memory=pin)
        self._events = [torch.cuda.Event() for _ in range(2 + max_batch)] if self.cuda else None
        self._timers = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if self.cuda else None
        self._buf = 0
        self._rows_host: list[int] = []
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def ctx(self):
        """The serving stream and inference mode around every launch."""
        s = torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(s)
        stack.enter_context(torch.inference_mode())
        return stack

    # ------------------------------------------------------------ the captured functions
    def prefill_fn(self, L: int) -> None:
        """Prefill of ids[:L] (real length seq_len) into KV slot `slot`: logits in plogits, the greedy token in
        ptok and tok_s[slot], the next position in pos_s[slot]."""
        self._prefilled(self.model.prefill(self.ids[:L], self.positions[:L], self.seq_len, self.slot))

    def decode_fn(self, B: int) -> None:
        """One decode step of rows[:B]: logits[:B], greedy tokens in out[:B] and tok_s, positions advanced."""
        sl = self.rows[:B]
        pos = self.pos_s.index_select(0, sl)
        self._decoded(self.model.decode(self.tok_s.index_select(0, sl), pos, sl), sl, pos)

    def mixed_fn(self, L: int, B: int) -> None:
        """prefill_fn(L) and decode_fn(B) in one pass (the prompt rides in the decode step; its slot is not a row)."""
        sl = self.rows[:B]
        pos = self.pos_s.index_select(0, sl)
        logits = self.model.mixed(self.ids[:L], self.positions[:L], self.seq_len, self.slot,
                                  self.tok_s.index_select(0, sl), pos, sl)
        self._prefilled(logits[:1])
        self._decoded(logits[1:], sl, pos)

    def _prefilled(self, logits: torch.Tensor) -> None:
        self.plogits.copy_(logits)
        t = logits.argmax(-1)
        self.ptok.copy_(t)
        self.tok_s.scatter_(0, self.slot, t)
        self.pos_s.scatter_(0, self.slot, self.seq_len)

    def _decoded(self, logits: torch.Tensor, sl: torch.Tensor, pos: torch.Tensor) -> None:
        B = sl.shape[0]
        self.logits[:B].copy_(logits)
        t = logits.argmax(-1)
        self.out[:B].copy_(t)
        self.tok_s.scatter_(0, sl, t)
        self.pos_s.scatter_(0, sl, pos + 1)
        self.pos_s[self.scratch:].zero_()           # padding rows stay at position 0 of the scratch slot

    # ------------------------------------------------------------ launches (engine thread)
    def launch_prefill(self, st: Stream, j: int, graph) -> None:
        """Queue st's prefill into its slot (graph replay, or the same function eagerly at its bucket's shape) and
        the read-back of its first token (and logprobs) into admission row j."""
        self._stage_prompt(st, j)
        if graph is not None:
            graph.replay()
        else:
            self.prefill_fn(st.bucket)
        self._prompt_out(st, j)
        if self.cuda:
            self._events[2 + j].record()

    def _stage_prompt(self, st: Stream, j: int) -> None:
        n = len(st.ids)
        self._ids_np[j, :n] = st.ids
        self.ids[:n].copy_(self._ids_host[j, :n], non_blocking=True)
        self.seq_len.fill_(n)
        self.slot.fill_(st.slot)
        self.sampler.set(st.slot, st.params)

    def _prompt_out(self, st: Stream, j: int) -> None:
        """After a prompt's pass: its sampled first token and its read-back into row j."""
        p = st.params
        if p.temperature > 0 or p.shapes_logits:
            t = self.sampler.pick(self.plogits, self.slot, self.seq_len, p.shapes_logits, p.top_k > 0, p.top_p < 1)
            self.ptok.copy_(t)
            self.tok_s.scatter_(0, self.slot, t)
        if p.presence_penalty or p.frequency_penalty:
            self.sampler.count(self.slot, self.ptok)
        if p.logprobs is not None:
            vals, idx = logprob_rows(self.plogits, self.ptok, p.logprobs)
            self._plp_vals[j, :p.logprobs + 1].copy_(vals[0], non_blocking=True)
            self._plp_ids[j, :p.logprobs].copy_(idx[0], non_blocking=True)
        self._ptok_host[j:j + 1].copy_(self.ptok, non_blocking=True)

    def read_prefill(self, j: int, k: int | None) -> tuple[int, tuple[list[float], list[int]] | None]:
        if self.cuda and j < self.mixed_row:     # a mixed step's row: read after its step's own event
            self._events[2 + j].synchronize()
        lp = (self._plp_vals[j, :k + 1].tolist(), self._plp_ids[j, :k].tolist()) if k is not None else None
        return int(self._ptok_host[j]), lp

    def set_rows(self, slots: list[int], B: int) -> None:
        """rows[:B] = the batch's slots, padded with the scratch slot (copied only when they change)."""
        rows = slots + [self.scratch] * (B - len(slots))
        if rows != self._rows_host:
            self.rows[:B].copy_(torch.tensor(rows, dtype=torch.long))   # pageable: the host list is free at return
            self._rows_host = rows

    def launch_decode(self, streams: list[Stream], B: int, graph, prompt: Stream | None = None) -> Step:
        """Queue a decode step of these streams at the graph / JIT batch size B. prompt: a mixed step (graph of
        mixed_fn(prompt's bucket, B), or that function eagerly): the prompt's prefill rides in the step."""
        n = len(streams)
        buf = self._buf
        self._buf ^= 1
        self.set_rows([s.slot for s in streams], B)
        row = self.mixed_row + buf
        if prompt is not None:
            self._stage_prompt(prompt, row)
        if self.cuda:
            self._timers[2 * buf].record()
        t0 = time.perf_counter()
        if graph is not None:
            graph.replay()
        elif prompt is not None:
            self.mixed_fn(prompt.bucket, B)
        else:
            self.decode_fn(B)
        if self.cuda:
            self._timers[2 * buf + 1].record()
        if prompt is not None:
            self._prompt_out(prompt, row)
        ps = [s.params for s in streams]
        shaped = any(p.shapes_logits for p in ps)
        if shaped or any(p.temperature > 0 for p in ps):
            sl = self.rows[:n]
            t = self.sampler.pick(self.logits[:n], sl, self.pos_s.index_select(0, sl), shaped,
                                  any(p.top_k > 0 for p in ps), any(p.top_p < 1 for p in ps))
            self.out[:n].copy_(t)
            self.tok_s.scatter_(0, sl, t)
        if any(p.presence_penalty or p.frequency_penalty for p in ps):
            self.sampler.count(self.rows[:n], self.out[:n])
        ks = [p.logprobs for p in ps if p.logprobs is not None]
        k = max(ks) if ks else None
        if k is not None:
            vals, idx = logprob_rows(self.logits[:n], self.out[:n], k)
            self._lp_vals[buf, :n, :k + 1].copy_(vals, non_blocking=True)
            self._lp_ids[buf, :n, :k].copy_(idx, non_blocking=True)
        self._tok_host[buf, :n].copy_(self.out[:n], non_blocking=True)
        if self.cuda:
            self._events[buf].record()
        return Step(streams, buf, k, B, time.perf_counter() - t0, prompt, row)

    def read_decode(self, step: Step) -> tuple[list[int], list | None, list | None, float]:
        """The step's tokens (one host wait: this step's, not the next one's), logprob rows if asked, and the
        step's time in ms (GPU time of the graph or JIT launches on CUDA)."""
        b = step.buf
        if self.cuda:
            self._events[b].synchronize()
            ms = self._timers[2 * b].elapsed_time(self._timers[2 * b + 1])
        else:
            ms = step.cpu_s * 1e3
        n = len(step.streams)
        toks = self._tok_host[b, :n].tolist()
        if step.k is None:
            return toks, None, None, ms
        return toks, self._lp_vals[b, :n, :step.k + 1].tolist(), self._lp_ids[b, :n, :step.k].tolist(), ms
