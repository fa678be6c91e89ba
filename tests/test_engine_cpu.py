"""The engine on CPU against HF transformers, through the real checkpoint-loading path."""
from __future__ import annotations

import asyncio
import json
import random

import pytest
import torch

from engine import (EmptyPromptError, EngineClosedError, EngineConfig, EngineInputError, HybridEngine, InvalidSamplingParams,
                    ModelLoadError, PromptTooLongError, SamplingParams)
from tests.conftest import VARIANTS

BUCKETS = [8, 16, 32, 64]
EDGE_LENGTHS = [1, 7, 8, 9, 15, 16, 17, 33]
GREEDY = dict(temperature=0.0, max_tokens=12)


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=0)
    new = out[0, len(ids):].tolist()
    return new[:-1] if new and new[-1] == 2 else new   # the engine does not emit EOS itself


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_hf_across_bucket_edges(checkpoints, variant):
    from transformers import LlamaForCausalLM

    path = checkpoints[variant]
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eng = HybridEngine.from_pretrained(str(path), device="cpu", dtype="float32", buckets=BUCKETS, max_context=128)
    rng = random.Random(variant)
    for n in EDGE_LENGTHS:
        ids = [1] + [rng.randrange(3, 384) for _ in range(n - 1)]
        res = eng.generate(ids, SamplingParams(**GREEDY))
        assert res.metrics.bucket == min(b for b in eng.buckets if b >= n)
        expect = hf_greedy(hf, ids, GREEDY["max_tokens"])
        assert res.token_ids == expect, f"{variant} n={n}"


def test_text_prompt_uses_checkpoint_tokenizer(checkpoints):
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = checkpoints["gqa"]
    tok = AutoTokenizer.from_pretrained(path)
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eng = HybridEngine.from_pretrained(str(path), device="cpu", buckets=BUCKETS, max_context=128)
    prompt = "the quick brown fox"
    ids = tok(prompt)["input_ids"]
    assert eng.prompt_ids(prompt) == ids and ids[0] == 1
    res = eng.generate(prompt, SamplingParams(**GREEDY))
    assert res.token_ids == hf_greedy(hf, ids, GREEDY["max_tokens"])
    assert res.text == tok.decode(res.token_ids, skip_special_tokens=True)


def _prefill(eng, ids, L, slot=0):
    """The prefill function a graph captures, run eagerly at bucket L into KV slot `slot`: its logits (1, V)."""
    r = eng.runner
    r.ids[: len(ids)] = torch.tensor(ids)
    r.seq_len.fill_(len(ids))
    r.slot.fill_(slot)
    r.prefill_fn(L)
    return r.plogits.clone()


def test_padded_bucket_and_exact_length_prefill_agree():
    """The JIT path prefills at the exact length, graphs at the padded bucket: same logits."""
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu", buckets=[32]))
    ids = list(range(5, 25))
    assert torch.allclose(_prefill(eng, ids, len(ids)), _prefill(eng, ids, 32), atol=1e-5)


def test_prefill_at_a_larger_bucket_gives_the_same_logits_and_continuation():
    """The "padded" path replays a larger warm bucket's graph: same logits, and the KV written at the
    padding positions is never read (decode continues the same), in any slot."""
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu", buckets=[32, 128], max_context=256))
    r = eng.runner
    ids = list(range(5, 25))
    runs = []
    for L, slot in ((32, 0), (128, 3)):
        r.ids.fill_(7)                              # junk beyond the prompt, as a previous request leaves it
        logits = [_prefill(eng, ids, L, slot)]
        toks = [int(r.ptok)]
        r.set_rows([slot], 1)
        for _ in range(6):
            r.decode_fn(1)
            toks.append(int(r.out[0]))
            logits.append(r.logits[:1].clone())
        runs.append((toks, torch.cat(logits)))
    assert runs[0][0] == runs[1][0]
    assert torch.allclose(runs[0][1], runs[1][1], atol=1e-4)


def test_pick_graph_bucket_prefers_own_then_smallest_larger_within_factor():
    from engine.scheduler import pick_graph_bucket

    g = {16, 256, 1024}
    assert pick_graph_bucket(16, g, 4.0) == 16
    assert pick_graph_bucket(64, g, 4.0) == 256          # smallest warm bucket <= 4x larger
    assert pick_graph_bucket(32, g, 4.0) is None          # 256 is 8x: JIT instead
    assert pick_graph_bucket(384, g, 4.0) == 1024
    assert pick_graph_bucket(64, g, 0.0) is None          # padding off
    assert pick_graph_bucket(2048, g, 4.0) is None        # nothing larger


