"""Continuous batching through the public API (generate, generate_async, stream) on CPU: requests that share
decode steps get exactly the tokens they get alone (and HF's greedy tokens), seeded sampling does not depend on
company, random arrivals and cancellations never leak a slot or hang, and concurrency pays."""
from __future__ import annotations

import asyncio
import dataclasses
import random
import time

import pytest
import torch

from engine import EngineBusyError, EngineConfig, HybridEngine, SamplingParams

BUCKETS = [16, 32, 64]
LENGTHS = [3, 9, 16, 17, 25, 33, 40, 60]          # across bucket edges; K = 8 streams


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=0)
    return out[0, len(ids):].tolist()


def gather(eng: HybridEngine, prompts, params) -> list:
    async def main():
        return await asyncio.gather(*[eng.generate_async(p, params[i] if isinstance(params, list) else params)
                                      for i, p in enumerate(prompts)])
    return asyncio.run(main())


@pytest.mark.parametrize("variant", ["mha", "llama3-rope", "tied"])
def test_eight_streams_together_give_their_tokens_alone_and_hf_greedy(checkpoints, variant):
    from transformers import LlamaForCausalLM

    path = checkpoints[variant]
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eng = HybridEngine.from_pretrained(str(path), device="cpu", dtype="float32", buckets=BUCKETS, max_context=128,
                                       max_batch=8)
    g = random.Random(len(variant))
    prompts = [[1] + [g.randrange(3, 384) for _ in range(n - 1)] for n in LENGTHS]
    p = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    peak = []
    eng.add_listener(lambda e: peak.append(eng.stats()["running"]) if e["type"] == "request" else None)
    together = gather(eng, prompts, p)
    assert max(peak) > 1                                   # they really shared steps
    alone = [eng.generate(x, p).token_ids for x in prompts]
    assert [r.token_ids for r in together] == alone
    assert alone == [hf_greedy(hf, x, 10) for x in prompts]
    eng.shutdown()


def test_seeded_sampling_is_the_same_alone_and_in_company():
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu", buckets=BUCKETS, max_context=128, max_batch=8))
    prompts = [[1] + list(range(5, 5 + n)) for n in LENGTHS]
    ps = [SamplingParams(max_tokens=12, temperature=0.8 + 0.05 * i, top_p=0.9 if i % 2 else 1.0, top_k=20 * (i % 3),
                         seed=100 + i, ignore_eos=True, frequency_penalty=0.5 if i == 3 else 0.0,
                         logit_bias={7: 3.0} if i == 5 else {}) for i in range(len(prompts))]
    alone = [eng.generate(x, ps[i]).token_ids for i, x in enumerate(prompts)]
    together = [r.token_ids for r in gather(eng, prompts, ps)]
    assert together == alone
    other = gather(eng, prompts[:3] + [[1, 2, 3]] * 5, ps[:3] + [SamplingParams(max_tokens=30, seed=9)] * 5)
    assert [r.token_ids for r in other[:3]] == alone[:3]    # different company, same draws
    reseeded = eng.generate(prompts[0], SamplingParams(max_tokens=12, temperature=0.8, seed=1, ignore_eos=True))
    assert reseeded.token_ids != alone[0]
    eng.shutdown()


def test_random_arrivals_and_cancellations_end_cleanly_and_free_every_slot():
    """200 requests arriving at random times with max_batch 4: some streamed and closed early, some cancelled
    while waiting or running; every one completes or is cancelled, and all slots are free at the end."""
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu", buckets=BUCKETS, max_context=128, max_batch=4,
                                    max_waiting=400))
    rnd = random.Random(0)

    async def one(i: int):
        await asyncio.sleep(rnd.random() * 2.0)
        ids = [1] + [rnd.randrange(3, 250) for _ in range(rnd.randrange(1, 60))]
        p = SamplingParams(max_tokens=rnd.randrange(1, 24), temperature=rnd.choice([0, 0.9]), seed=i)
        kind = i % 4
        if kind == 0:                                   # streamed, closed after a couple of chunks
            agen = eng.stream(ids, p)
            async for c in agen:
                if c.index >= 1:
                    break
            await agen.aclose()
            return "closed"
        task = asyncio.ensure_future(eng.generate_async(ids, p))
        if kind == 1:                                   # cancelled after a random while (waiting or running)
            await asyncio.sleep(rnd.random() * 0.05)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return "cancelled"
        res = await task
        assert res.finish_reason in ("length", "stop", "cancelled") and len(res.token_ids) <= p.max_tokens
        return res.finish_reason

    async def main():
        return await asyncio.wait_for(asyncio.gather(*[one(i) for i in range(200)]), 300)

    out = asyncio.run(main())
    assert len(out) == 200 and {"closed", "length"} <= set(out)
    deadline = time.monotonic() + 10
    while eng.in_flight() and time.monotonic() < deadline:   # closed streams end at their next step
        time.sleep(0.01)
    st = eng.stats()
    assert eng.in_flight() == 0 and st["running"] == 0 and st["waiting"] == 0
    assert eng.kv.free_count == 4 and st["free_slots"] == 4
    assert len(eng.generate([1, 5, 6], SamplingParams(max_tokens=3, ignore_eos=True)).token_ids) == 3
    eng.shutdown()


