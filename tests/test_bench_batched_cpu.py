"""bench/batched.py's CPU dry run: the whole harness (copy, engine parts, the three baselines in their own
processes) on the tiny preset, its one merged JSON checked for every key issue 27 lists, finite numbers,
and greedy tokens equal to HF transformers' for every engine (same seeded random weights)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.baselines.common import decode_bytes, hf_dict, random_weights  # noqa: E402

BASELINES = ["gptfast", "hf_static", "hf_eager"]


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _p50p99(d: dict) -> None:
    assert _num(d["p50"]) and _num(d["p99"]) and d["p99"] >= d["p50"] > 0, d


@pytest.fixture(scope="module")
def dry(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("batched") / "dry.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "bench/batched.py", "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert out.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    res["_log"] = p.stdout[-4000:] + p.stderr[-2000:]
    return res


def hf_greedy(prompts: list[list[int]], n: int) -> list[list[int]]:
    """HF transformers' greedy tokens on the tiny preset: a full forward over the whole sequence per token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = hf_dict("tiny")
    model = LlamaForCausalLM(LlamaConfig(**hf)).eval()
    model.load_state_dict(random_weights(hf, "cpu", torch.float32, 0), strict=False)
    outs = []
    with torch.no_grad():
        for p in prompts:
            seq = list(p)
            for _ in range(n):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            outs.append(seq[len(p):])
    return outs


def test_random_weights_are_the_engines():
    """Every engine computes with the same weights: common.random_weights is engine.model's, draw for draw."""
    from engine.model import ModelArgs
    from engine.model import random_weights as engine_weights
    from engine.presets import PRESETS

    mine = random_weights(hf_dict("tiny"), "cpu", torch.float32, 3)
    theirs = engine_weights(ModelArgs.from_hf(PRESETS["tiny"]), torch.device("cpu"), torch.float32, 3)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_floor_bytes_llama2_7b():
    """Weight bytes a 7B decode step reads (~13.2 GB fp16: all but the embedding table) and KV at 300 tokens."""
    w, kv = decode_bytes(hf_dict("llama-2-7b"), 1, 300)
    assert 13.1e9 < w < 13.3e9
    assert kv == 32 * 2 * 4096 * 300 * 2
    assert decode_bytes(hf_dict("llama-2-7b"), 32, 300)[1] == 32 * kv


def test_dry_run_bs1_baselines_and_greedy_tokens(dry):
    res = dry
    errs = {k: v for k, v in res["errors"].items() if k not in ("engine.decode", "engine.load", "engine.capacity")}
    assert not errs, errs
    for k in ("device", "torch", "triton", "date"):
        assert res[k], k
    assert _num(res["copy_bandwidth_tbs"]) and res["copy_bandwidth_tbs"] > 0
    bs1 = res["bs1"]
    for k in ("10", "50", "100", "200", "500", "random"):
        _p50p99(bs1["ttft_ms"][k])
    _p50p99(bs1["tpot_ms"])
    assert _num(bs1["first_unseen_ms"]) and bs1["first_unseen_ms"] > 0
    assert set(res["baselines"]) == set(BASELINES)
    prompts = bs1["greedy"]["prompts"]
    ref = hf_greedy(prompts, len(bs1["greedy"]["tokens"][0]))
    assert bs1["greedy"]["tokens"] == ref, "the engine's greedy tokens differ from HF's"
    for name, b in res["baselines"].items():
        for k in ("10", "50", "100", "200", "500", "random"):
            _p50p99(b["bs1"]["ttft_ms"][k])
        _p50p99(b["bs1"]["tpot_ms"])
        assert _num(b["compile_s"]) and b["compile_s"] >= 0
        assert set(b["decode_by_batch"]) == {"1", "4"}, name
        for row in b["decode_by_batch"].values():
            assert _num(row["step_ms_p50"]) and _num(row["floor_ms"]) and row["floor_ms"] > 0
        assert b["greedy"]["prompts"] == prompts
        assert b["greedy"]["tokens"] == ref, f"{name}'s greedy tokens differ from HF's"


def test_dry_run_batched_engine_parts(dry):
    """decode_by_batch, load and capacity: these need the batched engine (issue 24's interface)."""
    from engine import HybridEngine

    if not hasattr(HybridEngine, "time_decode_steps"):
        pytest.skip("the engine has no time_decode_steps yet (issue 24): batched parts not measurable")
    res = dry
    assert not {k: v for k, v in res["errors"].items()}, res["errors"]
    assert set(res["decode_by_batch"]) == {"1", "2", "4", "8"}
    for row in res["decode_by_batch"].values():
        assert _num(row["step_ms_p50"]) and row["step_ms_p50"] > 0 and _num(row["floor_ms"])
    assert [r["utilization"] for r in res["load"]] == [0.25, 0.5, 0.75, 0.9]
    for r in res["load"]:
        assert _num(r["rate_rps"]) and r["rate_rps"] > 0 and r["requests"] > 0
        assert _num(r["utilization"]) and _num(r["mean_running"]) and _num(r["itl_ms_p99"])
        assert _num(r["output_tok_s"]) and r["output_tok_s"] > 0
        _p50p99(r["ttft_ms"])
        _p50p99(r["tpot_ms"])
    assert isinstance(res["capacity_at_slo_streams"], int) and 0 <= res["capacity_at_slo_streams"] <= 8
    # the heaviest load ran more streams at once than the lightest (the engine batches)
    assert max(r["mean_running"] for r in res["load"]) > 1


def test_resume_keeps_other_parts_and_drops_the_stale_error_of_a_part_run_again(tmp_path):
    """--resume on a file whose copy part failed before and whose baselines exist: the copy part runs again, its
    old error goes, its bandwidth is new, and the baselines and their errors (not run now) stay as they were."""
    out = tmp_path / "resume.json"
    out.write_text(json.dumps({"errors": {"copy": "exit 1: old", "baselines.gptfast": "exit 124: old"},
                               "baselines": {"gptfast": {"bs1": {"kept": 1}}}, "wall_s": {}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "bench/batched.py", "--dry-run", "--parts", "copy", "--resume",
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    res = json.loads(out.read_text())
    assert "copy" not in res["errors"], p.stdout[-2000:] + p.stderr[-2000:]
    assert _num(res["copy_bandwidth_tbs"]) and res["copy_bandwidth_tbs"] > 0
    assert res["baselines"]["gptfast"] == {"bs1": {"kept": 1}}
    assert res["errors"]["baselines.gptfast"] == "exit 124: old"