def test_sampling_seeded_and_bounded():
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu"))
    p = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    a, b = eng.generate("sample me", p), eng.generate("sample me", p)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 20
    c = eng.generate("sample me", SamplingParams(max_tokens=20, temperature=0.9, seed=8))
    assert c.token_ids != a.token_ids
    greedy_top = eng.generate("sample me", SamplingParams(max_tokens=20, temperature=0))
    k1 = eng.generate("sample me", SamplingParams(max_tokens=20, temperature=5.0, top_k=1, seed=1))
    assert k1.token_ids == greedy_top.token_ids          # top_k=1 is greedy at any temperature
    # the smallest positive temperature / top_p (found by the HTTP fuzz test: logits / 5e-324 overflowed to
    # inf and the softmax to nan, a 500): sampling is then greedy, no error
    tiny = eng.generate("sample me", SamplingParams(max_tokens=20, temperature=5e-324, top_p=5e-324, seed=3))
    assert tiny.token_ids == greedy_top.token_ids


def _pick(logits, *params, slots=None, step=0):
    """The batched sampler over rows of logits, row i with params[i] in slot i."""
    from engine.sampler import SlotSampler

    n, V = logits.shape
    sm = SlotSampler(n, V, torch.device("cpu"))
    for i, p in enumerate(params):
        sm.set(i, p)
    sl = torch.arange(n) if slots is None else slots
    return sm, sm.pick(logits, sl, torch.full((n,), step), any(p.shapes_logits for p in params),
                       any(p.top_k > 0 for p in params), any(p.top_p < 1 for p in params))


def test_sample_survives_extreme_temperatures():
    logits = torch.tensor([1.0, 3.0, -2.0, 3.0 - 1e-6])
    for t in (5e-324, 1e-300, 1e-30):
        rows = logits.expand(2, 4).clone()
        _, tok = _pick(rows, SamplingParams(temperature=t, seed=1), SamplingParams(temperature=t, top_p=5e-324, seed=2))
        assert tok.tolist() == [1, 1]
    _, big = _pick(logits[None], SamplingParams(temperature=1e300, seed=0))   # ~uniform, still a valid id
    assert 0 <= int(big) < 4