def test_concurrent_requests_finish_faster_than_one_after_another():
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu", buckets=BUCKETS, max_context=256, max_batch=8))
    prompts = [[1] + list(range(5, 5 + n)) for n in LENGTHS]
    p = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    gather(eng, prompts, p)                                  # warm
    seq, conc = [], []
    for _ in range(3):                                       # interleaved, the best of three each (a shared CPU)
        t0 = time.perf_counter()
        for x in prompts:
            eng.generate(x, p)
        seq.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        gather(eng, prompts, p)
        conc.append(time.perf_counter() - t0)
    ratio = min(seq) / min(conc)
    print(f"8 requests x 64 tokens: one after another {min(seq):.3f} s, together {min(conc):.3f} s ({ratio:.2f}x)")
    assert ratio > 1.3
    eng.shutdown()


def test_full_engine_refuses_with_busy_and_tpot_objective_caps_the_batch():
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu", buckets=BUCKETS, max_context=128, max_batch=2,
                                    max_waiting=1))
    long = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)

    async def main():
        running = [asyncio.ensure_future(eng.generate_async([1, 2, 3], long)) for _ in range(3)]   # 2 run, 1 waits
        while eng.stats()["waiting"] < 1:
            await asyncio.sleep(0.001)
        with pytest.raises(EngineBusyError, match="full"):
            await eng.generate_async([1, 2], long)
        return await asyncio.gather(*running)

    assert [len(r.token_ids) for r in asyncio.run(main())] == [100] * 3
    eng.shutdown()
    capped = HybridEngine(EngineConfig(model="tiny", device="cpu", buckets=BUCKETS, max_context=128, max_batch=4,
                                       tpot_slo_ms=1e-6))
    st = capped.stats()
    assert st["max_batch"] == 1 and st["slots"] == 4 and set(st["step_ms"]) == {1, 2, 4}
    peak = []
    capped.add_listener(lambda e: peak.append(capped.stats()["running"]) if e["type"] == "request" else None)
    gather(capped, [[1, 2, 3]] * 4, SamplingParams(max_tokens=5, ignore_eos=True))
    assert max(peak) <= 1                                    # the objective holds the batch at one stream
    capped.shutdown()


def test_logprobs_without_alternatives_alone_and_in_a_batch():
    """logprobs=0 (OpenAI chat's logprobs without top_logprobs): each token's own logprob, no alternatives, the
    same alone and beside streams that ask for 5."""
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu", buckets=BUCKETS, max_context=128, max_batch=4))
    p0 = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    alone = eng.generate([1, 5, 6], p0)
    mixed = gather(eng, [[1, 5, 6], [1, 9, 9, 9]], [p0, SamplingParams(max_tokens=9, logprobs=5, seed=1)])
    assert [x.top for x in alone.logprobs] == [[]] * 6 and all(x.chosen.logprob < 0 for x in alone.logprobs)
    assert mixed[0].token_ids == alone.token_ids and all(len(x.top) == 5 for x in mixed[1].logprobs)
    assert [x.chosen.logprob for x in mixed[0].logprobs] == pytest.approx([x.chosen.logprob for x in alone.logprobs])
    eng.shutdown()


