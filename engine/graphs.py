"""CUDA graphs: capture on one background thread, replay on the engine thread.

Keys are ("prefill", bucket), ("decode", batch size) and ("mixed", bucket, batch size) (a prompt riding in a decode
step). All graphs share one memory pool and are captured
largest first. A key asked for while serving (a shape that just ran by the JIT path) is captured in an idle gap:
capture and its warm-up slow the serving stream, so they wait until no stream runs."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import torch

from .errors import EngineClosedError, EngineStartError

log = logging.getLogger("hybridserve.engine")
Key = tuple  # (kind, size) or (kind, bucket, batch size)


def _size(key: Key):
    """What a key names within its kind: its size, or (bucket, batch size)."""
    return key[1] if len(key) == 2 else key[1:]


class GraphCache:
    def __init__(self, device: torch.device, run: Callable[[Key], None], idle: threading.Event,
                 on_capture: Callable[[Key, float], None]):
        self.run, self.idle, self.on_capture = run, idle, on_capture
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[Key, torch.cuda.CUDAGraph] = {}
        self.costs: dict[Key, float] = {}
        self.compile_s: float | None = None
        self._pending: set[Key] = set()
        self._lock = threading.Lock()
        self._q: queue.Queue[Key | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, warm_up: Callable[[], None]) -> None:
        """Start the capture thread: warm_up() first (every kernel compiled once, on this thread's stream)."""
        self._thread = threading.Thread(target=self._loop, args=(warm_up,), name="hybridserve-capture", daemon=True)
        self._thread.start()

    def get(self, key: Key) -> torch.cuda.CUDAGraph | None:
        return self.graphs.get(key)

    def warm(self, kind: str) -> set:
        with self._lock:
            return {_size(k) for k in self.graphs if k[0] == kind}

    def pending(self, kind: str) -> set:
        with self._lock:
            return {_size(k) for k in self._pending if k[0] == kind}

    def cost_ms(self, kind: str) -> dict:
        with self._lock:
            return {_size(k): round(c * 1e3, 3) for k, c in self.costs.items() if k[0] == kind}

    def capture(self, keys: list[Key], wait: bool = True) -> None:
        """Queue these keys for capture (each once); wait: until they are captured (start-up)."""
        todo = []
        with self._lock:
            for k in keys:
                if k not in self.graphs and k not in self._pending:
                    self._pending.add(k)
                    todo.append(k)
        for k in todo:
            self._q.put(k)
        if not wait:
            return
        while any(k in self._pending for k in todo) or self.compile_s is None:
            if self._error is not None:
                raise EngineStartError(f"the engine's start-up compile failed: {self._error!r}; "
                                       "see the log for the kernel's error") from self._error
            if self._thread is None or not self._thread.is_alive():
                raise EngineClosedError("the engine is shut down: no graph can be captured")
            time.sleep(0.005)

    def pool_bytes(self) -> int:
        """Bytes of the segments that belong to the graphs' shared memory pool."""
        pool = tuple(self.pool)
        return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
                   if tuple(seg.get("segment_pool_id", ())) == pool)

    def close(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=30)

    def _loop(self, warm_up: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        try:
            with torch.cuda.stream(self.stream), torch.inference_mode():
                warm_up()
            self.stream.synchronize()
        except BaseException as e:      # start-up fails with this error (capture() raises it), never hangs
            self._error = e
            log.exception("start-up warm-up (kernel compile) failed")
            return
        self.compile_s = time.perf_counter() - t0
        while (key := self._q.get()) is not None:
            self.idle.wait()
            t0 = time.perf_counter()
            try:
                g = torch.cuda.CUDAGraph()
                # thread_local: the serving thread may keep launching work while this records
                with torch.inference_mode(), torch.cuda.graph(g, pool=self.pool, stream=self.stream,
                                                              capture_error_mode="thread_local"):
                    self.run(key)
                dt = time.perf_counter() - t0
                with self._lock:
                    self.graphs[key] = g
                    self.costs[key] = dt
                log.info("captured %s %s graph in %.1f ms", key[0], _size(key), dt * 1e3)
                self.on_capture(key, dt)
            except Exception:  # a failed capture leaves the key on the JIT path
                log.exception("capture of %s %s failed; it stays on the JIT path", key[0], _size(key))
            finally:
                with self._lock:
                    self._pending.discard(key)