def test_batched_sampler_rows_are_independent_and_follow_their_distribution():
    """Each row draws from its own softmax / top-k / top-p, with noise from its own seed and step only: the
    same row gives the same token whatever the other rows are, and frequencies match the probabilities."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    ps = [SamplingParams(temperature=0.7, seed=5), SamplingParams(temperature=1.0, top_k=3, seed=6),
          SamplingParams(temperature=1.0, top_p=0.5, seed=7)]
    _, alone = _pick(logits[1:2], ps[1])
    _, together = _pick(logits, *ps)
    assert int(alone) == int(together[1])
    top3 = set(logits[1].topk(3).indices.tolist())
    probs = torch.softmax(logits[0] / 0.7, -1)
    hits = torch.zeros(50)
    for step in range(3000):
        _, t = _pick(logits, *ps, step=step)
        hits[t[0]] += 1
        assert int(t[1]) in top3
        keep = torch.softmax(logits[2], -1).sort(descending=True)
        assert int(t[2]) in keep.indices[: int((keep.values.cumsum(0) - keep.values < 0.5).sum())].tolist()
    assert (hits / 3000 - probs).abs().max() < 0.03


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_match_hf_log_softmax(checkpoints, temperature):
    """Each token's logprob and its top-k alternatives are HF's log-softmax of the raw logits at that
    position (sampling with temperature too: the raw distribution), and the token texts spell the output."""
    from transformers import LlamaForCausalLM

    path = checkpoints["gqa"]
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eng = HybridEngine.from_pretrained(str(path), device="cpu", dtype="float32", buckets=BUCKETS, max_context=128)
    prompt = "the quick brown fox"
    ids = eng.prompt_ids(prompt)
    k = 5
    res = eng.generate(prompt, SamplingParams(max_tokens=10, temperature=temperature, seed=7, logprobs=k,
                                              ignore_eos=True))
    assert len(res.logprobs) == len(res.token_ids) == 10
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids + res.token_ids])).logits[0].float(), -1)
    for i, (t, lp) in enumerate(zip(res.token_ids, res.logprobs)):
        row = ref[len(ids) - 1 + i]
        assert lp.chosen.token_id == t
        assert lp.chosen.logprob == pytest.approx(row[t].item(), abs=1e-4)
        assert [a.logprob for a in lp.top] == pytest.approx(row.topk(k).values.tolist(), abs=1e-4)
        assert {a.token_id for a in lp.top} == set(row.topk(k).indices.tolist())
        assert all(x.logprob >= y.logprob for x, y in zip(lp.top, lp.top[1:]))
        if temperature == 0:
            assert lp.top[0].token_id == t
    special = set(eng.tokenizer.tok.all_special_ids)
    text = bytes(b for lp in res.logprobs if lp.chosen.token_id not in special for b in lp.chosen.bytes)
    assert text.decode("utf-8", errors="replace") == res.text
    for a in (x for lp in res.logprobs for x in [lp.chosen, *lp.top]):
        try:
            assert a.token == bytes(a.bytes).decode()
        except UnicodeDecodeError:       # part of a character: OpenAI's "bytes:\xNN" form
            assert a.token == "bytes:" + "".join(f"\\x{c:02x}" for c in a.bytes)


def test_prompt_logprobs_match_hf_and_change_no_output(checkpoints):
    """prompt_logprobs scores each prompt token given the ones before it (the first has None), with the
    top-k there, as HF's log-softmax does; the scoring pass rewrites the KV cache with the same values,
    so the generated tokens are those of a plain request."""
    from transformers import LlamaForCausalLM

    path = checkpoints["gqa"]
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eng = HybridEngine.from_pretrained(str(path), device="cpu", dtype="float32", buckets=BUCKETS, max_context=128)
    ids = eng.prompt_ids("the quick brown fox jumps over the lazy dog")
    plain = eng.generate(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    res = eng.generate(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, prompt_logprobs=3))
    assert res.token_ids == plain.token_ids and plain.prompt_logprobs is None
    pl = res.prompt_logprobs
    assert [p.chosen.token_id for p in pl] == ids and pl[0].chosen.logprob is None and pl[0].top == []
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    for i in range(1, len(ids)):
        assert pl[i].chosen.logprob == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
        assert [a.token_id for a in pl[i].top] == ref[i - 1].topk(3).indices.tolist()
    # one row at a time through the LM head gives the same numbers
    n = len(ids)
    chosen, _, _ = eng.model.prompt_logprobs(torch.tensor(ids), torch.arange(n), torch.tensor([0]), 2, rows=1)
    assert chosen.tolist() == pytest.approx([p.chosen.logprob for p in pl[1:]], abs=1e-5)


def test_logprobs_in_stream_and_off_by_default():
    """A stream carries each token's logprobs on its chunk (also the token that completes a stop
    string); without the parameter nothing is computed or attached."""
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu"))
    base = eng.generate("stream lp", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert base.logprobs is None
    stop = base.text[8:10]
    p = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=2, stop=[stop])
    full = eng.generate("stream lp", p)

    async def collect():
        return [c async for c in eng.stream("stream lp", p)]

    chunks = asyncio.run(collect())
    got = [c.logprobs for c in chunks if c.logprobs is not None]
    assert got == full.logprobs and [g.chosen.token_id for g in got] == full.token_ids
    assert full.finish_reason == "stop" and len(full.token_ids) < 20
    assert all(len(g.top) == 2 for g in got)


def test_logit_bias_and_penalties():
    """logit_bias +100 forces a token and -100 bans one (greedy and sampled); frequency/presence
    penalties stop a greedy model repeating tokens; the adjustment is OpenAI's formula."""
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu"))
    prompt = "penalties"
    base = eng.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert len(set(base.token_ids)) < len(base.token_ids)        # the random model repeats itself
    a = ord("A") + 3                                              # the byte tokenizer's id for "A"
    for temp in (0.0, 1.0):
        forced = eng.generate(prompt, SamplingParams(max_tokens=8, temperature=temp, seed=3, logit_bias={a: 100}))
        assert forced.text == "A" * 8
    first = base.token_ids[0]
    banned = eng.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                 logit_bias={first: -100}))
    assert first not in banned.token_ids
    for kind in ("frequency_penalty", "presence_penalty"):
        res = eng.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, **{kind: 2.0}))
        assert len(set(res.token_ids)) == len(res.token_ids), kind
    # the next request without them is plain greedy again
    assert eng.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)).token_ids == base.token_ids
    # OpenAI's formula: logits + bias - frequency * count - presence * (count > 0); greedy picks from it
    p = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={3: -1.0})
    logits = torch.tensor([[1.0, 2.9, 3.0, 4.0]])
    sm, _ = _pick(logits, p)
    sm.count(torch.tensor([0, 0, 0, 0]), torch.tensor([1, 2, 2, 2]))
    shaped = [1.0, 2.9 - 0.25 - 0.5, 3.0 - 0.75 - 0.5, 3.0]         # 3.0 wins; unshaped, 4.0 would
    assert int(sm.pick(logits, torch.tensor([0]), torch.tensor([1]), True, False, False)) == 0 + shaped.index(3.0)


