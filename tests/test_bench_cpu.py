"""bench/profile_decode.py on CPU (tiny preset): the parts that run without a GPU complete and write
their figures, so the GPU run of the script is not the first time its plumbing runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_profile_decode_cpu_parts_complete(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import profile_decode
    finally:
        sys.path.remove(str(REPO / "bench"))
    profile_decode.main(["--device", "cpu", "--preset", "tiny", "--steps", "3", "--requests", "2", "--tokens", "8",
                         "--long-tokens", "16", "--long-requests", "1", "--contexts", "20", "40",
                         "--tag", "test", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("profile-decode-*-cpu-test.json")
    res = json.loads(path.read_text())
    for part in ("step", "step_context_40", "prefill_16", "prefill_64", "prefill_128", "streaming"):
        assert part in res and "error" not in res[part], (part, res.get(part))
    assert res["step"]["eager_kernels"]["kernel_us_per_step"] > 0
    assert res["prefill_16"]["bucket"] == 16 and res["prefill_16"]["tokens"] == 10
    assert res["prefill_128"]["eager_kernels"]["kernel_us_per_step"] > 0
    assert "gemv" not in res                     # the GEMV sweep is CUDA-only


def test_bucket_edges_cpu_run_chooses_and_writes(tmp_path):
    """bench/bucket_edges.py's plumbing on CPU: every candidate timed, a choice per k that holds the mix's
    longest prompt, and with as many buckets as the defaults it never expects worse than the defaults."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bucket_edges
    finally:
        sys.path.remove(str(REPO / "bench"))
    bucket_edges.main(["--device", "cpu", "--preset", "tiny", "--candidates", "16:64:8", "--k", "2,3",
                       "--mix", "10:60", "--reps", "2", "--tag", "test", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("bucket-edges-*-cpu-test.json")
    res = json.loads(path.read_text())
    assert sorted(map(int, res["prefill_us"])) == list(range(16, 65, 8))
    assert res["defaults"]["buckets"] == [16, 32, 64]
    for k in ("2", "3"):
        c = res["choices"][k]
        assert len(c["buckets"]) <= int(k) and c["buckets"][-1] == 64 and c["expected_prefill_ms"] > 0
    assert res["choices"]["3"]["expected_prefill_ms"] <= res["defaults"]["expected_prefill_ms"]
