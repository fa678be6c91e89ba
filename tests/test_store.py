"""Artifact store (artifacts/) and its CLI on a local directory and a real S3 API server (moto's
standalone server over HTTP through s3fs, the code path a replica uses). The attacks of issue 25
are in tests/test_store_attacks.py."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
from store_fixtures import (ARTIFACTS, KEY, MODEL_CFG, backend, cache_files, entry_ids, fields,  # noqa: F401
                            keypair, make_cache, manager, overwrite, reader, s3_opts, s3_server)

from artifacts import StoreConfig, fingerprint, fingerprint_fields
from artifacts.kinds import collect

REPO = Path(__file__).resolve().parents[1]


def test_fingerprint_fields_cover_what_makes_artifacts_valid(fields):
    for k in ("model_config_sha256", "dtype", "compute_capability", "torch", "triton", "cuda",
              "engine", "python", "machine"):
        assert k in fields
    import engine

    assert fields["engine"] == engine.__version__ and fields["compute_capability"] == "cpu"
    fp = fingerprint(fields)
    assert fp == fingerprint(dict(fields)) and len(fp) == 16
    assert fingerprint({**fields, "dtype": "bfloat16"}) != fp
    assert fingerprint(fingerprint_fields({**MODEL_CFG, "hidden_size": 128}, "float16", "cpu")) != fp
    rev = dict(reversed(list(MODEL_CFG.items())))
    assert fingerprint(fingerprint_fields(rev, "float16", "cpu")) == fp


def test_round_trip_signed(backend, fields, tmp_path, keypair):
    priv, pub = keypair
    src = make_cache(tmp_path / "cache-a")
    pub_m = manager(backend, fields, src, sign=priv)
    r0 = pub_m.restore()
    assert not r0.loaded and r0.rejected == [] and r0.error is None
    assert pub_m.publish({128: 12.5, 16: 3.25}, {1: 2.0, 4: 3.5}) is True
    fp = fingerprint(fields)
    (e,) = entry_ids(backend, fp)
    m = json.loads(backend[2].cat_file(f"{backend[3]}/{fp}/{e}/manifest.json"))
    assert m["signature"]["alg"] == "ed25519" and set(m["files"]) == ARTIFACTS   # no .so, lock, tmp

    dst = tmp_path / "cache-b"
    r = manager(backend, fields, dst, public=[pub]).restore()
    assert r.loaded and r.rejected == [] and r.error is None and r.files == 4
    assert r.warm_buckets == {16: 3.25, 128: 12.5} and r.warm_batches == {1: 2.0, 4: 3.5}
    assert set(cache_files(dst)) == ARTIFACTS
    for n in ("rope.cubin", "rope.ptx", "rope.json"):
        assert (dst / "triton" / KEY / n).read_bytes() == (src / "triton" / KEY / n).read_bytes()
    # Triton's group file names its children by absolute path: restored pointing into dst
    grp = json.loads((dst / "triton" / KEY / "__grp__rope.json").read_text())
    assert grp["child_paths"] == {n: str((dst / "triton" / KEY / n).resolve())
                                  for n in ("rope.cubin", "rope.ptx", "rope.json")}
    assert collect(dst)[0] == collect(src)[0]            # same entry content seen from both
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []

    # a replica without the signing key does not publish; the publisher publishes only what is new
    rep = manager(backend, fields, dst, public=[pub])
    assert rep.restore().loaded and rep.publish({512: 40.0}) is False
    again = manager(backend, fields, dst, sign=priv)
    assert again.restore().loaded
    assert again.publish({16: 3.0}) is False and again.publish({512: 40.0}, {8: 5.0}) is True
    r3 = manager(backend, fields, tmp_path / "cache-c", public=[pub]).restore()
    assert r3.loaded and set(r3.warm_buckets) == {16, 128, 512} and set(r3.warm_batches) == {1, 4, 8}
    store = reader(backend, [pub])
    assert [v.ok for v in store.verify()] == [True, True]
    assert sum(i.latest for i in store.ls()) == 1 and all(i.trusted for i in store.ls())


def test_unsigned_local_opt_in(fields, tmp_path):
    b = (str(tmp_path / "store"), None, None, None)
    assert manager(b, fields, make_cache(tmp_path / "src"), unsigned=True).publish({16: 1.0})
    assert manager(b, fields, tmp_path / "dst", unsigned=True).restore().loaded
    with pytest.raises(ValueError, match="local directory only"):
        StoreConfig(store="s3://bucket/x", store_trust_unsigned_local=True)
    with pytest.raises(ValueError, match="hybridserve store keygen"):
        StoreConfig(store="/x", store_public_keys=["ed25519:not-base64!"])


def test_large_file_streamed_and_verified(backend, fields, tmp_path, keypair, monkeypatch):
    import artifacts.store as st

    monkeypatch.setattr(st, "SMALL_FILE", 1000)      # the streaming path
    priv, pub = keypair
    src = make_cache(tmp_path / "src")
    big = src / "triton" / KEY / "big.cubin"
    big.write_bytes(b"\x01\x02" * (3 * 2**19 + 17))
    assert manager(backend, fields, src, sign=priv).publish({16: 1.0})
    dst = tmp_path / "dst"
    assert manager(backend, fields, dst, public=[pub]).restore().loaded
    assert (dst / "triton" / KEY / "big.cubin").read_bytes() == big.read_bytes()
    fp = fingerprint(fields)
    (e,) = entry_ids(backend, fp)
    overwrite(backend, f"{backend[3]}/{fp}/{e}/files/triton/{KEY}/big.cubin", big.read_bytes()[:2**20])
    r2 = manager(backend, fields, tmp_path / "dst2", public=[pub]).restore()
    assert not r2.loaded and "big.cubin" in r2.rejected[0] and "truncated" in r2.rejected[0]
    assert cache_files(tmp_path / "dst2") == []


def test_fingerprint_mismatch_skipped_with_reason(backend, fields, tmp_path, keypair, caplog):
    priv, pub = keypair
    assert manager(backend, fields, make_cache(tmp_path / "src"), sign=priv).publish({16: 1.0})
    other = {**fields, "torch": "9.9.9"}
    fp, ofp = fingerprint(fields), fingerprint(other)
    dst = tmp_path / "dst"
    with caplog.at_level(logging.INFO, logger="hybridserve.store"):
        r = manager(backend, other, dst, public=[pub]).restore()
    assert not r.loaded and cache_files(dst) == [] and r.skipped == [f"no entry for fingerprint {ofp}"]
    # the same entry copied under the other fingerprint's directory: its signed fields say no
    backend[2].copy(f"{backend[3]}/{fp}", f"{backend[3]}/{ofp}", recursive=True)
    backend[2].invalidate_cache()
    r = manager(backend, other, dst, public=[pub]).restore()
    assert not r.loaded and "fingerprint does not match" in r.rejected[0] and cache_files(dst) == []


@pytest.mark.parametrize("fault", ["tampered", "truncated", "missing"])
def test_damaged_file_rejects_the_whole_entry(backend, fields, tmp_path, keypair, fault):
    priv, pub = keypair
    src = make_cache(tmp_path / "src")
    assert manager(backend, fields, src, sign=priv).publish({16: 1.0, 32: 2.0})
    fp = fingerprint(fields)
    (e,) = entry_ids(backend, fp)
    path = f"{backend[3]}/{fp}/{e}/files/triton/{KEY}/rope.cubin"
    good = (src / "triton" / KEY / "rope.cubin").read_bytes()
    if fault == "tampered":
        overwrite(backend, path, bytes(b ^ 1 for b in good))        # same size
    elif fault == "truncated":
        overwrite(backend, path, good[:100])
    else:
        backend[2].rm(path)
        backend[2].invalidate_cache()
    dst = tmp_path / "dst"
    r = manager(backend, fields, dst, public=[pub]).restore()
    want = {"tampered": "sha256 mismatch", "truncated": "size 100", "missing": "missing"}[fault]
    assert not r.loaded and r.warm_buckets == {} and want in r.rejected[0] and "rope.cubin" in r.rejected[0]
    assert cache_files(dst) == []                   # not even the intact files landed
    (rep,) = reader(backend, [pub]).verify()
    assert not rep.ok and want.split()[0] in " ".join(rep.errors)


def test_damaged_newest_falls_back_to_older_valid_entry(fields, tmp_path, keypair):
    priv, pub = keypair
    b = (str(tmp_path / "store"), None, None, None)
    manager(b, fields, make_cache(tmp_path / "v1"), sign=priv).publish({16: 1.0})
    time.sleep(0.01)
    manager(b, fields, make_cache(tmp_path / "v2", salt="2"), sign=priv).publish({16: 1.0, 32: 2.0})
    newest = max(reader(b, [pub]).ls(), key=lambda i: i.created)
    p = tmp_path / "store" / newest.fingerprint / newest.entry / "files" / "triton" / KEY / "rope.ptx"
    p.write_text("tampered")
    r = manager(b, fields, tmp_path / "dst", public=[pub]).restore()
    assert r.loaded and r.entry != newest.entry and r.warm_buckets == {16: 1.0}
    assert len(r.rejected) == 1 and newest.entry in r.rejected[0]


@pytest.mark.parametrize("same_content", [True, False], ids=["same", "different"])
def test_concurrent_publishers_threads(backend, fields, tmp_path, keypair, same_content):
    priv, pub = keypair
    n = 4
    srcs = [make_cache(tmp_path / f"src{i}", salt="" if same_content else str(i)) for i in range(n)]
    barrier = threading.Barrier(n)
    results = [None] * n

    def work(i):
        m = manager(backend, fields, srcs[i], sign=priv)
        barrier.wait()
        results[i] = (m.publish({16: 1.0, 64: 4.0}), m.last_publish)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all(r[1] is not None for r in results)
    assert [r[0] for r in results].count(True) == (1 if same_content else n)
    _assert_store_valid(backend, fields, tmp_path, pub, 1 if same_content else n)


def _assert_store_valid(backend, fields, tmp_path, pub, n_entries):
    store = reader(backend, [pub])
    infos = store.ls()
    assert len(infos) == n_entries and all(i.complete and i.trusted for i in infos)
    assert all(r.ok for r in store.verify())
    dst = tmp_path / ("dst-" + uuid.uuid4().hex[:6])
    r = manager(backend, fields, dst, public=[pub]).restore()
    assert r.loaded and r.rejected == [] and ARTIFACTS <= set(cache_files(dst))
    assert set(cache_files(dst)) - ARTIFACTS <= {f"triton/{KEY}/blob.cubin"}


_WORKER = textwrap.dedent("""\
    import json, os, sys, time
    sys.path.insert(0, sys.argv[1])
    from artifacts import ArtifactManager, StoreConfig
    url, opts, fields, src = sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
    cfg = StoreConfig(store=url, store_options=opts or {}, store_signing_key_env="HS_WORKER_KEY")
    m = ArtifactManager(cfg, fields, src)
    print("ready", flush=True)
    start = float(sys.stdin.readline())    # one start time for all publishers, sent once all are ready
    while time.time() < start:
        time.sleep(0.001)
    ok = m.publish({16: 1.0, 64: 4.0})
    print(json.dumps({"created": ok, "entry": m.last_publish.entry if m.last_publish else None}))