def test_stop_strings_and_stop_tokens():
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu"))
    base = eng.generate("stop test", SamplingParams(max_tokens=30, temperature=0))
    assert len(base.text) > 6
    stop = base.text[3:5]
    res = eng.generate("stop test", SamplingParams(max_tokens=30, temperature=0, stop=[stop]))
    assert res.finish_reason == "stop" and res.text == base.text[: base.text.index(stop)]
    # the step launched before the stop string was seen leaves nothing behind for the next request
    assert eng.generate("stop test", SamplingParams(max_tokens=30, temperature=0)).token_ids == base.token_ids
    res = eng.generate("stop test", SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[base.token_ids[4]]))
    assert res.finish_reason == "stop" and res.token_ids == base.token_ids[: base.token_ids.index(base.token_ids[4])]


def test_stream_matches_generate_and_carries_metrics():
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu"))
    p = SamplingParams(max_tokens=15, temperature=0, stop=["zz"])
    full = eng.generate("stream it", p)

    async def collect():
        return [c async for c in eng.stream("stream it", p)]

    chunks = asyncio.run(collect())
    assert "".join(c.text for c in chunks) == full.text
    assert [c.token_id for c in chunks if c.token_id is not None] == full.token_ids
    last = chunks[-1]
    assert last.finish_reason == full.finish_reason and last.metrics.ttft_s > 0
    assert len(last.metrics.token_times_s) == len(full.token_ids) - 1


def _logged_engine(ahead: bool, monkeypatch) -> tuple[HybridEngine, list[str]]:
    """An engine whose decode launches ("step"), token reads ("read") and chunks ("chunk") are logged in order."""
    from engine.sequence import Stream

    eng = HybridEngine(EngineConfig(model="tiny", device="cpu"))
    events: list[str] = []
    r = eng.runner
    launch, read, read_p, emit = r.launch_decode, r.read_decode, r.read_prefill, Stream._emit
    monkeypatch.setattr(r, "launch_decode", lambda *a: (events.append("step"), launch(*a))[1])
    monkeypatch.setattr(r, "read_decode", lambda *a: (events.append("read"), read(*a))[1])
    monkeypatch.setattr(r, "read_prefill", lambda *a: (events.append("read"), read_p(*a))[1])
    monkeypatch.setattr(Stream, "_emit", lambda self, tok, *a, **k: (
        events.append("chunk") if tok is not None else None, emit(self, tok, *a, **k))[1])
    eng.scheduler.ahead = ahead
    return eng, events


def test_next_step_runs_before_the_host_reads_and_emits_the_token(monkeypatch):
    """Read-ahead (the CUDA order, forced here on CPU): the decode step of token i+1 is queued before the
    host waits for token i, and so before token i is turned into text and emitted: on CUDA the GPU runs the
    steps back to back while the host reads a token, emits it and queues the next replay. No step runs past
    max_tokens."""
    eng, events = _logged_engine(True, monkeypatch)
    n = 6

    async def collect():
        return [c async for c in eng.stream("overlap", SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))]

    chunks = asyncio.run(collect())
    assert len([c for c in chunks if c.token_id is not None]) == n
    # token k's chunk comes after k + 1 steps (its successor's step), the last token's after none more
    chunk_at = [i for i, e in enumerate(events) if e == "chunk"]
    read_at = [i for i, e in enumerate(events) if e == "read"]
    assert len(read_at) == n and events.count("step") == n - 1, events
    for k in range(n):
        assert events[: chunk_at[k]].count("step") == min(k + 1, n - 1), events
        assert events[: read_at[k]].count("step") == min(k + 1, n - 1), events   # read one step behind


