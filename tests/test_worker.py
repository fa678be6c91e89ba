"""engine.worker.EngineThread: the engine's one worker thread (ThreadPoolExecutor(1)'s contract, plus a
poll of its queue for spin_s after each task instead of sleeping on a lock at once)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest

from engine.worker import EngineThread


def test_runs_in_order_and_returns_results_and_errors():
    t = EngineThread()
    seen = []
    futs = [t.submit(seen.append, i) for i in range(20)]
    bad = t.submit(lambda: 1 / 0)
    assert [f.result(5) for f in futs] == [None] * 20 and seen == list(range(20))
    with pytest.raises(ZeroDivisionError):
        bad.result(5)
    t.shutdown()


def test_cancelled_while_queued_never_runs_and_shutdown_runs_the_queue():
    t = EngineThread()
    gate = threading.Event()
    ran = []
    first = t.submit(gate.wait, 5)
    skipped = t.submit(ran.append, "cancelled")
    later = t.submit(ran.append, "queued")
    assert skipped.cancel()
    gate.set()
    t.shutdown(wait=True)              # runs what is still queued, then the thread ends
    assert first.result(1) is True and later.done() and ran == ["queued"]
    assert not t._thread.is_alive()
    with pytest.raises(RuntimeError, match="after shutdown"):
        t.submit(print)


@pytest.mark.parametrize("spin_s", [0.0, 5.0])
def test_polls_its_queue_while_spinning(spin_s):
    """A task put on the queue without waking the thread runs only while the thread polls (spin_s > 0):
    the spin is what lets a request start without a thread wake-up."""
    t = EngineThread(spin_s=spin_s)
    t.submit(lambda: None).result(5)
    f: Future = Future()
    t._q.append((f, lambda: "ran", ()))             # no notify: only a polling thread sees it
    try:
        ran_while_polling = f.result(0.5) == "ran"
    except TimeoutError:
        ran_while_polling = False
    assert ran_while_polling == (spin_s > 0)
    t.shutdown()                                     # notifies: the task runs now either way
    assert f.result(5) == "ran"


def test_the_spin_ends_and_the_thread_sleeps():
    t = EngineThread(spin_s=0.05)
    t.submit(lambda: None).result(5)
    time.sleep(0.3)
    start = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - start < 0.1, "the worker still polls after spin_s"
    t.shutdown()
