"""Qwen2/2.5, Qwen3 and Mistral beside LLaMA on CPU, against HF transformers, through the public API
(HybridEngine.from_pretrained on tiny random checkpoints saved with save_pretrained); the tokenizers as
checkpoints ship them (tokenizer.json, a SentencePiece tokenizer.model alone, chat templates,
generation_config.json's eos ids); what the engine refuses at start."""
from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from engine import HybridEngine, ModelLoadError, SamplingParams
from tests.conftest import FAMILIES, make_family_checkpoint, make_sentencepiece_checkpoint

BUCKETS = [16, 32, 64]
LENGTHS = [15, 16, 17, 33]          # both sides of the bucket edges 16 and 32
N_OUT, TOP = 8, 5
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def family_ckpts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    return {f: make_family_checkpoint(root / f, f, seed=10 + i) for i, f in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def sp_ckpt(tmp_path_factory):
    return make_sentencepiece_checkpoint(tmp_path_factory.mktemp("sp") / "llama2-sp")


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy_logprobs(model, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation by full forwards (no cache, no generation_config: no eos stop) and HF's
    log-softmax at each chosen token's position: (tokens, (n, V))."""
    seq, rows = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            row = torch.log_softmax(model(torch.tensor([seq])).logits[0, -1].float(), -1)
            rows.append(row)
            seq.append(int(row.argmax()))
    return seq[len(ids):], torch.stack(rows)


def engine(path, **kw) -> HybridEngine:
    return HybridEngine.from_pretrained(str(path), device="cpu", dtype="float32", buckets=BUCKETS,
                                        max_context=128, **kw)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_and_logprobs_match_hf_across_bucket_edges(family_ckpts, family):
    path = family_ckpts[family]
    hf, eng = hf_model(path), engine(path)
    assert eng.args.model_type == family.split("-")[0]
    rng = random.Random(family)
    for n in LENGTHS:
        ids = [1] + [rng.randrange(3, 384) for _ in range(n - 1)]
        res = eng.generate(ids, SamplingParams(temperature=0, max_tokens=N_OUT, logprobs=TOP, ignore_eos=True))
        assert res.metrics.bucket == min(b for b in BUCKETS if b >= n)
        expect, ref = hf_greedy_logprobs(hf, ids, N_OUT)
        assert res.token_ids == expect, f"{family} n={n}"
        for t, lp, row in zip(res.token_ids, res.logprobs, ref):
            assert lp.chosen.token_id == t == lp.top[0].token_id
            assert lp.chosen.logprob == pytest.approx(row[t].item(), abs=1e-4)
            assert [a.logprob for a in lp.top] == pytest.approx(row.topk(TOP).values.tolist(), abs=1e-4)
            assert {a.token_id for a in lp.top} == set(row.topk(TOP).indices.tolist())


def test_family_options_come_from_the_config(family_ckpts):
    """The differences are model options: Qwen2's q/k/v bias fused into one bias row, Qwen3's per-head
    q/k norms and explicit head_dim, tied embeddings, Mistral's window."""
    qwen2, qwen3 = engine(family_ckpts["qwen2"]), engine(family_ckpts["qwen3"])
    a2, a3 = qwen2.args, qwen3.args
    assert (a2.qkv_bias, a2.qk_norm, a2.rope_theta) == (True, False, 1e6)
    assert qwen2.model.layers[0]["bqkv"].shape == ((a2.n_heads + 2 * a2.n_kv_heads) * a2.head_dim,)
    assert (a3.qkv_bias, a3.qk_norm, a3.head_dim) == (False, True, 32) and a3.head_dim * a3.n_heads != a3.hidden_size
    assert qwen3.model.layers[0]["q_norm"].shape == qwen3.model.layers[0]["k_norm"].shape == (32,)
    tied = engine(family_ckpts["qwen2-tied"])
    assert tied.args.tie_embeddings and tied.model.lm_head is tied.model.embed
    assert engine(family_ckpts["mistral"]).args.sliding_window == 256


def test_qwen2_bias_and_qwen3_qk_norm_change_the_output(family_ckpts):
    """The family extras are applied: without them the logits move (so the equality above checks them)."""
    ids = list(range(5, 25))
    for family, key in (("qwen2", "bqkv"), ("qwen3", "q_norm")):
        eng = engine(family_ckpts[family])
        full = eng.generate(ids, SamplingParams(temperature=0, max_tokens=1, logprobs=1)).logprobs[0].chosen.logprob
        for lw in eng.model.layers:
            lw[key] = None
        cut = eng.generate(ids, SamplingParams(temperature=0, max_tokens=1, logprobs=1)).logprobs[0].chosen.logprob
        assert abs(full - cut) > 1e-3, family


def with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **changes}))
    return dst


