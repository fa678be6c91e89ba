"""A batched replica's engine: continuous batching over KV slots, as engine/scheduler.py runs it.

Each iteration admits waiting requests into free slots, one prefill after another (each request's
first token comes at the end of its own prefill), then runs one decode step of every running stream
at the step time of that batch size (``ReplicaModel.step_ms``: the smallest measured batch >= it). With
``ReplicaModel.mixed_weight_ms`` the last prompt admitted while streams run rides in that step instead
(``ReplicaModel.mixed_ms``; its first token at the step's end), as the engine's mixed steps do.
A stream of ``max_tokens`` leaves after its ``max_tokens - 1``-th decode step and frees its slot; a
prefill therefore delays every running stream, and a request waits for the iteration under way.

The engine runs lazily: ``advance(t)`` runs the iterations that start before ``t``, jumping over runs
of pure decode steps (constant batch) to the next finish, so a request costs O(1) work, not one per
token. The simulator advances a replica before it routes to it, reads its stats, or stops it.
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from typing import Callable, Deque, List, Tuple


class BatchedEngine:
    """One replica's scheduler. ``on_admit(req, t_start, t_first, path[, rode_s])`` and
    ``on_finish(req, t_finish)`` report each request's admission and first token (rode_s: a mixed prompt's
    decode step without it) and its end; ``req`` is the caller's record (a list, whose slot 1 holds its
    arrival time and slot 2 its bucket)."""

    __slots__ = ("t", "v", "run", "wait", "slots", "model", "decode_steps", "warm", "on_admit",
                 "on_finish", "last_finish", "_seq")

    def __init__(self, model, max_tokens: int, ready_at: float, warm: Callable, on_admit: Callable,
                 on_finish: Callable):
        self.t = ready_at                 # start of the engine's next iteration (or idle since)
        self.v = 0                        # decode steps run so far
        self.run: List[Tuple[int, int, list]] = []     # heap (decode step it finishes at, seq, req)
        self.wait: Deque[list] = deque()
        self.slots = model.max_batch
        self.model = model
        self.decode_steps = max(0, max_tokens - 1)
        self.warm = warm                  # t -> the replica's warm buckets at t
        self.on_admit, self.on_finish = on_admit, on_finish
        self.last_finish = ready_at
        self._seq = 0

    def in_flight(self) -> int:
        return len(self.run) + len(self.wait)

    def running(self) -> int:
        return len(self.run)

    def arrive(self, req: list, t: float) -> None:
        """A request reaches the engine at ``t`` (after ``advance(t)``): it waits for the next iteration."""
        self.advance(t)
        if not self.run and not self.wait:
            self.t = max(self.t, t)       # an idle engine wakes for it
        self.wait.append(req)

    def advance(self, until: float) -> None:
        """Run every iteration that starts before ``until`` (math.inf: until the engine is idle)."""
        while (self.run or self.wait) and self.t < until:
            if self.wait and len(self.run) < self.slots:
                self._iteration()
                continue
            # pure decode at a constant batch: jump to the next finish, or past ``until``
            step_s = self.model.step_ms(len(self.run)) / 1000.0
            k = self.run[0][0] - self.v
            if until != math.inf:
                k = min(k, max(1, math.ceil((until - self.t) / step_s)))
            k = max(1, k)
            self.t += k * step_s
            self.v += k
            self._retire()

    def _iteration(self) -> None:
        t = self.t
        warm = self.warm(t)
        while self.wait and len(self.run) < self.slots:
            req = self.wait.popleft()
            pre_ms, path = self.model.prefill_ms(req[2], warm)
            last = not self.wait or len(self.run) + 1 >= self.slots
            if last and self.run and self.model.mixed_weight_ms:       # it rides in this iteration's step
                start = t
                t += self.model.mixed_ms(pre_ms, len(self.run)) / 1000.0
                self.v += 1
                self.on_admit(req, start, t, path, self.model.step_ms(len(self.run)) / 1000.0)
                self._join(req, t, self.v)
                self.t = t
                self._retire()
                return
            start = t
            t += pre_ms / 1000.0
            self.on_admit(req, start, t, path)
            self._join(req, t, self.v)
        if self.run:
            t += self.model.step_ms(len(self.run)) / 1000.0
            self.v += 1
        self.t = t
        self._retire()

    def _join(self, req: list, t: float, v: int) -> None:
        """req has its first token at t: it finishes at once (one token) or after decode_steps steps from step v."""
        if self.decode_steps == 0:
            self.on_finish(req, t)
            self.last_finish = t
            return
        self._seq += 1
        heapq.heappush(self.run, (v + self.decode_steps, self._seq, req))

    def _retire(self) -> None:
        run = self.run
        while run and run[0][0] <= self.v:
            _, _, req = heapq.heappop(run)
            self.on_finish(req, self.t)
            self.last_finish = self.t