""")


@pytest.mark.parametrize("same_content", [True, False], ids=["same", "different"])
def test_concurrent_publishers_processes(backend, fields, tmp_path, keypair, same_content):
    import os

    priv, pub = keypair
    n = 3
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    srcs = [make_cache(tmp_path / f"src{i}", salt="" if same_content else str(i)) for i in range(n)]
    for i, s in enumerate(srcs):          # a bigger payload so the uploads overlap in time
        (s / "triton" / KEY / "blob.cubin").write_bytes((b"%d" % (0 if same_content else i)) * 2**20)
    env = dict(os.environ, HS_WORKER_KEY=priv)
    procs = [subprocess.Popen([sys.executable, str(script), str(REPO), backend[0], json.dumps(backend[1]),
                               json.dumps(fields), str(s)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for s in srcs]
    for p in procs:                       # every publisher has imported and set up its manager
        assert p.stdout.readline().strip() == "ready", p.communicate(timeout=60)[1][-3000:]
    start = time.time() + 0.2
    for p in procs:
        p.stdin.write(f"{start}\n")
        p.stdin.flush()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert all(o["entry"] for o in outs)
    assert [o["created"] for o in outs].count(True) == (1 if same_content else n)
    _assert_store_valid(backend, fields, tmp_path, pub, 1 if same_content else n)


def test_incomplete_entry_ignored(backend, fields, tmp_path, keypair):
    """A publisher that died after uploading files but before the manifest leaves no entry."""
    _, pub = keypair
    fp = fingerprint(fields)
    _, _, fs, root = backend
    overwrite(backend, f"{root}/{fp}/deadbeef/files/triton/{KEY}/rope.cubin", b"partial")
    dst = tmp_path / "dst"
    r = manager(backend, fields, dst, public=[pub]).restore()
    assert not r.loaded and r.rejected == [] and cache_files(dst) == []
    (info,) = reader(backend, [pub]).ls()
    assert not info.complete


def test_prune(backend, fields, tmp_path, keypair):
    priv, pub = keypair
    url, opts, fs, root = backend
    fp = fingerprint(fields)
    for i in range(3):
        assert manager(backend, fields, make_cache(tmp_path / f"s{i}", salt=str(i)), sign=priv).publish({16: float(i)})
        time.sleep(0.02)
    other = {**fields, "dtype": "bfloat16"}
    assert manager(backend, other, make_cache(tmp_path / "o"), sign=priv).publish({16: 1.0})
    overwrite(backend, f"{root}/{fp}/abandoned/files/x.bin", b"partial")
    if opts is None:
        (Path(root) / fp / ".tmp-abc-123").mkdir()
    fs.invalidate_cache()
    store = reader(backend, [pub])
    newest = max((i for i in store.ls(fp) if i.trusted), key=lambda i: i.created)
    removed = store.prune(keep=1, incomplete_grace_s=3600)     # young incomplete entries survive
    assert len(removed) == 2 and all(fp in r for r in removed) and "abandoned" in entry_ids(backend, fp)
    assert any("abandoned" in r for r in store.prune(keep=1, incomplete_grace_s=0, dry_run=True))
    assert "abandoned" in entry_ids(backend, fp)
    store.prune(keep=1, incomplete_grace_s=0)
    assert entry_ids(backend, fp) == [newest.entry] and len(entry_ids(backend, fingerprint(other))) == 1
    r = manager(backend, fields, tmp_path / "dst", public=[pub]).restore()
    assert r.loaded and r.entry == newest.entry and r.warm_buckets == {16: 2.0}


def test_prune_invalid(fields, tmp_path, keypair):
    priv, pub = keypair
    b = (str(tmp_path / "store"), None, None, None)
    manager(b, fields, make_cache(tmp_path / "src"), sign=priv).publish({16: 1.0})
    store = reader(b, [pub])
    (info,) = store.ls()
    (tmp_path / "store" / info.fingerprint / info.entry / "files" / "triton" / KEY / "rope.cubin").write_bytes(b"x")
    assert store.prune(keep=5) == []
    assert store.prune(keep=5, remove_invalid=True) == [f"{info.fingerprint}/{info.entry}"]
    assert store.ls() == [] and store.fingerprints() == []


# ---- CLI -------------------------------------------------------------------------------------
def cli(argv: list[str]) -> int:
    from deployments.cli import main

    return main(argv)


def test_cli_keygen_ls_verify_prune(fields, tmp_path, capsys, monkeypatch):
    key = tmp_path / "keys" / "store-key"
    assert cli(["store", "keygen", "--out", str(key)]) == 0
    assert (key.stat().st_mode & 0o777) == 0o600 and Path(f"{key}.pub").read_text().startswith("ed25519:")
    assert "store_public_keys" in capsys.readouterr().out
    assert cli(["store", "keygen", "--out", str(key)]) == 2          # no silent overwrite
    assert "exists" in capsys.readouterr().err
    priv, pubf = key.read_text().strip(), f"{key}.pub"
    b = (str(tmp_path / "store"), None, None, None)
    manager(b, fields, make_cache(tmp_path / "s1"), sign=str(key)).publish({16: 1.0, 128: 9.0})
    time.sleep(0.01)
    manager(b, fields, make_cache(tmp_path / "s2", salt="x"), sign=priv).publish({16: 1.0}, {2: 1.5})
    store = reader(b, [pubf])
    entries = sorted(store.ls(), key=lambda i: i.created)
    url = b[0]
    capsys.readouterr()

    assert cli(["store", "ls", "--store", url, "--public-key", pubf]) == 0
    out = capsys.readouterr().out
    assert all(i.entry in out for i in entries) and "16,128" in out and "(latest)" in out
    assert cli(["store", "ls", "--store", url, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {d["entry"] for d in data} == {i.entry for i in entries}
    assert not any(d["trusted"] for d in data) and {d["warm_batches"].get("2") for d in data} == {None, 1.5}

    assert cli(["store", "verify", "--store", url, "--public-key", pubf]) == 0
    assert "2 entries checked, 0 failed" in capsys.readouterr().out
    assert cli(["store", "verify", "--store", url]) == 1               # no key: nothing verifies
    assert "no trusted key given" in capsys.readouterr().out
    old = entries[0]
    (tmp_path / "store" / old.fingerprint / old.entry / "files" / "triton" / KEY / "rope.ptx").write_text("x")
    assert cli(["store", "verify", "--store", url, "--public-key", pubf]) == 1
    out = capsys.readouterr().out
    assert f"FAILED  {old.fingerprint}/{old.entry}" in out and "rope.ptx" in out

    assert cli(["store", "prune", "--store", url, "--public-key", pubf, "--keep", "1", "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out and len(store.ls()) == 2
    assert cli(["store", "prune", "--store", url, "--public-key", pubf, "--keep", "1"]) == 0
    assert [i.entry for i in store.ls()] == [entries[1].entry]


def test_cli_ls_missing_store_says_so(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "store"
    assert cli(["store", "ls", "--store", str(missing)]) == 1
    assert "does not exist" in capsys.readouterr().err and not missing.exists()
    (tmp_path / "empty").mkdir()
    assert cli(["store", "ls", "--store", str(tmp_path / "empty")]) == 0
    assert "no entries" in capsys.readouterr().out


def test_cli_store_ls_s3(s3_server, fields, tmp_path, capsys, keypair):
    import s3fs

    priv, pub = keypair
    bucket = "hs-cli-" + uuid.uuid4().hex[:8]
    s3fs.S3FileSystem(**s3_opts(s3_server)).mkdir(bucket)
    b = (f"s3://{bucket}/a", s3_opts(s3_server), None, None)
    manager(b, fields, make_cache(tmp_path / "s"), sign=priv).publish({32: 2.0})
    capsys.readouterr()
    assert cli(["store", "ls", "--store", b[0], "--endpoint-url", s3_server, "--public-key", pub, "--json"]) == 0
    (d,) = json.loads(capsys.readouterr().out)
    assert d["complete"] and d["trusted"] and d["warm_buckets"] == {"32": 2.0}
    assert cli(["store", "verify", "--store", b[0], "--endpoint-url", s3_server, "--public-key", pub]) == 0
    assert cli(["store", "ls", "--store", f"s3://{bucket}/nothing-here", "--endpoint-url", s3_server]) == 1
    assert cli(["store", "ls", "--store", b[0], "--endpoint-url", s3_server, "--trust-unsigned"]) == 2
    assert "only in a local directory" in capsys.readouterr().err


def test_cli_warm_needs_a_signing_key(tmp_path, capsys, monkeypatch):
    import argparse

    from deployments import cli_store

    p = argparse.ArgumentParser()
    cli_store.add_parser(p.add_subparsers(dest="command"))
    a = p.parse_args(["warm", "--preset", "llama-2-7b", "--store", "/x", "--buckets", "16,64"])
    assert a.func.__wrapped__ is cli_store.cmd_warm and a.buckets == [16, 64] and a.device == "cuda"
    monkeypatch.delenv("HYBRIDSERVE_STORE_SIGNING_KEY", raising=False)
    assert cli(["warm", "--preset", "tiny", "--store", str(tmp_path / "s"), "--device", "cpu"]) == 2
    assert "hybridserve store keygen" in capsys.readouterr().err
    monkeypatch.setenv("HYBRIDSERVE_STORE_SIGNING_KEY", "ed25519-private:AAAA")
    assert cli(["warm", "--preset", "tiny", "--store", str(tmp_path / "s"), "--device", "cpu"]) == 2
    assert "32 bytes" in capsys.readouterr().err


def test_warmstart_bench_cpu_dry_run(tmp_path):
    out = tmp_path / "results"
    p = subprocess.run([sys.executable, str(REPO / "bench" / "warmstart.py"), "--device", "cpu",
                        "--preset", "tiny", "--out", str(out), "--workdir", str(tmp_path / "w"),
                        "--max-tokens", "4"],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    (f,) = out.glob("warmstart-*-cpu.json")
    doc = json.loads(f.read_text())
    assert doc["device_name"] == "cpu" and doc["torch"]
    s = doc["summary"]
    for k in ("cold_ready_s", "cold_first_token_s", "seeded_ready_s", "seeded_first_token_s"):
        assert isinstance(s[k], float) and 0 < s[k] < 600
    run = doc["runs"][0]
    for mode in ("cold", "seeded"):
        r = run[mode]
        assert r["process_start_to_python_s"] <= r["process_start_to_ready_s"] <= r["process_start_to_first_token_s"]
        assert r["first_request"]["path"] == "eager" and r["first_request"]["bucket"] == 128
    # the seeded child trusts the run's public key (CPU publishes nothing: no graphs, no kernels)
    assert run["seeded"]["restore"]["error"] is None and run["seeded"]["restore"]["rejected"] == []
    assert doc["target"]["met"] is False        # no graphs on CPU
