"""GPU-only checks of the hybrid runtime and its continuous batching (run on the device machine: pytest -m gpu)."""
from __future__ import annotations

import asyncio
import math
import random
import threading
import time

import pytest
import torch

from engine import HybridEngine, SamplingParams, ops
from engine.plan import KernelPlan
from tests.conftest import make_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
TRI = KernelPlan(triton=True, skinny=True, fused_norm=True, pdl=True)
REF = KernelPlan()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def gpu_ckpt(tmp_path_factory):
    # head_dim 64, GQA 8:2, 4 layers: real kernel shapes, quick to load
    return make_checkpoint(tmp_path_factory.mktemp("gpu") / "gqa", "gqa", hidden_size=512,
                           intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2,
                           num_hidden_layers=4, initializer_range=0.05)


def warm_engine(ckpt, **over) -> HybridEngine:
    """The small checkpoint with graphs for buckets 16, 64 and 128 and every decode batch size captured at start-up."""
    return HybridEngine.from_pretrained(str(ckpt), device=DEV, dtype="float16", **{
        "buckets": [16, 64, 128], "max_context": 256, "prewarm_buckets": "all", **over})


def hf_log_softmax(ckpt, ids: list[int]) -> torch.Tensor:
    """HF fp16's log-softmax over the vocabulary at every position of ids: (len(ids), V) float32."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float16).cuda().eval()
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids], device=DEV)).logits[0].float(), -1)


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 384) for _ in range(n - 1)] for n in lengths]


def record_steps(eng: HybridEngine, mixed: list | None = None) -> list[tuple[int, int, bool]]:
    """From now on, each decode step the scheduler launches as (streams, batch size run, by a graph?); a mixed
    step's prompt is appended to `mixed` when given."""
    steps: list[tuple[int, int, bool]] = []
    launch = eng.runner.launch_decode

    def recorded(streams, B, graph, prompt=None):
        steps.append((len(streams), B, graph is not None))
        if prompt is not None and mixed is not None:
            mixed.append(prompt)
        return launch(streams, B, graph, prompt)

    eng.runner.launch_decode = recorded
    return steps


def run_together(eng: HybridEngine, reqs: list[tuple[list[int], SamplingParams]]) -> list:
    """The requests through generate_async, all queued while the engine thread is held, so the scheduler admits
    them in one iteration and their decode steps run as one batch from the first."""
    async def go():
        gate = threading.Event()
        eng.scheduler.call(lambda: gate.wait(60))         # runs on the engine thread, between iterations
        tasks = [asyncio.ensure_future(eng.generate_async(ids, p)) for ids, p in reqs]
        deadline = time.time() + 30
        while len(eng.scheduler.waiting) < len(reqs) and time.time() < deadline:
            await asyncio.sleep(0.001)
        gate.set()
        return await asyncio.wait_for(asyncio.gather(*tasks), 120)
    return asyncio.run(go())


