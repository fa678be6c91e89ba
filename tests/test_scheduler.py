"""The scheduler's pure choices (decode batch size, batch cap, the mixed graph a prompt rides in) and its engine
thread's spin-then-sleep wait and admission window."""
from __future__ import annotations

import concurrent.futures
import time

import pytest

from engine import EngineConfig, HybridEngine, SamplingParams
from engine.scheduler import batch_cap, full_batch_cost_ms, full_batch_step_ms, mixed_graph_bucket, pick_batch_size
from engine.sequence import Stream


def test_pick_batch_size_prefers_the_smallest_warm_size_then_jit():
    sizes = [1, 2, 4, 8, 16, 32]
    assert pick_batch_size(3, sizes, {1, 2, 4, 8, 16, 32}) == (4, True)
    assert pick_batch_size(3, sizes, {1, 8}) == (8, True)           # a larger warm graph beats the JIT path
    assert pick_batch_size(9, sizes, {1, 8}) == (16, False)         # none warm >= 9: JIT at the next size
    assert pick_batch_size(1, sizes, set()) == (1, False)


def test_a_prompt_rides_in_a_warm_mixed_graph_of_its_step_size_or_prefills_alone():
    warm = {(64, 8), (128, 8), (64, 4), (512, 8)}
    assert mixed_graph_bucket(64, 8, warm, 4.0) == 64                  # its own bucket at this batch size
    assert mixed_graph_bucket(32, 8, warm, 4.0) == 64                  # a larger warm bucket (padded)
    assert mixed_graph_bucket(128, 4, warm, 4.0) is None               # warm only at another batch size
    assert mixed_graph_bucket(256, 8, warm, 4.0) == 512
    assert mixed_graph_bucket(256, 8, warm, 1.5) is None               # padding beyond max_pad_factor
    assert mixed_graph_bucket(16, 2, set(), 4.0) is None


def test_batch_cap_is_the_largest_size_under_the_tpot_objective():
    sizes = [1, 2, 4, 8]
    step = {1: 3.5, 2: 4.6, 4: 5.0, 8: 5.7}
    assert batch_cap(step, sizes, None) == 8
    assert batch_cap(step, sizes, 5.0) == 4
    assert batch_cap(step, sizes, 1.0) == 1                          # one stream always runs
    assert batch_cap({1: 3.5}, sizes, 4.0) == 1                      # unmeasured sizes do not count


def test_full_batch_step_from_the_measured_steps():
    h200 = {1: 3.6545, 2: 4.2484, 4: 4.6082, 8: 5.3258, 16: 6.7604, 32: 9.5612}
    assert full_batch_step_ms(h200, 32) == 9.5612                      # measured
    assert full_batch_step_ms({1: 3.6, 8: 5.3, 32: 9.6}, 16) == 9.6     # not measured: the nearest larger
    # only small batches measured (a replica at low load): the line through the two largest
    assert full_batch_step_ms({1: 3.6545, 2: 4.2484, 4: 4.6082}, 32) == pytest.approx(4.6082 + 0.1799 * 28)
    assert full_batch_step_ms({4: 5.0, 8: 4.0}, 32) == 4.0              # never below the largest measured
    assert full_batch_step_ms({2: 4.0}, 32) == 64.0                     # one size: proportional (an upper bound)
    assert full_batch_step_ms({}, 32) is None
    # a request's share of a full batch: 12 ms prefill + 31 steps of 9.6 ms shared by 32 rows
    assert full_batch_cost_ms(12.0, 32, 9.6, 32) == pytest.approx(12.0 + 31 * 0.3)
    assert full_batch_cost_ms(12.0, 32, 3.6, 1) == pytest.approx(12.0 + 31 * 3.6)   # batch 1: its service time
    assert full_batch_cost_ms(12.0, 1, 9.6, 32) == 12.0


def test_the_engine_measures_its_full_batch_at_start():
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu", buckets=[16, 32], max_context=64, max_batch=4))
    st = eng.stats()
    assert set(st["step_ms"]) == {4} and st["full_batch_step_ms"] == pytest.approx(st["step_ms"][4], abs=1e-3)
    assert eng.full_batch_step_ms() == eng.scheduler.step_ms[4]
    eng.shutdown()


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


def test_a_request_arriving_during_a_step_is_admitted_before_the_next_step_is_queued():
    """Ahead (the CUDA loop, forced here on CPU): for admit_window of the running step's measured time the next step
    is not queued yet, and a request that arrives then is admitted (its prefill queued) at once, not at the window's
    end. With a step measured at 2 s the window is ~1.8 s: the running stream's tokens come that far apart, and the
    newcomer leaves the queue within milliseconds (its first token is read once the next step is queued). (Its
    prompt prefills alone here: a prompt riding in the next step ends the window, the test after this one.)"""
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu", buckets=[16], max_context=64, max_batch=4,
                                    mixed_prefill=False))
    s = eng.scheduler
    s.ahead, s.admit_window = True, 0.9
    s.step_ms.update({b: 2000.0 for b in eng.batch_sizes})
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(eng.generate, [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
        time.sleep(0.5)                                               # inside the first stream's first window
        second = eng.generate([4, 5], SamplingParams(max_tokens=1, ignore_eos=True))
        a = first.result(30)
    held = a.metrics.e2e_s - a.metrics.ttft_s                         # its 3 later tokens, a window before each
    assert len(a.token_ids) == 4 and held > 3.0, a.metrics            # the window held the next step back
    assert len(second.token_ids) == 1 and second.metrics.queue_s < 0.2, second.metrics   # admitted on arrival
    assert second.metrics.ttft_s > 0.5                                # read after the window, with the next step
    eng.shutdown()


def test_a_prompt_arriving_during_the_window_rides_in_the_next_step_which_goes_at_once():
    """Ahead, with mixed steps: a request arriving in the window of a step measured at 2 s is admitted at once and
    its prompt rides in the next decode step, which is queued right then (the window ends): its first token comes
    within milliseconds instead of after the ~1.8 s window, from a mixed step."""
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu", buckets=[16], max_context=64, max_batch=4))
    s = eng.scheduler
    s.ahead, s.admit_window = True, 0.9
    s.step_ms.update({b: 2000.0 for b in eng.batch_sizes})
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(eng.generate, [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
        time.sleep(0.5)
        second = eng.generate([4, 5], SamplingParams(max_tokens=1, ignore_eos=True))
        a = first.result(30)
    assert second.metrics.mixed and eng.stats()["mixed_steps"] == 1, second.metrics
    assert second.metrics.queue_s < 0.2 and second.metrics.ttft_s < 0.3, second.metrics
    assert len(a.token_ids) == 4
    eng.shutdown()
