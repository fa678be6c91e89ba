"""Artifact store (engine/store.py) and its CLI: local directory and a real S3 API server.

The S3 tests start moto's standalone server as a separate process on a free port and talk to it
over HTTP through s3fs -- the same code path a replica uses against a cluster's object store.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from engine.store import (ArtifactManager, ArtifactStore, fingerprint, fingerprint_fields,
                          hmac_key_from_env, scan_dir)

REPO = Path(__file__).resolve().parents[1]
MODEL_CFG = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2}

# An "artifact" whose loading executes code: importing it from the cache dir writes a marker
# file. A tampered version writes a different marker. Either marker existing proves execution.
KERNEL_SRC = textwrap.dedent("""\
    import os
    open(os.environ["HS_TEST_MARKER"], "w").write("genuine")
""")
EVIL_SRC = textwrap.dedent("""\
    import os
    open(os.environ["HS_TEST_MARKER"], "w").write("EVIL!!!")
""")
assert len(KERNEL_SRC) == len(EVIL_SRC)      # same size: only the sha256 can catch it


@pytest.fixture
def fields():
    return fingerprint_fields(MODEL_CFG, "float16", "cpu")


def make_cache(d: Path, salt: str = "") -> Path:
    """A Triton-like cache dir: <hash>/kernel.cubin, <hash>/hs_kernel_mod.py, group json."""
    (d / "a1b2c3").mkdir(parents=True, exist_ok=True)
    (d / "a1b2c3" / "kernel.cubin").write_bytes(b"\x7fELF" + bytes(range(256)) * 40 + salt.encode())
    (d / "a1b2c3" / "hs_kernel_mod.py").write_text(KERNEL_SRC)
    (d / "d4e5f6").mkdir(exist_ok=True)
    (d / "d4e5f6" / "__grp__kernel.json").write_text(json.dumps({"child_paths": ["x"], "salt": salt}))
    (d / "tmp.pid_1_2").write_text("triton temp file: not an artifact")
    return d


def import_kernel(cache_dir: Path, marker: Path, monkeypatch) -> bool:
    """Load the artifact the way a compiled launcher module would be loaded. True if it ran."""
    import importlib

    monkeypatch.setenv("HS_TEST_MARKER", str(marker))
    monkeypatch.syspath_prepend(str(cache_dir / "a1b2c3"))
    sys.modules.pop("hs_kernel_mod", None)
    importlib.invalidate_caches()
    try:
        importlib.import_module("hs_kernel_mod")
        return True
    except ModuleNotFoundError:
        return False
    finally:
        sys.modules.pop("hs_kernel_mod", None)


# --------------------------------------------------------------------------------------------
# a real S3 API server process (moto standalone), over HTTP
# --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    port = _free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    # the server logs every request: send it to a file (an unread pipe fills up and the server
    # blocks mid-request)
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    log_f = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log_f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except Exception:
            if proc.poll() is not None:
                raise RuntimeError("moto server died: " + log_path.read_text()[-2000:])
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not come up")
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    yield url
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log_f.close()


def s3_opts(endpoint: str) -> dict:
    # short timeouts: a stuck request fails the test in seconds instead of botocore's minutes
    return {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
            "config_kwargs": {"connect_timeout": 5, "read_timeout": 30,
                              "retries": {"max_attempts": 2}}}


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    """(url, storage_options, raw fsspec fs, root path) for a fresh, empty store."""
    if request.param == "local":
        import fsspec

        root = tmp_path / "store"
        return str(root), None, fsspec.filesystem("file"), str(root)
    import s3fs

    endpoint = request.getfixturevalue("s3_server")
    bucket = "hs-" + uuid.uuid4().hex[:12]
    fs = s3fs.S3FileSystem(**s3_opts(endpoint))
    fs.mkdir(bucket)
    assert fs.exists(bucket)
    return f"s3://{bucket}/artifacts", s3_opts(endpoint), fs, f"{bucket}/artifacts"


def manager(backend, fields, cache_dir, key=None) -> ArtifactManager:
    url, opts, _, _ = backend
    return ArtifactManager(url, key, fields, cache_dir, storage_options=opts, torch_cache=False)


def entry_paths(backend, fp):
    url, opts, fs, root = backend
    fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{fp}", detail=False)
                  if not p.endswith("latest.json"))


def overwrite(backend, path: str, data: bytes) -> None:
    _, _, fs, _ = backend
    fs.pipe_file(path, data)
    fs.invalidate_cache()


# --------------------------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------------------------
def test_fingerprint_fields_cover_what_makes_artifacts_valid(fields):
    for k in ("model_config_sha256", "dtype", "compute_capability", "torch", "triton", "cuda",
              "engine", "python", "machine"):
        assert k in fields
    assert fields["compute_capability"] == "cpu" and fields["dtype"] == "float16"
    import engine

    assert fields["engine"] == engine.__version__
    fp = fingerprint(fields)
    assert fp == fingerprint(dict(fields)) and len(fp) == 16
    # any field change -> different fingerprint
    assert fingerprint({**fields, "dtype": "bfloat16"}) != fp
    assert fingerprint(fingerprint_fields({**MODEL_CFG, "hidden_size": 128}, "float16", "cpu")) != fp
    # key order of the model config does not matter
    rev = dict(reversed(list(MODEL_CFG.items())))
    assert fingerprint(fingerprint_fields(rev, "float16", "cpu")) == fp


# --------------------------------------------------------------------------------------------
# round trip
# --------------------------------------------------------------------------------------------
def test_round_trip(backend, fields, tmp_path, monkeypatch):
    src = make_cache(tmp_path / "cache-a")
    m1 = manager(backend, fields, src)
    r0 = m1.restore()
    assert not r0.loaded and r0.rejected == [] and r0.error is None
    assert m1.publish({128: 12.5, 16: 3.25}) is True

    dst = tmp_path / "cache-b"
    m2 = manager(backend, fields, dst)
    r = m2.restore()
    assert r.loaded and r.rejected == [] and r.error is None
    assert r.warm_buckets == {16: 3.25, 128: 12.5}
    assert r.files == 3
    for rel in ("a1b2c3/kernel.cubin", "a1b2c3/hs_kernel_mod.py", "d4e5f6/__grp__kernel.json"):
        assert (dst / rel).read_bytes() == (src / rel).read_bytes()
    assert not (dst / "tmp.pid_1_2").exists()          # temp files are not artifacts
    assert scan_dir(dst) == scan_dir(src)
    # no staging leftovers next to the cache dir
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["cache-a", "cache-b"] + (["store"] if backend[0] == str(tmp_path / "store") else []))
    # the loaded artifact is usable (positive control for the tamper tests)
    marker = tmp_path / "marker"
    assert import_kernel(dst, marker, monkeypatch) and marker.read_text() == "genuine"

    # nothing new -> no new entry; a new bucket -> a new entry that restores with both
    assert m2.publish({16: 3.0}) is False
    assert m2.publish({512: 40.0}) is True
    r3 = manager(backend, fields, tmp_path / "cache-c").restore()
    assert r3.loaded and set(r3.warm_buckets) == {16, 128, 512}
    store = ArtifactStore(backend[0], storage_options=backend[1])
    assert [v.ok for v in store.verify()] == [True, True]
    assert sum(i.latest for i in store.ls()) == 1


def test_large_file_streamed_and_verified(backend, fields, tmp_path, monkeypatch):
    import engine.store as st

    monkeypatch.setattr(st, "_SMALL_FILE", 1000)      # force the streaming path
    src = make_cache(tmp_path / "src")
    (src / "big.bin").write_bytes(os.urandom(3 * 2**20 + 17))
    assert manager(backend, fields, src).publish({16: 1.0})
    dst = tmp_path / "dst"
    r = manager(backend, fields, dst).restore()
    assert r.loaded and (dst / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    # truncate the big one in the store: rejected, not loaded
    fp = fingerprint(fields)
    e = entry_paths(backend, fp)[0]
    overwrite(backend, f"{backend[3]}/{fp}/{e}/files/big.bin", (src / "big.bin").read_bytes()[:2**20])
    dst2 = tmp_path / "dst2"
    r2 = manager(backend, fields, dst2).restore()
    assert not r2.loaded and "big.bin" in r2.rejected[0] and not (dst2 / "big.bin").exists()


def test_store_unreachable_falls_back(fields, tmp_path, caplog):
    m = ArtifactManager("s3://no-such-bucket/x", None, fields, tmp_path / "c",
                        storage_options={"endpoint_url": f"http://127.0.0.1:{_free_port()}",
                                         "key": "a", "secret": "b", "skip_instance_cache": True,
                                         "config_kwargs": {"connect_timeout": 1,
                                                           "retries": {"max_attempts": 1}}})
    with caplog.at_level(logging.WARNING, logger="hybridserve.store"):
        r = m.restore()
        assert not r.loaded and r.error
        make_cache(tmp_path / "c")
        assert m.publish({16: 1.0}) is False
    assert "unavailable" in caplog.text and "publish failed" in caplog.text


# --------------------------------------------------------------------------------------------
# fingerprint mismatch
# --------------------------------------------------------------------------------------------
def test_fingerprint_mismatch_skipped_with_reason(backend, fields, tmp_path, caplog):
    assert manager(backend, fields, make_cache(tmp_path / "src")).publish({16: 1.0})
    other = {**fields, "torch": "9.9.9", "compute_capability": "sm_80"}
    dst = tmp_path / "dst"
    with caplog.at_level(logging.INFO, logger="hybridserve.store"):
        r = manager(backend, other, dst).restore()
    assert not r.loaded and r.warm_buckets == {}
    assert not dst.exists() or not any(dst.iterdir())
    assert "fingerprint mismatch" in caplog.text
    assert "torch: stored '" in caplog.text and "'9.9.9'" in caplog.text
    assert "compute_capability" in caplog.text
    assert any("fingerprint mismatch" in s for s in r.skipped)


def test_entry_under_wrong_fingerprint_not_loaded(fields, tmp_path, caplog):
    """An entry copied under another fingerprint's directory is refused: the manifest says
    what it was built for."""
    url = str(tmp_path / "store")
    assert ArtifactManager(url, None, fields, make_cache(tmp_path / "src"), torch_cache=False).publish({16: 1.0})
    other = {**fields, "dtype": "bfloat16"}
    fp, ofp = fingerprint(fields), fingerprint(other)
    shutil.copytree(tmp_path / "store" / fp, tmp_path / "store" / ofp)
    dst = tmp_path / "dst"
    with caplog.at_level(logging.INFO, logger="hybridserve.store"):
        r = ArtifactManager(url, None, other, dst, torch_cache=False).restore()
    assert not r.loaded and not (dst / "a1b2c3").exists()
    assert "fingerprint does not match" in caplog.text


# --------------------------------------------------------------------------------------------
# tampering
# --------------------------------------------------------------------------------------------
def test_tampered_artifact_rejected_never_executed(backend, fields, tmp_path, monkeypatch, caplog):
    assert manager(backend, fields, make_cache(tmp_path / "src")).publish({16: 1.0, 32: 2.0})
    fp = fingerprint(fields)
    (e,) = entry_paths(backend, fp)
    overwrite(backend, f"{backend[3]}/{fp}/{e}/files/a1b2c3/hs_kernel_mod.py", EVIL_SRC.encode())

    dst = tmp_path / "dst"
    with caplog.at_level(logging.WARNING, logger="hybridserve.store"):
        r = manager(backend, fields, dst).restore()
    assert not r.loaded and r.warm_buckets == {}
    assert len(r.rejected) == 1 and "sha256 mismatch" in r.rejected[0]
    assert "hs_kernel_mod.py" in r.rejected[0]
    assert "rejected" in caplog.text and "sha256 mismatch" in caplog.text
    # nothing of the entry landed in the cache dir -- not even the untampered files
    assert not dst.exists() or list(dst.rglob("*")) == []
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []
    # ... so loading the kernel module finds nothing and nothing ran
    marker = tmp_path / "marker"
    assert import_kernel(dst, marker, monkeypatch) is False
    assert not marker.exists()
    # operators see it too
    store = ArtifactStore(backend[0], storage_options=backend[1])
    (rep,) = store.verify()
    assert not rep.ok and "sha256 mismatch" in rep.errors[0]


def test_truncated_artifact_rejected(backend, fields, tmp_path):
    src = make_cache(tmp_path / "src")
    assert manager(backend, fields, src).publish({16: 1.0})
    fp = fingerprint(fields)
    (e,) = entry_paths(backend, fp)
    good = (src / "a1b2c3" / "kernel.cubin").read_bytes()
    overwrite(backend, f"{backend[3]}/{fp}/{e}/files/a1b2c3/kernel.cubin", good[:100])
    dst = tmp_path / "dst"
    r = manager(backend, fields, dst).restore()
    assert not r.loaded and "size 100" in r.rejected[0] and "truncated" in r.rejected[0]
    assert not (dst / "a1b2c3" / "kernel.cubin").exists()


def test_missing_artifact_rejected(backend, fields, tmp_path):
    assert manager(backend, fields, make_cache(tmp_path / "src")).publish({16: 1.0})
    fp = fingerprint(fields)
    (e,) = entry_paths(backend, fp)
    backend[2].rm(f"{backend[3]}/{fp}/{e}/files/d4e5f6/__grp__kernel.json")
    backend[2].invalidate_cache()
    dst = tmp_path / "dst"
    r = manager(backend, fields, dst).restore()
    assert not r.loaded and "missing" in r.rejected[0]
    assert not dst.exists() or list(dst.rglob("*")) == []


def test_tampered_newest_falls_back_to_older_valid_entry(fields, tmp_path, monkeypatch):
    url = str(tmp_path / "store")
    ArtifactManager(url, None, fields, make_cache(tmp_path / "v1"), torch_cache=False).publish({16: 1.0})
    time.sleep(0.01)
    ArtifactManager(url, None, fields, make_cache(tmp_path / "v2", salt="2"), torch_cache=False).publish({16: 1.0, 32: 2.0})
    store = ArtifactStore(url)
    newest = max(store.ls(), key=lambda i: i.created)
    p = tmp_path / "store" / newest.fingerprint / newest.entry / "files" / "a1b2c3" / "hs_kernel_mod.py"
    p.write_text(EVIL_SRC)
    dst = tmp_path / "dst"
    r = ArtifactManager(url, None, fields, dst, torch_cache=False).restore()
    assert r.loaded and r.entry != newest.entry and r.warm_buckets == {16: 1.0}
    assert len(r.rejected) == 1 and newest.entry in r.rejected[0]
    marker = tmp_path / "marker"
    assert import_kernel(dst, marker, monkeypatch) and marker.read_text() == "genuine"


def test_path_traversal_in_manifest_rejected(fields, tmp_path):
    url = str(tmp_path / "store")
    ArtifactManager(url, None, fields, make_cache(tmp_path / "src"), torch_cache=False).publish({16: 1.0})
    fp = fingerprint(fields)
    (e,) = [p for p in (tmp_path / "store" / fp).iterdir() if p.is_dir()]
    m = json.loads((e / "manifest.json").read_text())
    payload = b"print('escaped')\n"
    import hashlib

    m["files"]["../../../escaped.py"] = {"sha256": hashlib.sha256(payload).hexdigest(),
                                         "size": len(payload)}
    (e / "manifest.json").write_text(json.dumps(m))
    (e / "escaped.py").write_bytes(payload)
    dst = tmp_path / "deep" / "er" / "dst"
    r = ArtifactManager(url, None, fields, dst, torch_cache=False).restore()
    assert not r.loaded and "unsafe path" in r.rejected[0]
    assert not list(tmp_path.rglob("escaped.py"))[1:]     # only the one we planted in the store


# --------------------------------------------------------------------------------------------
# HMAC signing
# --------------------------------------------------------------------------------------------
def test_hmac_signed_manifests(backend, fields, tmp_path, monkeypatch, caplog):
    key, wrong = b"k" * 32, b"w" * 32
    src = make_cache(tmp_path / "src")
    assert manager(backend, fields, src, key=key).publish({16: 1.0})
    fp = fingerprint(fields)
    (e,) = entry_paths(backend, fp)
    mpath = f"{backend[3]}/{fp}/{e}/manifest.json"
    m = json.loads(backend[2].cat_file(mpath))
    assert m["signature"]["alg"] == "hmac-sha256"

    assert manager(backend, fields, tmp_path / "ok", key=key).restore().loaded
    # no key configured on the reader: content hashes still checked, loads
    assert manager(backend, fields, tmp_path / "nokey").restore().loaded

    with caplog.at_level(logging.WARNING, logger="hybridserve.store"):
        r = manager(backend, fields, tmp_path / "wrong", key=wrong).restore()
    assert not r.loaded and "bad manifest signature" in r.rejected[0]
    assert "bad manifest signature" in caplog.text
    assert not (tmp_path / "wrong" / "a1b2c3").exists()

    # attacker swaps an artifact AND fixes its hash in the manifest: the hashes alone would pass,
    # the signature does not
    import hashlib

    overwrite(backend, f"{backend[3]}/{fp}/{e}/files/a1b2c3/hs_kernel_mod.py", EVIL_SRC.encode())
    m["files"]["a1b2c3/hs_kernel_mod.py"]["sha256"] = hashlib.sha256(EVIL_SRC.encode()).hexdigest()
    overwrite(backend, mpath, json.dumps(m).encode())
    r = manager(backend, fields, tmp_path / "mod", key=key).restore()
    assert not r.loaded and "bad manifest signature" in r.rejected[0]
    marker = tmp_path / "marker"
    assert import_kernel(tmp_path / "mod", marker, monkeypatch) is False and not marker.exists()

    # unsigned manifest while a key is configured: rejected
    del m["signature"]
    overwrite(backend, mpath, json.dumps(m).encode())
    r = manager(backend, fields, tmp_path / "unsigned", key=key).restore()
    assert not r.loaded and "not signed" in r.rejected[0]


def test_hmac_key_from_env(monkeypatch, fields, tmp_path):
    monkeypatch.delenv("HS_TEST_KEY", raising=False)
    assert hmac_key_from_env("HS_TEST_KEY") is None
    monkeypatch.setenv("HS_TEST_KEY", "s3cret")
    assert hmac_key_from_env("HS_TEST_KEY") == b"s3cret"
    from engine.config import EngineConfig

    cfg = EngineConfig(model="tiny", store=str(tmp_path / "st"), store_hmac_key_env="HS_TEST_KEY")
    m = ArtifactManager.from_config(cfg, fields, tmp_path / "c")
    assert m.hmac_key == b"s3cret" and m.store_url == cfg.store


# --------------------------------------------------------------------------------------------
# concurrent publishers
# --------------------------------------------------------------------------------------------
def _assert_store_valid(backend, fields, tmp_path, n_entries):
    url, opts = backend[0], backend[1]
    store = ArtifactStore(url, storage_options=opts)
    infos = store.ls()
    assert len(infos) == n_entries and all(i.complete for i in infos)
    assert all(r.ok for r in store.verify())
    dst = tmp_path / ("dst-" + uuid.uuid4().hex[:6])
    r = manager(backend, fields, dst).restore()
    assert r.loaded and r.rejected == []
    # exactly one entry's files (no mixing)
    man = next(store.read_manifest(i.fingerprint, i.entry) for i in infos if i.entry == r.entry)
    assert scan_dir(dst) == man["files"]
    return r


@pytest.mark.parametrize("same_content", [True, False], ids=["same", "different"])
def test_concurrent_publishers_threads(backend, fields, tmp_path, same_content):
    n = 4
    srcs = [make_cache(tmp_path / f"src{i}", salt="" if same_content else str(i)) for i in range(n)]
    barrier = threading.Barrier(n)
    results = [None] * n

    def work(i):
        m = manager(backend, fields, srcs[i])
        barrier.wait()
        results[i] = m.publish({16: 1.0, 64: 4.0})
        results[i] = (results[i], m.last_publish)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    created = [r[0] for r in results]
    assert all(r[1] is not None for r in results)       # nobody failed
    if same_content:
        assert created.count(True) == 1                 # one winner, the rest saw it present
        _assert_store_valid(backend, fields, tmp_path, 1)
    else:
        assert created.count(True) == n
        _assert_store_valid(backend, fields, tmp_path, n)


_WORKER = textwrap.dedent("""\
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    from engine.store import ArtifactManager
    url, opts, fields, src, start = sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5], float(sys.argv[6])
    m = ArtifactManager(url, None, fields, src, storage_options=opts or None, torch_cache=False)
    while time.time() < start:
        time.sleep(0.001)
    ok = m.publish({16: 1.0, 64: 4.0})
    print(json.dumps({"created": ok, "entry": m.last_publish.entry if m.last_publish else None}))