@pytest.mark.parametrize("H,K,hd", [(32, 32, 128), (32, 8, 128), (8, 2, 64)])
def test_triton_ops_match_torch_reference(H, K, hd):
    from engine import kernels

    g = torch.Generator(device=DEV).manual_seed(H * K)
    dt, T, D, S = torch.float16, 1024, H * hd, 3
    for L in (1, 7, 128, 300):
        x = torch.randn(L, D, device=DEV, dtype=dt, generator=g)
        w = torch.randn(D, device=DEV, dtype=dt, generator=g)
        assert rel_err(ops.rms_norm(TRI, x, w, 1e-5), ops.rms_norm(REF, x, w, 1e-5)) < 2e-3
        assert rel_err(ops.rms_norm(TRI, x, None, 1e-5), ops.rms_norm(REF, x, None, 1e-5)) < 2e-3
        gu = torch.randn(L, 2 * 512, device=DEV, dtype=dt, generator=g)
        assert rel_err(ops.silu_mul(TRI, gu), ops.silu_mul(REF, gu)) < 2e-3
        # rope + cache write into one slot at arbitrary positions
        qkv = torch.randn(L, (H + 2 * K) * hd, device=DEV, dtype=dt, generator=g)
        pos = torch.randperm(T, device=DEV, generator=g)[:L]
        slot = torch.tensor([L % S], device=DEV)
        ang = torch.rand(T, hd // 2, device=DEV, generator=g) * 6.28
        cos = torch.cat([ang.cos(), ang.cos()], -1).to(dt)
        sin = torch.cat([ang.sin(), ang.sin()], -1).to(dt)
        kc = torch.full((S + 1, K, T, hd), float("nan"), device=DEV, dtype=dt)
        vc, kr, vr = kc.clone(), kc.clone(), kc.clone()
        q = kernels.rope_and_cache(qkv, pos, cos, sin, kc, vc, H, K, hd, slot=slot)
        q_ref, _ = ops.rope_and_cache(REF, qkv, pos, slot, cos, sin, kr, vr, H, K, hd)
        for t, ref in ((q, q_ref), (kc[slot, :, pos], kr[slot, :, pos]), (vc[slot, :, pos], vr[slot, :, pos])):
            assert not t.isnan().any() and rel_err(t, ref) < 2e-3
        assert kc.isnan().sum() == kr.isnan().sum() == kc.numel() - L * K * hd      # nothing else written
    # decode attention over slots: reads only the first kv_len positions of each row's slot (the rest is poison)
    for n in (1, 63, 64, 257, 1000):
        lens = torch.tensor([n, max(1, n // 3), T], device=DEV)
        slots = torch.tensor([2, 0, 1], device=DEV)
        q = torch.randn(3, H, hd, device=DEV, dtype=dt, generator=g)
        kc = torch.randn(S + 1, K, T, hd, device=DEV, dtype=dt, generator=g)
        vc = torch.randn(S + 1, K, T, hd, device=DEV, dtype=dt, generator=g)
        for s, ln in zip(slots.tolist(), lens.tolist()):
            kc[s, :, ln:], vc[s, :, ln:] = float("nan"), float("nan")
        kc[S], vc[S] = float("nan"), float("nan")
        a = kernels.decode_attention(q, kc, vc, lens, hd ** -0.5, slots=slots)
        ref = ops.decode_attention(q, kc.nan_to_num(), vc.nan_to_num(), lens, slots, hd ** -0.5)
        assert not a.isnan().any() and rel_err(a, ref) < 3e-3, n


def test_logits_close_to_hf_fp16(gpu_ckpt):
    """The prefill's logits (prompt's last position) and the first decode step's (one more token) against HF fp16."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(gpu_ckpt, dtype=torch.float16).cuda().eval()
    eng = HybridEngine.from_pretrained(str(gpu_ckpt), device=DEV, dtype="float16",
                                       buckets=[16, 64, 128], max_context=256, prewarm_buckets="all")
    rng = random.Random(0)
    for n in (5, 16, 17, 100):
        ids = [1] + [rng.randrange(3, 384) for _ in range(n - 1)]
        res = eng.generate(ids, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        with torch.no_grad():
            ref = hf(torch.tensor([ids + res.token_ids[:1]], device=DEV)).logits[0, -2:].float()
        assert rel_err(eng.runner.plogits[0], ref[0]) < 1e-2, n             # the prefill
        assert rel_err(eng.runner.logits[0], ref[1]) < 1e-2, n              # the decode step (batch 1)
    eng.shutdown()


def test_graph_replay_equals_jit_and_unseen_bucket_warms_in_background(gpu_ckpt):
    eng = HybridEngine.from_pretrained(str(gpu_ckpt), device=DEV, dtype="float16",
                                       buckets=[16, 32, 64, 128], max_context=512, prewarm_buckets=[16])
    assert eng.warm_buckets() == {16}
    rng = random.Random(1)
    ps = {n: [1] + [rng.randrange(3, 384) for _ in range(n - 1)] for n in (40, 50, 64)}
    first = eng.generate(ps[40], GREEDY)
    assert first.metrics.path == "jit" and first.metrics.bucket == 64
    deadline = time.time() + 60
    while 64 not in eng.warm_buckets() and time.time() < deadline:
        time.sleep(0.05)
    assert 64 in eng.warm_buckets(), "background capture never finished"
    for n, ids in ps.items():
        by_graph = eng.generate(ids, GREEDY)
        assert by_graph.metrics.path == "graph"
        eng.graphs.graphs.pop(("prefill", 64))          # force the JIT path for the same prompt
        by_jit = eng.generate(ids, GREEDY)
        assert by_jit.metrics.path == "jit"
        assert by_graph.token_ids == by_jit.token_ids, n
        deadline = time.time() + 60
        while 64 not in eng.warm_buckets() and time.time() < deadline:
            time.sleep(0.01)
    # sampled requests: same seed, same tokens, graph or not
    p = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=5)
    assert eng.generate(ps[50], p).token_ids == eng.generate(ps[50], p).token_ids
    eng.shutdown()


def test_unseen_bucket_replays_a_larger_warm_graph_then_its_own(gpu_ckpt):
    eng = HybridEngine.from_pretrained(str(gpu_ckpt), device=DEV, dtype="float16",
                                       buckets=[16, 32, 64, 128], max_context=512, prewarm_buckets=[16, 128])
    ids = [1] + list(range(5, 44))                       # 40 tokens: bucket 64, not warm; 128 is
    first = eng.generate(ids, GREEDY)
    assert first.metrics.path == "padded" and first.metrics.bucket == 64 and first.metrics.graph_bucket == 128
    deadline = time.time() + 60
    while 64 not in eng.warm_buckets() and time.time() < deadline:
        time.sleep(0.05)
    own = eng.generate(ids, GREEDY)
    assert own.metrics.path == "graph" and own.metrics.graph_bucket == 64
    assert own.token_ids == first.token_ids
    eng.shutdown()


@pytest.mark.parametrize("M", [1, 5, 16, 32])
def test_skinny_matmul_matches_cublas(M):
    from engine import kernels

    g = torch.Generator(device=DEV).manual_seed(M)
    for N, K in ((4096, 4096), (12288, 4096), (4096, 11008), (1000, 300)):
        x = torch.randn(M, K, device=DEV, dtype=torch.float16, generator=g)
        w = torch.randn(N, K, device=DEV, dtype=torch.float16, generator=g) * 0.02
        assert rel_err(kernels.skinny_matmul(x, w), x @ w.t()) < 2e-3, (N, K)
        assert rel_err(kernels.skinny_matmul(x, w, block_m=32), x @ w.t()) < 2e-3, (N, K)   # the decode tile


def test_stream_on_cuda_matches_generate(gpu_ckpt):
    eng = warm_engine(gpu_ckpt)
    p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ids = [1] + list(range(5, 40))
    full = eng.generate(ids, p)

    async def collect():
        return [c async for c in eng.stream(ids, p)]

    chunks = asyncio.run(collect())
    assert [c.token_id for c in chunks if c.token_id is not None] == full.token_ids
    assert chunks[-1].metrics.path == "graph"
    eng.shutdown()


def test_logprobs_on_the_graph_path_are_each_steps_own(gpu_ckpt):
    """Logprobs are read from each step's logits before the next decode graph replay overwrites them
    (async copy into one of two pinned buffers + event): the values match HF's log-softmax position by
    position, greedy picks the top one, and asking for logprobs changes no token."""
    eng = warm_engine(gpu_ckpt)
    ids = [1] + list(range(7, 50))
    plain = eng.generate(ids, GREEDY)
    res = eng.generate(ids, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=4))
    assert res.metrics.path == "graph" and res.token_ids == plain.token_ids
    ref = hf_log_softmax(gpu_ckpt, ids + res.token_ids)
    for i, (t, lp) in enumerate(zip(res.token_ids, res.logprobs)):
        row = ref[len(ids) - 1 + i]
        assert lp.chosen.token_id == t == lp.top[0].token_id
        assert abs(lp.chosen.logprob - row[t].item()) < 0.05, i
        assert len(lp.top) == 4 and all(x.logprob >= y.logprob for x, y in zip(lp.top, lp.top[1:]))
    eng.shutdown()


def test_logit_bias_and_penalties_on_the_graph_path(gpu_ckpt):
    """With the decode graph's own argmax in tok_s, a shaped request's pick overwrites it before the next
    replay reads it: a +100 bias forces its token at every step, penalties stop the repeats, and the next
    plain request (same slot, bias cleared) is unchanged."""
    eng = warm_engine(gpu_ckpt)
    ids = [1] + list(range(9, 30))
    base = eng.generate(ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    forced = eng.generate(ids, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logit_bias={77: 100}))
    assert forced.metrics.path == "graph" and forced.token_ids == [77] * 12
    pen = eng.generate(ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, frequency_penalty=2.0))
    assert len(set(pen.token_ids)) == len(pen.token_ids)
    assert eng.generate(ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)).token_ids == base.token_ids
    eng.shutdown()


def test_prompt_logprobs_on_cuda_match_hf_and_keep_the_graph_output(gpu_ckpt):
    """The eager scoring pass (after the prefill graph) matches HF fp16 and rewrites the slot's KV with the
    same values: the decode graph's continuation is unchanged."""
    eng = warm_engine(gpu_ckpt)
    ids = [1] + list(range(11, 50))
    plain = eng.generate(ids, GREEDY)
    res = eng.generate(ids, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, prompt_logprobs=2))
    assert res.token_ids == plain.token_ids and res.metrics.path == "graph"
    ref = hf_log_softmax(gpu_ckpt, ids)
    got = torch.tensor([p.chosen.logprob for p in res.prompt_logprobs[1:]])
    want = ref[:-1].gather(1, torch.tensor(ids[1:], device=DEV)[:, None])[:, 0].cpu()
    assert (got - want).abs().max().item() < 0.05
    eng.shutdown()


def test_a_failing_start_up_compile_raises_instead_of_hanging(gpu_ckpt, monkeypatch):
    """A kernel that fails to compile in the start-up warm-up (it runs on the capture thread) fails the
    engine's start with EngineStartError carrying the cause; before, start-up waited for it forever."""
    from engine import EngineStartError

    def broken(self):
        raise RuntimeError("kernel compile failed (test)")
    monkeypatch.setattr(HybridEngine, "_warm_up", broken)
    t0 = time.time()
    with pytest.raises(EngineStartError, match="compile failed") as e:
        warm_engine(gpu_ckpt)
    assert isinstance(e.value.__cause__, RuntimeError) and time.time() - t0 < 60


# ------------------------------------------------------------------ continuous batching (issue 24)
LENGTHS = [3, 9, 16, 17, 30, 41, 64, 70]          # buckets 16, 64 and 128


def test_concurrent_greedy_requests_give_their_tokens_alone_when_batch_invariant(gpu_ckpt):
    """batch_invariant: 8 greedy requests of different prompt and output lengths, run concurrently, give exactly
    the tokens each gives alone. They run as one batch of 8 (graph 8), then 7..1 as they finish (graphs 8, 4, 2,
    1, padding rows in the scratch slot): a row's tokens depend neither on the batch size nor on its company."""
    eng = warm_engine(gpu_ckpt, batch_invariant=True)
    reqs = [(ids, SamplingParams(max_tokens=6 + 3 * i, temperature=0.0, ignore_eos=True))
            for i, ids in enumerate(prompts(2, LENGTHS))]
    alone = [eng.generate(ids, p).token_ids for ids, p in reqs]
    steps = record_steps(eng)
    together = run_together(eng, reqs)
    assert [r.token_ids for r in together] == alone
    assert steps[0] == (8, 8, True) and {B for _, B, _ in steps} == {1, 2, 4, 8} and all(g for *_, g in steps)
    assert all(len(r.token_ids) == p.max_tokens for r, (_, p) in zip(together, reqs))
    assert eng.kv.free_count == eng.max_batch and eng.stats()["running"] == 0      # every slot back
    eng.shutdown()


def test_batched_tokens_do_not_depend_on_the_batch_size_by_default(gpu_ckpt):
    """The default plan (one stream alone on the GEMV, 2+ rows on one fixed row tile): the same 5 greedy requests
    run as a group of 5 (graph 8, 3 padding rows) and inside a group of 12 (graph 16) give identical tokens; the
    gather of generate_async without holding the engine serves them all too. (Without mixed steps: a prompt riding in
    a step runs its rows on the prompt's tiles.)"""
    eng = warm_engine(gpu_ckpt, mixed_prefill=False)
    p = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)   # one length: the batch never shrinks
    five = prompts(3, [3, 16, 17, 41, 70])
    others = prompts(4, [5, 12, 20, 33, 50, 64, 100])
    steps = record_steps(eng)
    small = run_together(eng, [(ids, p) for ids in five])
    assert steps and set(steps) == {(5, 8, True)}
    steps.clear()
    big = run_together(eng, [(ids, p) for ids in others[:3] + five + others[3:]])
    assert steps and set(steps) == {(12, 16, True)}
    assert [r.token_ids for r in big[3:8]] == [r.token_ids for r in small]
    first = [eng.generate(ids, SamplingParams(max_tokens=1, temperature=0.0)).token_ids[0] for ids in five]
    assert [r.token_ids[0] for r in small] == first                       # each row is its own request's

    async def gather():
        return await asyncio.gather(*(eng.generate_async(ids, p) for ids in five))
    assert all(len(r.token_ids) == 20 for r in asyncio.run(gather()))
    eng.shutdown()


def test_decode_graphs_for_prewarm_sizes_and_an_unwarmed_size_runs_jit_then_is_captured(gpu_ckpt):
    """Decode graphs exist for every prewarm batch size after start, none for the others; 3 streams with no warm
    size >= 3 run by the JIT path at size 4, which is then captured in the background; the same requests then
    replay graph 4 and give the same tokens."""
    eng = warm_engine(gpu_ckpt, max_batch=8, decode_batch_sizes=[1, 2, 4, 8], prewarm_batch_sizes=[1, 2],
                      mixed_prefill=False)
    assert eng.warm_batch_sizes() == {1, 2} and eng.stats()["warm_batch_sizes"] == [1, 2]
    assert eng.warm_buckets() == set(eng.buckets) == {16, 64, 128, 256}   # max_context is always a bucket
    jit, on_jit = [], eng.scheduler._on_jit
    eng.scheduler._on_jit = lambda key: (jit.append(key), on_jit(key))
    steps = record_steps(eng)
    reqs = [(ids, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)) for ids in prompts(5, [4, 30, 70])]
    first = run_together(eng, reqs)
    assert steps and set(steps) == {(3, 4, False)} and ("decode", 4) in jit
    deadline = time.time() + 60
    while 4 not in eng.warm_batch_sizes() and time.time() < deadline:
        time.sleep(0.05)
    assert eng.warm_batch_sizes() == {1, 2, 4}, "background capture of decode size 4 never finished"
    steps.clear()
    again = run_together(eng, reqs)
    assert set(steps) == {(3, 4, True)}
    assert [r.token_ids for r in again] == [r.token_ids for r in first]
    eng.shutdown()


def test_time_decode_steps_and_the_tpot_cap(gpu_ckpt):
    """time_decode_steps gives finite positive per-step times at batch 1 and 8 and leaves serving as it was;
    tpot_slo_ms: each batch size's step time is measured at start and the batch is capped at the largest size
    under the objective (an objective no step meets: one stream at a time, reported as max_batch 1)."""
    eng = warm_engine(gpu_ckpt)
    ids = prompts(6, [20])[0]
    before = eng.generate(ids, GREEDY).token_ids
    for B in (1, 8):
        ts = eng.time_decode_steps(B, 100, 4)
        assert len(ts) == 4 and all(math.isfinite(t) and t > 0 for t in ts), (B, ts)
    assert eng.generate(ids, GREEDY).token_ids == before
    eng.shutdown()

    eng = warm_engine(gpu_ckpt, tpot_slo_ms=1e-6)
    s = eng.stats()
    assert sorted(s["step_ms"]) == eng.batch_sizes and all(v > 0 for v in s["step_ms"].values())
    assert s["max_batch"] == 1 and s["free_slots"] == 1 and s["slots"] == eng.max_batch
    steps = record_steps(eng)
    res = run_together(eng, [(i, GREEDY) for i in prompts(7, [5, 25, 45])])
    assert all(len(r.token_ids) == 24 for r in res) and steps and all(n == 1 for n, _, _ in steps)
    eng.scheduler.tpot_slo_ms = 1e6                                      # every measured size meets it
    assert eng.stats()["max_batch"] == eng.max_batch
    eng.shutdown()


def test_seeded_sampling_is_the_same_alone_and_in_company(gpu_ckpt):
    """Seeded sampled requests (temperature + top-p, top-k) give the same tokens alone and in a batch with
    greedy, unseeded, biased and penalised company (per-row parameters, noise hashed from each request's seed
    and position); another seed gives other tokens."""
    eng = warm_engine(gpu_ckpt, batch_invariant=True)
    a, b = prompts(8, [12, 40])
    pa = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    pb = SamplingParams(max_tokens=12, temperature=1.0, top_k=20, seed=6, ignore_eos=True)
    alone_a, alone_b = eng.generate(a, pa).token_ids, eng.generate(b, pb).token_ids
    company = [(ids, p) for ids, p in zip(prompts(9, [7, 30, 66, 17]), [
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.7, ignore_eos=True),
        SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, logit_bias={77: 5.0}),
        SamplingParams(max_tokens=16, temperature=0.9, top_k=5, frequency_penalty=1.0, seed=1, ignore_eos=True)])]
    steps = record_steps(eng)
    res = run_together(eng, company[:2] + [(a, pa)] + company[2:] + [(b, pb)])
    assert res[2].token_ids == alone_a and res[5].token_ids == alone_b
    assert steps[0][0] == 6
    other = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    assert eng.generate(a, other).token_ids != alone_a
    eng.shutdown()


