"""The scheduler's pure choices (decode batch size, batch cap) and its engine thread's spin-then-sleep wait."""
from __future__ import annotations

import concurrent.futures
import time

import pytest

from engine import EngineConfig, HybridEngine, SamplingParams
from engine.scheduler import batch_cap, pick_batch_size
from engine.sequence import Stream


def test_pick_batch_size_prefers_the_smallest_warm_size_then_jit():
    sizes = [1, 2, 4, 8, 16, 32]
    assert pick_batch_size(3, sizes, {1, 2, 4, 8, 16, 32}) == (4, True)
    assert pick_batch_size(3, sizes, {1, 8}) == (8, True)           # a larger warm graph beats the JIT path
    assert pick_batch_size(9, sizes, {1, 8}) == (16, False)         # none warm >= 9: JIT at the next size
    assert pick_batch_size(1, sizes, set()) == (1, False)


def test_batch_cap_is_the_largest_size_under_the_tpot_objective():
    sizes = [1, 2, 4, 8]
    step = {1: 3.5, 2: 4.6, 4: 5.0, 8: 5.7}
    assert batch_cap(step, sizes, None) == 8
    assert batch_cap(step, sizes, 5.0) == 4
    assert batch_cap(step, sizes, 1.0) == 1                          # one stream always runs
    assert batch_cap({1: 3.5}, sizes, 4.0) == 1                      # unmeasured sizes do not count


def _unnotified(eng: HybridEngine) -> Stream:
    """A request put in the waiting queue without waking the engine thread: only a polling thread sees it."""
    req = eng._request([1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True))
    st = Stream(list(req.ids), req.bucket, req.params, eng.tokenizer, None, None, time.perf_counter())
    eng._in_flight += 1
    eng.scheduler.waiting.append(st)
    return st


@pytest.mark.parametrize("spin_s", [0.0, 5.0])
def test_the_engine_thread_polls_for_work_while_it_spins(spin_s):
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu", buckets=[16], max_context=64))
    eng.scheduler.spin_s = spin_s
    eng.generate([1, 2], SamplingParams(max_tokens=2))                # then the thread waits for work
    st = _unnotified(eng)
    try:
        ran = len(st.future.result(1.0).token_ids) == 2
    except concurrent.futures.TimeoutError:
        ran = False
    assert ran == (spin_s > 0)
    eng.shutdown()                                                    # wakes the thread: it fails or ran
    assert st.future.done()


def test_after_the_spin_the_engine_thread_sleeps():
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu", buckets=[16], max_context=64))
    eng.scheduler.spin_s = 0.05
    eng.generate([1, 2], SamplingParams(max_tokens=2))
    time.sleep(0.3)
    start = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - start < 0.1, "the engine thread still polls after spin_s"
    eng.shutdown()