""")


@pytest.mark.parametrize("same_content", [True, False], ids=["same", "different"])
def test_concurrent_publishers_processes(backend, fields, tmp_path, same_content):
    n = 3
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    srcs = [make_cache(tmp_path / f"src{i}", salt="" if same_content else str(i)) for i in range(n)]
    # bigger payload so the uploads overlap in time
    for i, s in enumerate(srcs):
        (s / "blob.bin").write_bytes((b"%d" % (0 if same_content else i)) * 2**20)
    start = time.time() + 8.0          # all start publishing at the same instant
    procs = [subprocess.Popen([sys.executable, str(script), str(REPO), backend[0],
                               json.dumps(backend[1]), json.dumps(fields), str(s), str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in srcs]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert all(o["entry"] for o in outs)
    created = [o["created"] for o in outs]
    if same_content:
        assert created.count(True) == 1 and len({o["entry"] for o in outs}) == 1
        _assert_store_valid(backend, fields, tmp_path, 1)
    else:
        assert created.count(True) == n
        _assert_store_valid(backend, fields, tmp_path, n)


def test_incomplete_entry_ignored(backend, fields, tmp_path):
    """A publisher that died after uploading files but before the manifest leaves no entry."""
    fp = fingerprint(fields)
    _, _, fs, root = backend
    fs.makedirs(f"{root}/{fp}/deadbeef/files/a1b2c3", exist_ok=True)
    fs.pipe_file(f"{root}/{fp}/deadbeef/files/a1b2c3/hs_kernel_mod.py", EVIL_SRC.encode())
    fs.invalidate_cache()
    dst = tmp_path / "dst"
    r = manager(backend, fields, dst).restore()
    assert not r.loaded and r.rejected == []
    assert not dst.exists() or list(dst.rglob("*")) == []
    (info,) = ArtifactStore(backend[0], storage_options=backend[1]).ls()
    assert not info.complete


# --------------------------------------------------------------------------------------------
# prune
# --------------------------------------------------------------------------------------------
def test_prune(backend, fields, tmp_path):
    url, opts, fs, root = backend
    fp = fingerprint(fields)
    for i in range(3):
        assert manager(backend, fields, make_cache(tmp_path / f"s{i}", salt=str(i))).publish({16: float(i)})
        time.sleep(0.02)
    other = {**fields, "dtype": "bfloat16"}
    assert manager(backend, other, make_cache(tmp_path / "o")).publish({16: 1.0})
    fs.makedirs(f"{root}/{fp}/abandoned/files", exist_ok=True)
    fs.pipe_file(f"{root}/{fp}/abandoned/files/x.bin", b"partial")
    if backend[1] is None:
        (Path(root) / fp / ".tmp-abc-123").mkdir()
    fs.invalidate_cache()
    store = ArtifactStore(url, storage_options=opts)
    newest = max((i for i in store.ls(fp) if i.complete), key=lambda i: i.created)

    # young incomplete entries survive (a publisher may still be writing)
    removed = store.prune(keep=1, incomplete_grace_s=3600)
    assert len(removed) == 2 and all(fp in r for r in removed)
    assert "abandoned" in entry_paths(backend, fp)
    removed = store.prune(keep=1, incomplete_grace_s=0, dry_run=True)
    assert any("abandoned" in r for r in removed)
    assert "abandoned" in entry_paths(backend, fp)
    store.prune(keep=1, incomplete_grace_s=0)
    assert entry_paths(backend, fp) == [newest.entry]
    assert len(entry_paths(backend, fingerprint(other))) == 1
    assert store.latest_pointer(fp) == newest.entry
    assert all(r.ok for r in store.verify())
    r = manager(backend, fields, tmp_path / "dst").restore()
    assert r.loaded and r.entry == newest.entry and r.warm_buckets == {16: 2.0}


def test_prune_invalid(fields, tmp_path):
    url = str(tmp_path / "store")
    ArtifactManager(url, None, fields, make_cache(tmp_path / "src"), torch_cache=False).publish({16: 1.0})
    store = ArtifactStore(url)
    (info,) = store.ls()
    (tmp_path / "store" / info.fingerprint / info.entry / "files" / "a1b2c3" / "kernel.cubin").write_bytes(b"x")
    assert store.prune(keep=5) == []
    assert store.prune(keep=5, remove_invalid=True) == [f"{info.fingerprint}/{info.entry}"]
    assert store.ls() == [] and store.fingerprints() == []


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def cli(argv: list[str]) -> int:
    from deployments.cli import main

    return main(argv)


def test_cli_store_ls_verify_prune(fields, tmp_path, capsys, monkeypatch):
    url = str(tmp_path / "store")
    ArtifactManager(url, None, fields, make_cache(tmp_path / "s1"), torch_cache=False).publish({16: 1.0, 128: 9.0})
    time.sleep(0.01)
    ArtifactManager(url, None, fields, make_cache(tmp_path / "s2", salt="x"), torch_cache=False).publish({16: 1.0})
    store = ArtifactStore(url)
    entries = sorted(store.ls(), key=lambda i: i.created)
    capsys.readouterr()

    assert cli(["store", "ls", "--store", url]) == 0
    out = capsys.readouterr().out
    for i in entries:
        assert i.entry in out
    assert "16,128" in out and "(latest)" in out

    assert cli(["store", "ls", "--store", url, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {d["entry"] for d in data} == {i.entry for i in entries}

    assert cli(["store", "verify", "--store", url]) == 0
    out = capsys.readouterr().out
    assert "2 entries checked, 0 failed" in out

    old = entries[0]
    (tmp_path / "store" / old.fingerprint / old.entry / "files" / "a1b2c3" / "hs_kernel_mod.py").write_text(EVIL_SRC)
    assert cli(["store", "verify", "--store", url]) == 1
    out = capsys.readouterr().out
    assert f"FAILED  {old.fingerprint}/{old.entry}" in out and "sha256 mismatch" in out

    assert cli(["store", "prune", "--store", url, "--keep", "1", "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out and len(store.ls()) == 2
    assert cli(["store", "prune", "--store", url, "--keep", "1"]) == 0
    assert [i.entry for i in store.ls()] == [entries[1].entry]

    # signed verification through the CLI's key env
    monkeypatch.setenv("HS_CLI_KEY", "abc")
    assert cli(["store", "verify", "--store", url, "--key-env", "HS_CLI_KEY"]) == 1
    assert "not signed" in capsys.readouterr().out


def test_cli_store_ls_s3(s3_server, fields, tmp_path, capsys):
    import s3fs

    bucket = "hs-cli-" + uuid.uuid4().hex[:8]
    s3fs.S3FileSystem(**s3_opts(s3_server)).mkdir(bucket)
    url = f"s3://{bucket}/a"
    ArtifactManager(url, None, fields, make_cache(tmp_path / "s"), storage_options=s3_opts(s3_server),
                    torch_cache=False).publish({32: 2.0})
    capsys.readouterr()
    assert cli(["store", "ls", "--store", url, "--endpoint-url", s3_server, "--json"]) == 0
    (d,) = json.loads(capsys.readouterr().out)
    assert d["complete"] and d["warm_buckets"] == {"32": 2.0}
    assert cli(["store", "verify", "--store", url, "--endpoint-url", s3_server]) == 0


def test_cli_warm_parser():
    import argparse

    from deployments import cli_store

    p = argparse.ArgumentParser()
    cli_store.add_parser(p.add_subparsers(dest="command"))
    a = p.parse_args(["warm", "--preset", "llama-2-7b", "--store", "/x", "--buckets", "16,64"])
    assert a.func is cli_store.cmd_warm and a.buckets == [16, 64] and a.device == "cuda"


# --------------------------------------------------------------------------------------------
# bench/warmstart.py: the harness, in its CPU dry mode (the real run needs an H100)
# --------------------------------------------------------------------------------------------
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
    assert doc["target"]["met"] is False        # no graphs on CPU