def test_cpu_emits_each_token_before_its_next_step_and_wastes_none_on_eos(monkeypatch):
    """On CPU a step runs at its launch, so the engine reads and emits token i first and then runs step
    i+1 (read-ahead would hold every token back by a step). A reply that ends by EOS runs no extra step."""
    eng, events = _logged_engine(False, monkeypatch)
    assert HybridEngine(EngineConfig(model="tiny", device="cpu")).scheduler.ahead is False

    async def collect(params):
        return [c async for c in eng.stream("in order", params)]

    n = 5
    chunks = asyncio.run(collect(SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)))
    assert len([c for c in chunks if c.token_id is not None]) == n
    chunk_at = [i for i, e in enumerate(events) if e == "chunk"]
    for k in range(n):
        assert events[: chunk_at[k]].count("step") == k, events
    assert events.count("step") == n - 1, events
    events.clear()
    ids = eng.generate("in order", SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)).token_ids
    eos = ids[2]                                    # the third greedy token acts as EOS
    r = eng.generate("in order", SamplingParams(max_tokens=n, temperature=0, stop_token_ids=[eos]))
    assert r.finish_reason == "stop" and r.token_ids == ids[:2]
    assert events.count("step") == 5 - 1 + 2, events   # the first run's 4 steps, then 2: none after the EOS token


def metaspace_tokenizer(out):
    """A LLaMA-2-style (sentencepiece) tokenizer: '▁' marks spaces, the decoder drops the first one, and
    bytes fall back to <0xNN> tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import CORPUS

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(tok.to_str())           # the byte tokens <0x00>..<0xFF> as ordinary vocabulary
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out)
    return out


@pytest.mark.parametrize("source", ["bytes", "hf-bytelevel", "hf-sentencepiece"])
def test_incremental_text_matches_full_decode(checkpoints, tmp_path, source):
    """IncrementalText (a short window decoded per token) gives, after every token, the full decode of
    the tokens up to the last one that completed a character; multi-byte characters split over tokens,
    and the sentencepiece decoder's dropped first space does not eat the spaces after it."""
    from engine.tokenizer import ByteTokenizer, HFTokenizer, IncrementalText

    text = "héllo wörld, the quick ✓ fox 日本語 jumps — over the lazy dog 🚀 done"
    tok = (ByteTokenizer(512) if source == "bytes" else
           HFTokenizer(checkpoints["gqa"], (2,)) if source == "hf-bytelevel" else
           HFTokenizer(metaspace_tokenizer(tmp_path), (2,)))
    ids = tok.encode(text)
    assert len(ids) > 40
    seen: list[int] = []
    inc = IncrementalText(tok, seen)
    clean = ""      # the full decode at the last token that ended a character
    for i, t in enumerate(ids, 1):
        seen.append(t)
        full = tok.decode(ids[:i])
        clean = clean if full.endswith("\ufffd") else full
        assert inc.update() == clean, i
    assert inc.text == tok.decode(ids) == text


@pytest.mark.parametrize("source", ["bytes", "hf-bytelevel", "hf-sentencepiece"])
def test_token_bytes_rebuild_the_text(checkpoints, tmp_path, source):
    """Logprobs report each token's own UTF-8 bytes: joined over a run they are the text, multi-byte
    characters split over tokens and spaces included (sentencepiece's first one is the decoder's to drop)."""
    from engine.tokenizer import ByteTokenizer, HFTokenizer

    text = "héllo wörld, the quick ✓ fox 日本語 jumps — over the lazy dog 🚀 done"
    tok = (ByteTokenizer(512) if source == "bytes" else
           HFTokenizer(checkpoints["gqa"], (2,)) if source == "hf-bytelevel" else
           HFTokenizer(metaspace_tokenizer(tmp_path), (2,)))
    ids = tok.encode(text)
    pieces = [tok.token_bytes(t) for t in ids]
    assert any(len(p) == 1 and p[0] >= 0x80 for p in pieces)     # some token is part of a character
    joined = b"".join(pieces).decode()
    assert joined == (" " + text if source == "hf-sentencepiece" else text)
    if source != "bytes":
        assert tok.token_bytes(tok.tok.eos_token_id) == b"</s>"     # special tokens by name