@pytest.mark.parametrize("changes,words", [
    (dict(model_type="gemma2"), "unsupported model_type 'gemma2'.*llama, mistral, qwen2, qwen3"),
    (dict(model_type="llama", attention_bias=True), "attention_bias.*output projection"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_unsupported_checkpoints_are_refused_naming_why(family_ckpts, tmp_path, changes, words):
    with pytest.raises(ModelLoadError, match=words):
        engine(with_config(family_ckpts["qwen2"], tmp_path / "ckpt", **changes))


def test_max_context_past_max_position_embeddings_is_refused(family_ckpts):
    with pytest.raises(ModelLoadError, match="max_context 4096 exceeds the model's max_position_embeddings 2048"):
        HybridEngine.from_pretrained(str(family_ckpts["qwen3"]), device="cpu", max_context=4096)
    assert HybridEngine.from_pretrained(str(family_ckpts["qwen3"]), device="cpu", max_context=2048).max_context == 2048


def test_context_past_the_sliding_window_is_refused(family_ckpts, tmp_path):
    """Full attention equals a sliding window only while the cache fits in it: Mistral's window always,
    Qwen's only with use_sliding_window."""
    with pytest.raises(ModelLoadError, match="max_context 512 exceeds the model's sliding_window 256"):
        HybridEngine.from_pretrained(str(family_ckpts["mistral"]), device="cpu", max_context=512)
    src, slide = family_ckpts["qwen2"], ["full_attention", "sliding_attention"]
    assert engine(with_config(src, tmp_path / "off", sliding_window=64, layer_types=slide)).args.sliding_window is None
    full = with_config(src, tmp_path / "full", sliding_window=64, use_sliding_window=True)   # no layer slides
    assert engine(full).args.sliding_window is None
    with pytest.raises(ModelLoadError, match="max_context 128 exceeds the model's sliding_window 64"):
        engine(with_config(src, tmp_path / "on", sliding_window=64, use_sliding_window=True, layer_types=slide))


def test_generation_config_eos_ids_stop_generation(family_ckpts, tmp_path):
    """An eos id only generation_config.json names (chat models: the end-of-turn token) ends a reply."""
    src = family_ckpts["qwen2"]
    ids = list(range(5, 25))
    plain = engine(src).generate(ids, SamplingParams(temperature=0, max_tokens=N_OUT))
    stop_at = next(i for i, t in enumerate(plain.token_ids) if i >= 2 and t not in plain.token_ids[:i])
    eos = plain.token_ids[stop_at]
    d = tmp_path / "gen-eos"
    shutil.copytree(src, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, eos]}))
    eng = engine(d)
    assert {2, eos} <= eng.tokenizer.eos_token_ids
    res = eng.generate(ids, SamplingParams(temperature=0, max_tokens=N_OUT))
    assert res.token_ids == plain.token_ids[:stop_at] and res.finish_reason == "stop"


def test_sentencepiece_only_checkpoint(sp_ckpt):
    """A LLaMA-2-era dir with only tokenizer.model: its SentencePiece ids (with BOS), text and per-token
    bytes, and greedy output equal to HF's on those ids."""
    import sentencepiece as spm

    assert not (sp_ckpt / "tokenizer.json").exists()
    sp = spm.SentencePieceProcessor(model_file=str(sp_ckpt / "tokenizer.model"))
    eng, hf = engine(sp_ckpt), hf_model(sp_ckpt)
    text = "hello world, the quick café ✓ fox 42"
    ids = eng.prompt_ids(text)
    assert ids == [1] + sp.encode(text)
    assert eng.tokenizer.decode(ids) == sp.decode(ids[1:]) == text
    assert b"".join(eng.tokenizer.token_bytes(t) for t in ids[1:]).decode() == " " + text   # '▁' is a space
    res = eng.generate(text, SamplingParams(temperature=0, max_tokens=N_OUT, ignore_eos=True))
    assert res.token_ids == hf_greedy_logprobs(hf, ids, N_OUT)[0]
    assert res.text == eng.tokenizer.decode(res.token_ids)


TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def rendered(messages) -> str:
    return "".join(f"<|{m['role']}|>{m['content']}</s>" for m in messages) + "<|assistant|>"


@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json", "sentencepiece"])
def test_chat_template_as_shipped(family_ckpts, sp_ckpt, tmp_path, where):
    """The checkpoint's own chat template (its file or tokenizer_config.json's key) shapes chat prompts,
    not the plain fallback format."""
    d = tmp_path / "chat"
    shutil.copytree(sp_ckpt if where == "sentencepiece" else family_ckpts["qwen3"], d)
    if where == "chat_template.jinja":
        (d / "chat_template.jinja").write_text(TEMPLATE)
    else:
        f = d / "tokenizer_config.json"
        tc = json.loads(f.read_text()) if f.exists() else {}
        f.write_text(json.dumps({**tc, "chat_template": TEMPLATE}))
    eng = engine(d)
    got = eng.chat_prompt(MESSAGES)
    assert got == eng.tokenizer.encode(rendered(MESSAGES), add_special_tokens=False)
    assert eng.tokenizer.decode(got) == rendered(MESSAGES).replace("</s>", "")     # </s> is special: skipped
    assert len(eng.generate(got, SamplingParams(max_tokens=3, ignore_eos=True)).token_ids) == 3
