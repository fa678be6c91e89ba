"""GPU-only checks of the hybrid runtime (run on the device machine: pytest -m gpu)."""
from __future__ import annotations

import random
import time

import pytest
import torch

from engine import HybridEngine, SamplingParams, ops
from tests.conftest import make_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def gpu_ckpt(tmp_path_factory):
    # head_dim 64, GQA 8:2, 4 layers: real kernel shapes, quick to load
    return make_checkpoint(tmp_path_factory.mktemp("gpu") / "gqa", "gqa", hidden_size=512,
                           intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2,
                           num_hidden_layers=4, initializer_range=0.05)


def warm_engine(ckpt) -> HybridEngine:
    """The small checkpoint with graphs for buckets 16 and 64 captured at start-up."""
    return HybridEngine.from_pretrained(str(ckpt), device="cuda", dtype="float16",
                                        buckets=[16, 64], max_context=256, prewarm_buckets="all")


def hf_log_softmax(ckpt, ids: list[int]) -> torch.Tensor:
    """HF fp16's log-softmax over the vocabulary at every position of ids: (len(ids), V) float32."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float16).cuda().eval()
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids], device="cuda")).logits[0].float(), -1)


@pytest.mark.parametrize("H,K,hd", [(32, 32, 128), (32, 8, 128), (8, 2, 64)])
def test_triton_ops_match_torch_reference(H, K, hd):
    dev, dt = torch.device("cuda"), torch.float16
    g = torch.Generator(device=dev).manual_seed(H * K)
    T, D = 1024, H * hd
    for L in (1, 7, 128, 300):
        x = torch.randn(L, D, device=dev, dtype=dt, generator=g)
        w = torch.randn(D, device=dev, dtype=dt, generator=g)
        for use in (True, False):
            ops.use_triton(use)
            out = ops.rms_norm(x, w, 1e-5)
            if use:
                tri = out
            else:
                assert rel_err(tri, out) < 2e-3
        gu = torch.randn(L, 2 * 512, device=dev, dtype=dt, generator=g)
        ops.use_triton(True)
        a = ops.silu_mul(gu)
        ops.use_triton(False)
        assert rel_err(a, ops.silu_mul(gu)) < 2e-3
        # rope + cache write at arbitrary positions
        qkv = torch.randn(L, (H + 2 * K) * hd, device=dev, dtype=dt, generator=g)
        pos = torch.randperm(T, device=dev, generator=g)[:L]
        ang = torch.rand(T, hd // 2, device=dev, generator=g) * 6.28
        cos = torch.cat([ang.cos(), ang.cos()], -1).to(dt)
        sin = torch.cat([ang.sin(), ang.sin()], -1).to(dt)
        res = []
        for use in (True, False):
            ops.use_triton(use)
            kc = torch.full((K, T, hd), float("nan"), device=dev, dtype=dt)
            vc = kc.clone()
            q = ops.rope_and_cache(qkv, pos, cos, sin, kc, vc, H, K, hd)
            res.append((q, kc[:, pos], vc[:, pos]))
        for t, ref in zip(res[0], res[1]):
            assert not t.isnan().any() and rel_err(t, ref) < 2e-3
    # decode attention: reads only the first kv_len positions (the rest is poison)
    for n in (1, 63, 64, 257, 1000):
        q = torch.randn(1, H, hd, device=dev, dtype=dt, generator=g)
        kc = torch.randn(K, T, hd, device=dev, dtype=dt, generator=g)
        vc = torch.randn(K, T, hd, device=dev, dtype=dt, generator=g)
        kc[:, n:], vc[:, n:] = float("nan"), float("nan")
        ln = torch.tensor([n], device=dev)
        ops.use_triton(True)
        a = ops.decode_attention(q, kc, vc, ln, hd ** -0.5)
        ops.use_triton(False)
        ref = ops.decode_attention(q, kc.nan_to_num(), vc.nan_to_num(), ln, hd ** -0.5)
        assert not a.isnan().any() and rel_err(a, ref) < 3e-3, n
    ops.use_triton(True)


def test_logits_close_to_hf_fp16(gpu_ckpt):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(gpu_ckpt, dtype=torch.float16).cuda().eval()
    eng = HybridEngine.from_pretrained(str(gpu_ckpt), device="cuda", dtype="float16",
                                       buckets=[16, 64, 128], max_context=256, prewarm_buckets="all")
    rng = random.Random(0)
    for n in (5, 16, 17, 100):
        ids = [1] + [rng.randrange(3, 384) for _ in range(n - 1)]
        with torch.no_grad():
            ref = hf(torch.tensor([ids], device="cuda")).logits[0, -1].float()
        eng.generate(ids, SamplingParams(max_tokens=1, temperature=0))
        assert rel_err(eng.logits, ref) < 1e-2, n
    eng.shutdown()


def test_graph_replay_equals_jit_and_unseen_bucket_warms_in_background(gpu_ckpt):
    eng = HybridEngine.from_pretrained(str(gpu_ckpt), device="cuda", dtype="float16",
                                       buckets=[16, 32, 64, 128], max_context=512, prewarm_buckets=[16])
    assert eng.warm_buckets() == {16}
    rng = random.Random(1)
    prompts = {n: [1] + [rng.randrange(3, 384) for _ in range(n - 1)] for n in (40, 50, 64)}
    first = eng.generate(prompts[40], GREEDY)
    assert first.metrics.path == "jit" and first.metrics.bucket == 64
    deadline = time.time() + 60
    while 64 not in eng.warm_buckets() and time.time() < deadline:
        time.sleep(0.05)
    assert 64 in eng.warm_buckets(), "background capture never finished"
    for n, ids in prompts.items():
        by_graph = eng.generate(ids, GREEDY)
        assert by_graph.metrics.path == "graph"
        ops.use_triton(True)
        eng._graphs.pop(64)                       # force the JIT path for the same prompt
        by_jit = eng.generate(ids, GREEDY)
        assert by_jit.metrics.path == "jit"
        assert by_graph.token_ids == by_jit.token_ids, n
        while 64 not in eng.warm_buckets():
            time.sleep(0.01)
    # sampled requests: same seed, same tokens, graph or not
    p = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=5)
    assert eng.generate(prompts[50], p).token_ids == eng.generate(prompts[50], p).token_ids
    eng.shutdown()


def test_unseen_bucket_replays_a_larger_warm_graph_then_its_own(gpu_ckpt):
    eng = HybridEngine.from_pretrained(str(gpu_ckpt), device="cuda", dtype="float16",
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


@pytest.mark.parametrize("M", [1, 5, 16])
def test_skinny_matmul_matches_cublas(M):
    from engine import kernels

    g = torch.Generator(device="cuda").manual_seed(M)
    for N, K in ((4096, 4096), (12288, 4096), (4096, 11008), (1000, 300)):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16, generator=g)
        w = torch.randn(N, K, device="cuda", dtype=torch.float16, generator=g) * 0.02
        assert rel_err(kernels.skinny_matmul(x, w), x @ w.t()) < 2e-3, (N, K)


def test_stream_on_cuda_matches_generate(gpu_ckpt):
    import asyncio

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
    (async copy + event): the values match HF's log-softmax position by position, greedy picks the
    top one, and asking for logprobs changes no token."""
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
    """With the decode graph's own argmax in self.tok, a shaped request overwrites it before the
    next replay reads it: a +100 bias forces its token at every step, penalties stop the repeats,
    and the next plain request is unchanged."""
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
    """The eager scoring pass (after the prefill graph) matches HF fp16 and rewrites the KV cache
    with the same values: the decode graph's continuation is unchanged."""
    eng = warm_engine(gpu_ckpt)
    ids = [1] + list(range(11, 50))
    plain = eng.generate(ids, GREEDY)
    res = eng.generate(ids, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, prompt_logprobs=2))
    assert res.token_ids == plain.token_ids and res.metrics.path == "graph"
    ref = hf_log_softmax(gpu_ckpt, ids)
    got = torch.tensor([p.chosen.logprob for p in res.prompt_logprobs[1:]])
    want = ref[:-1].gather(1, torch.tensor(ids[1:], device="cuda")[:, None])[:, 0].cpu()
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