def test_closing_stream_cancels_generation():
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu"))
    done = []
    eng.add_listener(lambda e: done.append(e) if e["type"] == "request" else None)

    async def take_two():
        agen = eng.stream("cancel me", SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True))
        got = [await agen.__anext__(), await agen.__anext__()]
        await agen.aclose()
        return got

    asyncio.run(take_two())
    eng.generate("next", SamplingParams(max_tokens=2))   # the engine is free again
    first = done[0]
    assert first["finish_reason"] == "cancelled" and first["output_tokens"] < 1000


def test_finished_request_is_out_of_in_flight_before_its_event():
    """A listener (the replica's stats and metrics) never sees a finished request still counted
    in in_flight(): for generate, generate_async, a full stream and a cancelled one."""
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu", max_batch=1))
    seen = []
    eng.add_listener(lambda e: seen.append((e["finish_reason"], eng.in_flight())) if e["type"] == "request" else None)
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    async def streams():
        assert [c async for c in eng.stream("full", p)][-1].finish_reason == "length"
        agen = eng.stream("cut", SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
        await agen.__anext__()
        await agen.aclose()
        while len(seen) < 3:    # the engine thread ends 'cut' at its next step
            await asyncio.sleep(0.001)
        return await eng.generate_async("async", p)

    eng.generate("sync", p)
    asyncio.run(streams())

    async def give_up_while_queued():     # a caller cancelled before its request ran (client gone)
        long = asyncio.ensure_future(eng.generate_async("long", SamplingParams(max_tokens=100, ignore_eos=True)))
        queued = asyncio.ensure_future(eng.generate_async("queued", p))
        while eng.in_flight() < 2:
            await asyncio.sleep(0.001)
        queued.cancel()
        await long
    asyncio.run(give_up_while_queued())
    assert eng.in_flight() == 0
    assert [r for r, _ in seen] == ["length", "length", "cancelled", "length", "length"]
    assert [n for _, n in seen] == [0, 0, 0, 0, 0], seen
    assert eng.in_flight() == 0


def test_cancelled_generate_async_stops_the_engine():
    """A non-streaming caller that goes away (its task cancelled) ends the request at the next decode
    step as 'cancelled', so the batch-1 engine is free for the next request at once."""
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu", max_context=4096, buckets=[16]))
    done = []
    eng.add_listener(lambda e: done.append(e) if e["type"] == "request" else None)

    async def main():
        task = asyncio.ensure_future(eng.generate_async("go", SamplingParams(max_tokens=4000, ignore_eos=True)))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await eng.generate_async("next", SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))

    assert len(asyncio.run(main()).token_ids) == 2
    assert done[0]["finish_reason"] == "cancelled" and 0 < done[0]["output_tokens"] < 4000, done[0]
    assert eng.in_flight() == 0


def test_shutdown_fails_queued_requests_instead_of_hanging():
    """Requests still queued when the engine shuts down end with EngineClosedError (a retryable
    error the ingress maps to 'replica gone'), never a stream that waits forever."""
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu", max_batch=1))
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def main():
        first = asyncio.ensure_future(eng.generate_async("running", long))
        while eng.in_flight() == 0:
            await asyncio.sleep(0.001)

        async def consume():
            return [c async for c in eng.stream("queued", SamplingParams(max_tokens=4))]
        queued = asyncio.ensure_future(consume())
        queued_sync = asyncio.ensure_future(eng.generate_async("queued too", SamplingParams(max_tokens=4)))
        while eng.in_flight() < 3:
            await asyncio.sleep(0.001)
        await asyncio.get_running_loop().run_in_executor(None, eng.shutdown)
        res = await asyncio.wait_for(asyncio.gather(first, queued, queued_sync, return_exceptions=True), 10)
        return res

    first, queued, queued_sync = asyncio.run(main())
    assert first.finish_reason == "length" and len(first.token_ids) == 200
    for r in (queued, queued_sync):
        assert isinstance(r, EngineClosedError) and "retry" in str(r), r
    assert eng.in_flight() == 0
    with pytest.raises(EngineClosedError, match="another replica"):
        eng.generate("after", SamplingParams(max_tokens=2))
    assert eng.in_flight() == 0