def test_a_prompt_rides_in_the_decode_step_on_its_graph_and_gives_its_tokens_alone(gpu_ckpt):
    """Mixed steps: mixed graphs for every warm bucket x decode batch size are captured at start; 5 requests queued
    together run 4 prefills, then a step that carries the 5th prompt beside the 4 decode rows (graph (bucket, 4)),
    then decode steps of 5. Every request gets the greedy tokens it gets alone (mixed_prefill off), its logprobs
    close to those."""
    eng = warm_engine(gpu_ckpt, decode_batch_sizes=[1, 2, 4, 8], max_batch=8)
    assert eng.graphs.warm("mixed") == {(b, n) for b in (16, 64, 128, 256) for n in (1, 2, 4, 8)}
    solo = warm_engine(gpu_ckpt, decode_batch_sizes=[1, 2, 4, 8], max_batch=8, mixed_prefill=False)
    p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    reqs = [(ids, p) for ids in prompts(11, [9, 30, 60, 90, 50])]
    alone = [solo.generate(ids, q) for ids, q in reqs]
    mixed = []
    steps = record_steps(eng, mixed)
    res = run_together(eng, reqs)
    assert steps[0] == (4, 4, True) and [m.ids for m in mixed] == [reqs[4][0]]
    assert set(steps[1:-1]) == {(5, 8, True)} and steps[-1] == (1, 1, True)    # the 5th prompt's last token alone
    assert res[4].metrics.mixed and res[4].metrics.path == "graph" and res[4].metrics.graph_bucket == 64
    assert all(r.metrics.path == "graph" and not r.metrics.mixed for r in res[:4]) and eng.stats()["mixed_steps"] == 1
    assert [r.token_ids for r in res] == [a.token_ids for a in alone]
    for r, a in zip(res, alone):
        got = [t.chosen.logprob for t in r.logprobs]
        want = [t.chosen.logprob for t in a.logprobs]
        assert max(abs(x - y) for x, y in zip(got, want)) < 2e-2, (got, want)
    solo.shutdown()
    eng.shutdown()
