"""The scheduler loop on the engine thread: continuous batching over KV slots.

Each iteration admits waiting requests into free slots (prefill first: each prompt runs its bucket's prefill
graph into its slot; while other streams decode, the last prompt admitted in an iteration instead rides in their
decode step, a mixed step, so the weights are read once for both), launches one decode step for every running
stream that needs another token, then reads the previous step's tokens back, so the GPU always has the next step
queued while the host turns tokens into text (on CPU each launch runs at once, so tokens are read right after
their step). Finished, stopped and cancelled streams leave at once and free their slots; no stream ever waits for
a batch to fill."""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable

from .api import Logprob, TokenLogprobs
from .errors import EngineBusyError, EngineClosedError, EngineError
from .kv import KVSlots
from .runner import Runner, Step
from .sequence import Stream

log = logging.getLogger("hybridserve.engine")


def pick_graph_bucket(bucket: int, graphs, max_pad_factor: float) -> int | None:
    """The bucket whose graph serves a prompt of this bucket: its own if warm, else the smallest warm bucket at
    most max_pad_factor times larger (a padded replay costs a few ms more than its own; the JIT path launches
    every kernel from Python), else None (JIT)."""
    if bucket in graphs:
        return bucket
    larger = [b for b in graphs if bucket < b <= bucket * max_pad_factor]
    return min(larger) if larger else None


def mixed_graph_bucket(bucket: int, batch: int, warm: set[tuple[int, int]], max_pad_factor: float) -> int | None:
    """The bucket of the warm mixed graph ((bucket, batch size) pairs) that carries a prompt of this bucket in a step
    of `batch` rows: as pick_graph_bucket among the buckets warm at that batch size; None: the prompt prefills alone."""
    return pick_graph_bucket(bucket, {b for b, n in warm if n == batch}, max_pad_factor)


def pick_batch_size(n: int, sizes: list[int], warm: set[int]) -> tuple[int, bool]:
    """(batch size, graph?) for a step of n rows: the smallest warm size >= n, else the smallest configured
    size >= n run by the JIT path."""
    w = [s for s in warm if s >= n]
    if w:
        return min(w), True
    return min(s for s in sizes if s >= n), False


def batch_cap(step_ms: dict[int, float], sizes: list[int], slo_ms: float | None) -> int:
    """The largest batch size whose measured step time stays under the TPOT objective (all sizes without one;
    at least the smallest size: one stream always runs)."""
    if slo_ms is None:
        return max(sizes)
    ok = [s for s in sizes if s in step_ms and step_ms[s] <= slo_ms]
    return max(ok) if ok else min(sizes)


def full_batch_step_ms(step_ms: dict[int, float], batch: int) -> float | None:
    """The decode step at `batch` rows from the measured table: its own entry; else the nearest larger measured size
    (an upper bound); else a line through the two largest measured sizes (a step is a weight read plus a cost per
    row), never below the largest; one size: proportional to the rows
    (an upper bound). None: nothing measured."""
    if batch in step_ms:
        return step_ms[batch]
    larger = [b for b in step_ms if b > batch]
    if larger:
        return step_ms[min(larger)]
    sizes = sorted(step_ms)
    if not sizes:
        return None
    k = sizes[-1]
    if len(sizes) == 1:
        return step_ms[k] * batch / k
    j = sizes[-2]
    slope = max(0.0, (step_ms[k] - step_ms[j]) / (k - j))
    return step_ms[k] + slope * (batch - k)


def full_batch_cost_ms(prefill_ms: float, tokens: int, step_ms: float, batch: int) -> float:
    """A request's share of a full-batch replica's time: its prefill (which stalls the batch) and its other tokens'
    decode steps at `batch` rows, each shared by the batch's rows."""
    return prefill_ms + max(0, tokens - 1) * step_ms / max(1, batch)