@pytest.mark.parametrize("prompt,params,exc,words", [
    ("", SamplingParams(), EmptyPromptError, "empty"),
    ([], SamplingParams(), EmptyPromptError, "empty"),
    ([1, 99999], SamplingParams(), EngineInputError, "token id"),
    ("x" * 300, SamplingParams(), PromptTooLongError, "context"),
    ("hi", SamplingParams(max_tokens=10_000), PromptTooLongError, "max_tokens"),
    ("hi", SamplingParams(max_tokens=0), InvalidSamplingParams, "max_tokens"),
    ("hi", SamplingParams(temperature=float("nan")), InvalidSamplingParams, "temperature"),
    ("hi", SamplingParams(temperature=-1), InvalidSamplingParams, "temperature"),
    ("hi", SamplingParams(top_p=0), InvalidSamplingParams, "top_p"),
    ("hi", SamplingParams(top_k=-3), InvalidSamplingParams, "top_k"),
    ("hi", SamplingParams(logprobs=21), InvalidSamplingParams, "logprobs"),
    ("hi", SamplingParams(presence_penalty=3), InvalidSamplingParams, "presence_penalty"),
    ("hi", SamplingParams(frequency_penalty=float("nan")), InvalidSamplingParams, "frequency_penalty"),
    ("hi", SamplingParams(logit_bias={5: 101}), InvalidSamplingParams, "logit_bias"),
    ("hi", SamplingParams(logit_bias={"5": 1}), InvalidSamplingParams, "logit_bias"),
    ("hi", SamplingParams(logit_bias={99999: 1}), EngineInputError, "logit_bias"),
    ("hi", SamplingParams(logprobs=-1), InvalidSamplingParams, "logprobs"),
    ("hi", SamplingParams(prompt_logprobs=21), InvalidSamplingParams, "prompt_logprobs"),
    ("hi", SamplingParams(logprobs=True), InvalidSamplingParams, "logprobs"),
])
def test_bad_input_raises_clear_error_and_engine_stays_usable(prompt, params, exc, words):
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu", max_context=256))
    with pytest.raises(exc, match=words):
        eng.generate(prompt, params)
    assert len(eng.generate("still fine", SamplingParams(max_tokens=3, ignore_eos=True)).token_ids) == 3


def test_unknown_preset_and_missing_files(tmp_path, checkpoints):
    with pytest.raises(ModelLoadError, match="not a preset"):
        HybridEngine.from_pretrained("llama-9-999b", device="cpu")
    (tmp_path / "config.json").write_text((checkpoints["mha"] / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="safetensors"):
        HybridEngine.from_pretrained(str(tmp_path), device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        HybridEngine.from_pretrained(str(empty), device="cpu")


def test_no_instance_attribute_shadows_a_method():
    """Every `self.x = ...` in the engine, on any device path (the CUDA-only ones included), must not
    hide a method: `self.stream = torch.cuda.Stream()` once made `eng.stream()` uncallable on GPU."""
    import ast
    import inspect

    import engine.engine as mod

    methods = {n for n, v in vars(HybridEngine).items() if callable(v) or isinstance(v, (staticmethod, property))}
    assigned = {t.attr for node in ast.walk(ast.parse(inspect.getsource(mod)))
                if isinstance(node, (ast.Assign, ast.AnnAssign))
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    assert "graphs" in assigned               # the parse sees the CUDA-only state
    assert not assigned & methods, assigned & methods


def test_a_failed_start_leaves_no_engine_thread(monkeypatch):
    """A start-up that fails after the engine thread exists (here: the artifact restore) raises its error and
    shuts that thread down instead of leaving it behind (it polls and holds its engine's memory)."""
    import threading

    def alive() -> int:
        return sum(t.name == "hybridserve-engine" and t.is_alive() for t in threading.enumerate())

    def broken(self):
        raise RuntimeError("store unreadable (test)")
    before = alive()
    monkeypatch.setattr(HybridEngine, "_restore_artifacts", broken)
    with pytest.raises(RuntimeError, match="store unreadable"):
        HybridEngine(EngineConfig(model="tiny", device="cpu", buckets=[32]))
    assert alive() == before