def test_max_batch_one_runs_one_stream_at_a_time():
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu", buckets=BUCKETS, max_context=128, max_batch=1))
    assert eng.batch_sizes == [1] and eng.stats()["slots"] == 1
    peak = []
    eng.add_listener(lambda e: peak.append(eng.stats()["running"]) if e["type"] == "request" else None)
    res = gather(eng, [[1, 2, 3]] * 3, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert len({tuple(r.token_ids) for r in res}) == 1 and max(peak) <= 1
    q = sorted(res, key=lambda r: r.metrics.queue_s)       # each waited for the one before it to finish
    for a, b in zip(q, q[1:]):
        assert b.metrics.queue_s >= a.metrics.e2e_s - a.metrics.queue_s
    eng.shutdown()


def queued_together(eng: HybridEngine, reqs) -> list:
    """generate_async of every (prompt, params), all queued while the engine thread is held, so one iteration admits
    them in order."""
    import threading

    async def main():
        gate = threading.Event()
        eng.scheduler.call(lambda: gate.wait(30))
        tasks = [asyncio.ensure_future(eng.generate_async(ids, p)) for ids, p in reqs]
        while len(eng.scheduler.waiting) < len(reqs):
            await asyncio.sleep(0.001)
        gate.set()
        return await asyncio.gather(*tasks)
    return asyncio.run(main())


def test_the_last_prompt_admitted_rides_in_the_decode_step_and_gets_its_tokens_alone(checkpoints):
    """Mixed steps: of 4 requests admitted together the first 3 prefill alone and the 4th rides in the first decode
    step of the other 3 (one pass over its prompt's rows and their rows). Every request gets the greedy tokens and
    (closely) the logprobs it gets alone without mixing. Prompts that do not ride: one over mixed_max_bucket, one
    asking prompt logprobs (a pass of its own), and any under batch_invariant."""
    path = str(checkpoints["mha"])
    kw = dict(device="cpu", dtype="float32", buckets=BUCKETS, max_context=128, max_batch=8, mixed_max_bucket=32)
    eng = HybridEngine.from_pretrained(path, **kw)
    solo = HybridEngine.from_pretrained(path, **kw, mixed_prefill=False)
    g = random.Random(5)
    prompts = [[1] + [g.randrange(3, 384) for _ in range(n - 1)] for n in (9, 40, 17, 25)]
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    alone = [solo.generate(x, p) for x in prompts]
    res = queued_together(eng, [(x, p) for x in prompts])
    assert [r.metrics.mixed for r in res] == [False] * 3 + [True] and eng.stats()["mixed_steps"] == 1
    assert {r.metrics.path for r in res} == {"eager"}
    assert [r.token_ids for r in res] == [a.token_ids for a in alone]
    for r, a in zip(res, alone):
        assert max(abs(x.chosen.logprob - y.chosen.logprob) for x, y in zip(r.logprobs, a.logprobs)) < 1e-4
    m = res[3].metrics                       # its cost at full batch leaves out the step the batch ran anyway
    assert m.rode_s > 0 and res[0].metrics.rode_s == 0
    whole = eng.full_batch_cost_ms(dataclasses.replace(m, rode_s=0.0), 8)
    assert eng.full_batch_cost_ms(m, 8) == pytest.approx(whole - min(m.rode_s, m.ttft_s - m.queue_s) * 1e3)
    long_prompt = [1] + list(range(5, 45))                           # 41 tokens: bucket 64 > mixed_max_bucket
    scored = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=1)
    res = queued_together(eng, [(prompts[0], p), (long_prompt, p), (prompts[1], p), (prompts[2], scored)])
    assert not any(r.metrics.mixed for r in res) and eng.stats()["mixed_steps"] == 1
    assert res[1].token_ids == solo.generate(long_prompt, p).token_ids
    assert res[3].prompt_logprobs is not None and len(res[3].prompt_logprobs) == len(prompts[2])
    inv = HybridEngine.from_pretrained(path, **kw, batch_invariant=True)
    res = queued_together(inv, [(x, p) for x in prompts])
    assert not any(r.metrics.mixed for r in res) and inv.stats()["mixed_steps"] == 0
    for e in (eng, solo, inv):
        e.shutdown()


def test_a_failing_mixed_step_fails_its_streams_with_a_clear_error_and_the_engine_serves_on(monkeypatch):
    """A device error inside a step carrying a prompt fails that prompt and the streams decoding beside it with an
    EngineError that says so (never a hang), frees every slot, and the next requests run normally."""
    from engine import EngineError

    eng = HybridEngine(EngineConfig(model="tiny", device="cpu", buckets=BUCKETS, max_context=128, max_batch=8))
    real, calls = eng.runner.mixed_fn, []

    def failing(L, B):
        calls.append((L, B))
        if len(calls) == 1:
            raise RuntimeError("injected device fault")
        return real(L, B)

    monkeypatch.setattr(eng.runner, "mixed_fn", failing)
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    async def main():
        import threading
        gate = threading.Event()
        eng.scheduler.call(lambda: gate.wait(30))
        tasks = [asyncio.ensure_future(eng.generate_async([1, 5 + i, 9], p)) for i in range(3)]
        while len(eng.scheduler.waiting) < 3:
            await asyncio.sleep(0.001)
        gate.set()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    res = asyncio.run(main())
    assert calls == [(16, 2)] and all(isinstance(r, EngineError) for r in res), res
    assert all("failed while running this request" in str(r) and "injected device fault" in str(r) for r in res)
    assert eng.kv.free_count == eng.max_batch and eng.stats()["running"] == 0
    again = queued_together(eng, [([1, 5 + i, 9], p) for i in range(3)])
    assert [len(r.token_ids) for r in again] == [6, 6, 6] and [r.metrics.mixed for r in again] == [False, False, True]
    eng.shutdown()