class Scheduler:
    def __init__(self, runner: Runner, kv: KVSlots, graphs, *, sizes: list[int], max_pad_factor: float,
                 max_waiting: int, tpot_slo_ms: float | None, spin_s: float, admit_window: float,
                 mixed_buckets: list[int], logprob: Callable[[int, float], Logprob],
                 on_jit: Callable[[tuple[str, int]], None], on_finish: Callable[[Stream], None]):
        self.runner, self.kv, self.graphs = runner, kv, graphs
        self.sizes, self.max_pad_factor, self.max_waiting = sizes, max_pad_factor, max_waiting
        self.tpot_slo_ms, self.spin_s, self.admit_window = tpot_slo_ms, spin_s, admit_window
        self.mixed_max_bucket = max(mixed_buckets, default=0)
        self._logprob, self._on_jit, self._on_finish = logprob, on_jit, on_finish
        self.ahead = runner.cuda            # queue step i+1 before reading step i's tokens
        self.step_ms: dict[int, float] = {}   # measured time per step by batch size (EWMA)
        self.mix_ms: dict[tuple[int, int], float] = {}   # mixed steps by (prompt bucket, batch size) (EWMA)
        self.mixed_steps = 0                  # decode steps that carried a prompt
        self._held: tuple[Stream, int, object] | None = None   # (prompt, batch size, graph) for the next step
        self.waiting: collections.deque[Stream] = collections.deque()
        self.running: list[Stream] = []
        self.peak_running = 0                 # the most streams run at once since start
        self._tasks: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self.idle = threading.Event()
        self.idle.set()
        self.closing = False
        self.last_step = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="hybridserve-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ from other threads
    def submit(self, st: Stream) -> None:
        with self._cv:
            if self.closing:
                raise EngineClosedError("the engine is shut down; send the request to another replica")
            if len(self.waiting) - max(0, self.cap - len(self.running)) >= self.max_waiting:   # beyond free slots
                raise EngineBusyError(f"the engine is full: {len(self.running)} streams running and "
                                      f"{len(self.waiting)} waiting (max_waiting); retry later or on another replica")
            self.waiting.append(st)
            self.idle.clear()
            self._cv.notify()

    def drop(self, st: Stream) -> None:
        """A caller gave up on st: if it is still waiting, it leaves now (never taking a slot); a running
        stream ends at its next step (its cancel event)."""
        with self._cv:
            if st not in self.waiting:
                return
            self.waiting.remove(st)
        st.finish("cancelled")
        self._retire(st)

    def call(self, fn: Callable[[], object]):
        """Run fn on the engine thread between iterations, once no stream runs; returns a Future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._tasks.append((fut, fn))
            self._cv.notify()
        return fut

    def close(self) -> None:
        with self._cv:
            self.closing = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    @property
    def cap(self) -> int:
        return min(self.kv.slots, batch_cap(self.step_ms, self.sizes, self.tpot_slo_ms))

    def full_batch_step_ms(self) -> float | None:
        """The decode step at the batch cap (the replica's full batch), from the measured steps."""
        return full_batch_step_ms(dict(self.step_ms), self.cap)

    def heartbeat_age_s(self) -> float:
        """Seconds since the loop last completed an iteration while work is in flight; 0.0 when idle."""
        return 0.0 if self.idle.is_set() else time.monotonic() - self.last_step

    # ------------------------------------------------------------ the loop
    def _wait_for_work(self) -> bool:
        """Block (after spinning spin_s) until a request, a task or close; False once closed with nothing left."""
        deadline = time.perf_counter() + self.spin_s
        while self.spin_s and not (self.waiting or self._tasks or self.closing):
            if time.perf_counter() >= deadline:
                break
            time.sleep(0)
        with self._cv:
            while not (self.waiting or self._tasks or self.closing):
                self._cv.wait()
        return not (self.closing and not self.waiting and not self._tasks)

    def _loop(self) -> None:
        pending: Step | None = None
        while True:
            if not self.running and pending is None:
                self._run_tasks()
                if self.closing:
                    self._fail_waiting()
                    return
                if not self.waiting:
                    self.idle.set()
                    if not self._wait_for_work():
                        return
                    continue
            try:
                pending = self._iterate(pending)
            except Exception as e:   # a device error fails the streams it hit, never the loop
                log.exception("engine step failed")
                pending = self._held = None
                for st in list(self.running):
                    self._retire(st, EngineError(f"the engine failed while running this request: {e!r}"))
            self.last_step = time.monotonic()

    def _iterate(self, pending: Step | None) -> Step | None:
        r = self.runner
        with r.ctx():
            admitted = self._admit()
            if self.ahead and pending is not None and self._held is None:
                admitted += self._admit_during(pending, len(admitted))
            held, self._held = self._held, None
            prompt = held[0] if held else None
            batch = [s for s in self.running if s.wants_more and s is not prompt]
            cur = None
            if held is not None:          # _admit made sure the batch is not empty and B is its size
                cur = r.launch_decode(batch, held[1], held[2], prompt)
                self.mixed_steps += 1
            elif batch:
                B, warm = pick_batch_size(len(batch), self.sizes, self.graphs.warm("decode") if self.graphs else set())
                graph = self.graphs.get(("decode", B)) if warm else None
                if graph is None and self.graphs is not None:
                    self._on_jit(("decode", B))
                cur = r.launch_decode(batch, B, graph)
            for s in batch:
                s.launched += 1
            if pending is not None:
                self._consume(pending)
            for j, st in enumerate(admitted):      # (ahead only: on CPU _admit read them already)
                self._consume_prefill(st, j)
            if not self.ahead and cur is not None:
                self._consume(cur)
                cur = None
        self.running = [s for s in self.running if not s.done]
        return cur

    def _admit_during(self, pending: Step, first_row: int) -> list[Stream]:
        """Ahead (CUDA): the GPU has just begun `pending` and the next step is not launched yet. For admit_window of
        pending's measured time, a request that arrives is admitted at once: its prefill then runs right after
        `pending` instead of after the next step as well. The rest of the step is the slack for the next launch."""
        ms = (self.mix_ms.get((pending.prompt.bucket, pending.size)) if pending.prompt is not None
              else self.step_ms.get(pending.size))
        if not ms or self.admit_window <= 0:
            return []
        deadline = time.perf_counter() + self.admit_window * ms / 1e3
        admitted: list[Stream] = []
        while True:
            with self._cv:
                while not (self.waiting or self.closing):
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        return admitted
                    self._cv.wait(left)
            got = self._admit(first_row + len(admitted))
            admitted += got
            if not got or self._held is not None:   # no slot / cap / closing, or a prompt for the next step: go now
                return admitted

    def _admit(self, first_row: int = 0) -> list[Stream]:
        """Prefill waiting requests into free slots, up to the batch cap; on CPU each one's first token is read
        at once (before any decode step includes it). first_row: the first read-back row free this iteration."""
        admitted = []
        cap = self.cap
        while (self._held is None and self.waiting and not self.closing and len(self.running) < cap
               and self.kv.free_count):
            with self._cv:
                st = self.waiting.popleft()
            if st.cancelled:
                st.finish("cancelled")
                self._retire(st)
                continue
            st.slot = self.kv.alloc()
            self.running.append(st)             # from here a failure below fails this stream too
            self.peak_running = max(self.peak_running, len(self.running))
            last = not self.waiting or len(self.running) >= cap or not self.kv.free_count
            if last and self._hold(st):     # the last prompt admitted now rides in the next decode step
                break
            graph_bucket = None
            if self.graphs is not None:
                graph_bucket = pick_graph_bucket(st.bucket, self.graphs.warm("prefill"), self.max_pad_factor)
            graph = self.graphs.get(("prefill", graph_bucket)) if graph_bucket is not None else None
            path = self._path(st, graph, graph_bucket)
            st.start(st.slot, path, graph_bucket)
            j = first_row + len(admitted) if self.ahead else 0     # its read-back row (CPU: read at once, row 0)
            self.runner.launch_prefill(st, j, graph)
            if path != "graph" and self.graphs is not None:
                self._on_jit(("prefill", st.bucket))
            if st.params.prompt_logprobs is not None:
                st.prompt_lps = self._prompt_logprobs(st)
            admitted.append(st)
            if not self.ahead:
                self._consume_prefill(st, j)
        return admitted if self.ahead else []

    def _hold(self, st: Stream) -> bool:
        """Whether st's prompt rides in the next decode step (sets _held): other streams will decode in it, its
        bucket rides (mixed_buckets; no prompt logprobs, which need a pass of their own), and on CUDA the graph for
        its bucket (or a larger warm one, as for a prefill) at that step's batch size is warm; else that graph is
        asked for in the background and st prefills alone."""
        n = sum(1 for s in self.running if s.wants_more and s is not st)
        if not n or st.bucket > self.mixed_max_bucket or st.params.prompt_logprobs is not None:
            return False
        B, _ = pick_batch_size(n, self.sizes, self.graphs.warm("decode") if self.graphs else set())
        graph = graph_bucket = None
        if self.graphs is not None:
            graph_bucket = mixed_graph_bucket(st.bucket, B, self.graphs.warm("mixed"), self.max_pad_factor)
            if graph_bucket is None:
                self._on_jit(("mixed", st.bucket, B))
                return False
            graph = self.graphs.get(("mixed", graph_bucket, B))
        st.start(st.slot, self._path(st, graph, graph_bucket), graph_bucket)
        st.metrics.mixed = True
        st.metrics.rode_s = (full_batch_step_ms(self.step_ms, B) or 0.0) / 1e3
        self._held = (st, B, graph)
        return True

    def _path(self, st: Stream, graph, graph_bucket: int | None) -> str:
        """How st's prompt pass runs: its bucket's graph, a larger bucket's ("padded"), else JIT (CUDA) or eager."""
        if graph is not None:
            return "graph" if graph_bucket == st.bucket else "padded"
        return "jit" if self.runner.cuda else "eager"

    def _consume_prefill(self, st: Stream, j: int) -> None:
        t, lp = self.runner.read_prefill(j, st.params.logprobs)
        self._accept(st, t, self._token_lps(t, lp, st.params.logprobs))

    def _consume(self, step: Step) -> None:
        toks, vals, ids, dt = self.runner.read_decode(step)
        ms, key = (self.step_ms, step.size) if step.prompt is None else (self.mix_ms, (step.prompt.bucket, step.size))
        ms[key] = dt if key not in ms else 0.9 * ms[key] + 0.1 * dt
        if step.prompt is not None and not step.prompt.done:
            self._consume_prefill(step.prompt, step.row)
        for i, st in enumerate(step.streams):
            if st.done:
                continue
            k = st.params.logprobs
            lp = self._token_lps(toks[i], (vals[i], ids[i]) if k is not None else None, k)
            self._accept(st, toks[i], lp)

    def _accept(self, st: Stream, t: int, lp: TokenLogprobs | None) -> None:
        st.accept(t, lp)
        if st.done:
            self._retire(st)

    def _token_lps(self, t: int, lp, k: int | None) -> TokenLogprobs | None:
        if k is None or lp is None:
            return None
        vals, ids = lp
        one = self._logprob
        return TokenLogprobs(one(t, vals[0]), [one(i, v) for i, v in zip(ids[:k], vals[1:k + 1])])

    def _prompt_logprobs(self, st: Stream) -> list[TokenLogprobs]:
        """Each prompt token's logprob given the tokens before it, with the k likeliest there (an eager pass over
        the prompt padded to its bucket, as the JIT prefill runs; one sync)."""
        r, k, n = self.runner, st.params.prompt_logprobs, len(st.ids)
        chosen, vals, idx = r.model.prompt_logprobs(r.ids[:st.bucket], r.positions[:st.bucket], r.slot, k, n)
        chosen, vals, idx = chosen.tolist(), vals.tolist(), idx.tolist()
        one = self._logprob
        out = [TokenLogprobs(one(st.ids[0], None), [])]
        for i in range(n - 1):
            out.append(TokenLogprobs(one(st.ids[i + 1], chosen[i]), [one(t, v) for t, v in zip(idx[i], vals[i])]))
        return out

    def _retire(self, st: Stream, error: BaseException | None = None) -> None:
        if st.slot >= 0:
            self.kv.free(st.slot)
            st.slot = -1
        st.done = True
        if st in self.running:
            self.running.remove(st)
        self._on_finish(st)
        if st.future.cancelled():               # its caller gave up (asyncio cancels the wrapped future)
            return
        if error is not None:
            st.future.set_exception(error)
        else:
            st.future.set_result(st.result())

    def _fail_waiting(self) -> None:
        with self._cv:
            left, self.waiting = list(self.waiting), collections.deque()
        for st in left:
            self._retire(st, EngineClosedError("the engine shut down before this request ran; retry it"))

    def _run_tasks(self) -> None:
        while self._tasks:
            fut, fn = self._tasks.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:   # noqa: BLE001 - the caller gets it through the future
                fut.set_exception(e)
