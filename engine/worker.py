"""The engine's one worker thread: a single-worker executor whose thread polls for the next request a
while before it sleeps.

Waking a thread that sleeps on a lock cost ~0.33 ms per request on the lent H100 machine (a VM):
bench/ttft_breakdown.py, 10-token prompt, 2026-11-27: TTFT 6.13 ms through the engine thread, 5.80 ms
for the same request run on the caller's thread, prefill graph 5.63 ms. So after each task the thread
polls its queue for ``spin_s`` seconds, calling time.sleep(0) between polls (the GIL goes to the other
threads at every poll), and only then blocks. It busies one CPU core while it polls.
"""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable


class EngineThread:
    """submit(fn, *args) -> Future, run in order on one thread (ThreadPoolExecutor(1)'s contract: a
    future cancelled while queued never runs; shutdown(wait=True) runs what is queued, then joins)."""

    def __init__(self, spin_s: float = 0.0, name: str = "hybridserve-engine"):
        self.spin_s = spin_s
        self._q: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._shutdown = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args) -> Future:
        f: Future = Future()
        with self._cv:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._q.append((f, fn, args))
            self._cv.notify()
        return f

    def shutdown(self, wait: bool = True) -> None:
        with self._cv:
            self._shutdown = True
            self._cv.notify()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def _next(self):
        """The next task, or None once shut down with nothing queued."""
        deadline = time.perf_counter() + self.spin_s
        while self.spin_s:
            try:
                return self._q.popleft()            # deque ops are atomic: no lock while polling
            except IndexError:
                pass
            if self._shutdown or time.perf_counter() >= deadline:
                break
            time.sleep(0)
        with self._cv:
            while not self._q and not self._shutdown:
                self._cv.wait()
            return self._q.popleft() if self._q else None

    def _loop(self) -> None:
        while (item := self._next()) is not None:
            f, fn, args = item
            if not f.set_running_or_notify_cancel():
                continue
            try:
                r = fn(*args)
            except BaseException as e:   # noqa: BLE001 - the caller gets it through the future
                f.set_exception(e)
            else:
                f.set_result(r)
            del f, fn, args, item
