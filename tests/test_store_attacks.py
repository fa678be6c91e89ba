"""Issue 25's attacks on the artifact store, each tried as a writer of the store (or, for the
deadline, a store that never answers) on a local directory and on moto's S3 server. Every test
would pass the attack through the replaced engine/store.py: unsigned manifests loaded, hashes
trusted from the writer's own manifest, torch's mega-cache loaded, any file kind restored,
unsigned ``created`` ranked first, files read whole, no deadline."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from store_fixtures import (ARTIFACTS, KEY, backend, cache_files, entry_ids, fields, keypair,  # noqa: F401
                            make_cache, manager, other_keypair, overwrite, reader, s3_server)

from artifacts import fingerprint, load_private_key
from artifacts import manifest as mf
from artifacts.kinds import collect

GOOD = {f"triton/{KEY}/rope.cubin": b"\x7fELF" + b"\x01" * 500, f"triton/{KEY}/rope.json": b"{}"}


def plant(backend, fields, files: dict[str, bytes], *, sign: str | None = None, entry: str = "e1",
          created: float | None = None, extra: dict | None = None, blobs: dict[str, bytes] | None = None) -> dict:
    """Write an entry straight into the store, as anyone with write access can."""
    fp = fingerprint(fields)
    meta = {k: {"sha256": hashlib.sha256(v).hexdigest(), "size": len(v)} for k, v in files.items()}
    m = mf.build(fp, entry, fields, meta, {16: 1.0}, {})
    if created is not None:
        m["created"] = created
    if blobs:
        m["blobs"] = {k: {"sha256": hashlib.sha256(v).hexdigest(), "size": len(v)} for k, v in blobs.items()}
        for k, v in blobs.items():
            overwrite(backend, f"{backend[3]}/{fp}/{entry}/blobs/{k}", v)
    m.update(extra or {})
    if sign is not None:
        m = mf.sign(m, load_private_key(sign))
    for rel, data in files.items():
        if not rel.startswith("/") and ".." not in rel:
            overwrite(backend, f"{backend[3]}/{fp}/{entry}/files/{rel}", data)
    overwrite(backend, f"{backend[3]}/{fp}/{entry}/manifest.json", json.dumps(m).encode())
    return m


def tree(d: Path) -> set[str]:
    return {p.relative_to(d).as_posix() for p in d.rglob("*")}


# ---- who may write: only the holder of the private key -------------------------------------
def test_unsigned_entry_rejected_by_default(backend, fields, tmp_path, keypair, other_keypair):
    _, pub = keypair
    plant(backend, fields, GOOD, entry="unsigned")
    plant(backend, fields, GOOD, entry="otherkey", sign=other_keypair[0])
    r = manager(backend, fields, tmp_path / "c0").restore()            # a default replica
    assert not r.loaded and "no trusted key" in r.error and cache_files(tmp_path / "c0") == []
    r = manager(backend, fields, tmp_path / "c1", public=[pub]).restore()
    assert not r.loaded and cache_files(tmp_path / "c1") == []
    why = " ".join(r.rejected)
    assert "unsigned" in why and "is not signed" in why and "otherkey" in why and "does not verify" in why


def test_swapped_file_with_fixed_hash_rejected(backend, fields, tmp_path, keypair):
    """The writer swaps a kernel and puts its sha256 in the manifest: the signature breaks."""
    priv, pub = keypair
    m = plant(backend, fields, GOOD, sign=priv)
    assert manager(backend, fields, tmp_path / "ok", public=[pub]).restore().loaded     # control
    evil = b"\x7fELF" + b"\x02" * 500
    rel = f"triton/{KEY}/rope.cubin"
    fp = fingerprint(fields)
    overwrite(backend, f"{backend[3]}/{fp}/e1/files/{rel}", evil)
    m["files"][rel]["sha256"] = hashlib.sha256(evil).hexdigest()
    overwrite(backend, f"{backend[3]}/{fp}/e1/manifest.json", json.dumps(m).encode())
    r = manager(backend, fields, tmp_path / "c", public=[pub]).restore()
    assert not r.loaded and "does not verify" in r.rejected[0] and cache_files(tmp_path / "c") == []


# ---- what a replica loads: Triton kernel files, inside its cache dir, nothing else ------------
def _mega_cache_writing(target: Path) -> bytes:
    """A real torch mega-cache blob whose artifact key is an absolute path: loading it with
    torch.compiler.load_cache_artifacts writes ``target``."""
    from torch._inductor.runtime.autotune_cache import AutotuneCacheArtifact
    from torch.compiler._cache import _serialize_single_cache
    from torch.utils._appending_byte_serializer import AppendingByteSerializer

    ser = AppendingByteSerializer(serialize_fn=_serialize_single_cache)
    ser.append(("autotune", [AutotuneCacheArtifact(str(target), b"import os  # ran at startup\n")]))
    return ser.to_bytes()


def test_torch_mega_cache_and_absolute_keys_never_loaded(backend, fields, tmp_path, keypair):
    priv, pub = keypair
    outside = tmp_path / "outside"
    blob = _mega_cache_writing(outside / "evil.pth")
    # positive control, in a throwaway process: the blob does write where its key says
    ctl = tmp_path / "control" / "proof.pth"
    code = ("import sys, torch; torch.compiler.load_cache_artifacts(open(sys.argv[1], 'rb').read())")
    (tmp_path / "ctl.bin").write_bytes(_mega_cache_writing(ctl))
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "ctl.bin")], check=True, timeout=300)
    assert ctl.exists()
    # signed by the trusted key, even: a blob is not a kind the replica loads
    plant(backend, fields, GOOD, sign=priv, entry="mega", blobs={"torch_mega_cache.bin": blob})
    for i, rel in enumerate((str(outside / "evil.pth"), "../../outside/evil.pth")):
        plant(backend, fields, {**GOOD, rel: b"import os\n"}, sign=priv, entry=f"abs{i}")
    cache = tmp_path / "cache"
    before = tree(tmp_path)
    r = manager(backend, fields, cache, public=[pub]).restore()
    assert not r.loaded and cache_files(cache) == [] and not outside.exists()
    why = " ".join(r.rejected)
    assert "mega-cache is never loaded" in why and why.count("unsafe path") == 2
    assert {p for p in tree(tmp_path) - before if not p.startswith(("cache", "store"))} == set()


@pytest.mark.parametrize("rel", [f"triton/{KEY}/__triton_launcher.so", f"triton/{KEY}/cuda_utils.so",
                                 f"triton/{KEY}/hook.py", "sitecustomize.py", f"triton/{KEY}/sub/rope.cubin",
                                 f"triton/{KEY}/rope.cubin.so"])
def test_unknown_kinds_not_restored(backend, fields, tmp_path, keypair, rel):
    priv, pub = keypair
    plant(backend, fields, {**GOOD, rel: b"\x7fELF host code"}, sign=priv)
    r = manager(backend, fields, tmp_path / "c", public=[pub]).restore()
    assert not r.loaded and "unknown artifact kind" in r.rejected[0] and cache_files(tmp_path / "c") == []


def test_publish_collects_only_kernel_files(tmp_path):
    src = make_cache(tmp_path / "src")
    (src / "triton" / "evil_link").symlink_to(tmp_path)
    (src / "triton" / KEY / "link.cubin").symlink_to(src / "triton" / KEY / "rope.cubin")
    files, rewritten = collect(src)
    assert set(files) == ARTIFACTS and set(rewritten) == {f"triton/{KEY}/__grp__rope.json"}
    assert json.loads(rewritten[f"triton/{KEY}/__grp__rope.json"]) == {
        "child_paths": {n: n for n in ("rope.cubin", "rope.json", "rope.ptx")}}


@pytest.mark.parametrize("rel", ["../../escape.cubin", "triton/../../escape.cubin",
                                 f"triton/{KEY}/../../../escape.cubin", "/tmp/escape.cubin",
                                 f"triton//{KEY}/escape.cubin", f"triton\\{KEY}\\escape.cubin"])
def test_paths_out_of_the_cache_rejected(backend, fields, tmp_path, keypair, rel):
    priv, pub = keypair
    plant(backend, fields, {**GOOD, rel: b"\x7fELF"}, sign=priv)
    before = tree(tmp_path)
    r = manager(backend, fields, tmp_path / "c", public=[pub]).restore()
    assert not r.loaded and "unsafe path" in r.rejected[0]
    assert {p for p in tree(tmp_path) - before if not p.startswith("c")} == set()


def test_group_file_pointing_outside_rejected(backend, fields, tmp_path, keypair):
    priv, pub = keypair
    grp = json.dumps({"child_paths": {"rope.cubin": "/tmp/attacker/rope.cubin"}}).encode()
    plant(backend, fields, {**GOOD, f"triton/{KEY}/__grp__rope.json": grp}, sign=priv)
    r = manager(backend, fields, tmp_path / "c", public=[pub]).restore()
    assert not r.loaded and "points elsewhere" in r.rejected[0] and cache_files(tmp_path / "c") == []


@pytest.mark.parametrize("where", ["store-file", "store-dir", "cache-dir"])
def test_symlinks_rejected(fields, tmp_path, keypair, where):
    priv, pub = keypair
    b = (str(tmp_path / "store"), None, __import__("fsspec").filesystem("file"), str(tmp_path / "store"))
    plant(b, fields, GOOD, sign=priv)
    fp = fingerprint(fields)
    outside = tmp_path / "outside"
    outside.mkdir()
    kdir = tmp_path / "store" / fp / "e1" / "files" / "triton" / KEY
    cache = tmp_path / "cache"
    if where == "store-file":       # genuine bytes, but the store's file is a link out of it
        (outside / "rope.cubin").write_bytes(GOOD[f"triton/{KEY}/rope.cubin"])
        (kdir / "rope.cubin").unlink()
        (kdir / "rope.cubin").symlink_to(outside / "rope.cubin")
        want = "symlink"
    elif where == "store-dir":
        os.rename(kdir, outside / KEY)
        kdir.symlink_to(outside / KEY)
        want = "symlinked directory"
    else:                           # someone planted <cache>/triton -> outside
        cache.mkdir()
        (cache / "triton").symlink_to(outside)
        want = "leads out of it"
    before = tree(outside)
    r = manager(b, fields, cache, public=[pub]).restore()
    assert not r.loaded and want in r.rejected[0], r.rejected
    assert tree(outside) == before


# ---- ranking and pruning look only at verified entries ---------------------------------------
def test_junk_cannot_outrank_or_prune_valid_entries(backend, fields, tmp_path, keypair, other_keypair):
    priv, pub = keypair
    plant(backend, fields, GOOD, sign=priv, entry="valid")
    future = time.time() + 10**6
    for i in range(4):
        plant(backend, fields, GOOD, entry=f"junk{i}", created=future + i)
    plant(backend, fields, GOOD, sign=other_keypair[0], entry="junk-other", created=future)
    m = plant(backend, fields, GOOD, sign=priv, entry="junk-resigned")
    m["created"] = future                     # a valid entry's manifest with created pushed ahead
    overwrite(backend, f"{backend[3]}/{fingerprint(fields)}/junk-resigned/manifest.json", json.dumps(m).encode())
    r = manager(backend, fields, tmp_path / "c", public=[pub]).restore()
    assert r.loaded and r.entry == "valid" and len(r.rejected) == 6
    store = reader(backend, [pub])
    assert [i.entry for i in store.ls() if i.latest] == ["valid"]
    assert store.prune(keep=1) == [] and store.prune(keep=2) == []
    assert "valid" in entry_ids(backend, fingerprint(fields))
    assert len(store.prune(keep=1, remove_invalid=True)) == 6
    assert entry_ids(backend, fingerprint(fields)) == ["valid"]


# ---- reads stop at the declared size ---------------------------------------------------------
@pytest.mark.parametrize("path", ["batched", "streamed"])
def test_oversized_file_not_read_whole(backend, fields, tmp_path, keypair, monkeypatch, path):
    import artifacts.store as st

    if path == "streamed":
        monkeypatch.setattr(st, "SMALL_FILE", 100)
    priv, pub = keypair
    plant(backend, fields, {**GOOD, f"triton/{KEY}/big.cubin": b"\x00" * 4000}, sign=priv)
    fp = fingerprint(fields)
    target = f"{backend[3]}/{fp}/e1/files/triton/{KEY}/big.cubin"
    if backend[1] is None:
        big = 512 * 2**20
        with open(target, "r+b") as f:
            f.truncate(big)               # sparse: 512 MiB on paper, no disk used
    else:
        big = 48 * 2**20
        overwrite(backend, target, b"\x00" * big)
    tracemalloc.start()
    try:
        r = manager(backend, fields, tmp_path / "c", public=[pub]).restore()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not r.loaded and "larger than" in r.rejected[0] and cache_files(tmp_path / "c") == []
    print(f"\nPEAK {path} {backend[0][:2]} {peak / 2**20:.2f} MiB for {big >> 20} MiB")
    assert peak < 16 * 2**20 < big, f"restore allocated {peak / 2**20:.1f} MiB for a {big >> 20} MiB file"


# ---- restore has an overall deadline ---------------------------------------------------------
@pytest.fixture
def hung_endpoint():
    """A listener on 127.0.0.1 that accepts connections and never answers."""
    import s3fs  # noqa: F401 - imported up front: the deadline then measures the store, not imports

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held, stop = [], threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}", held
    stop.set()
    t.join(2)
    for c in held:
        c.close()
    srv.close()


DEADLINE = 4.0
SLACK = 1.5         # the 2-core CI host is shared: a thread's join can return late under load


def _hung_cfg(endpoint: str, pub: str, timeout: float) -> dict:
    return dict(store="s3://hung-bucket/x", store_public_keys=[pub], store_restore_timeout_s=timeout,
                store_options={"endpoint_url": endpoint, "key": "a", "secret": "b", "skip_instance_cache": True})


def test_hung_store_restore_gives_up_at_deadline(hung_endpoint, fields, tmp_path, keypair):
    from artifacts import ArtifactManager, StoreConfig

    endpoint, held = hung_endpoint
    m = ArtifactManager(StoreConfig(**_hung_cfg(endpoint, keypair[1], DEADLINE)), fields, tmp_path / "c")
    t0 = time.monotonic()
    r = m.restore()
    took = time.monotonic() - t0
    assert held, "the client never reached the hung listener"
    assert not r.loaded and f"deadline of {DEADLINE:g} s passed" in r.error, r
    assert DEADLINE - 0.1 < took < DEADLINE + SLACK, took
    assert cache_files(tmp_path / "c") == []


def test_engine_starts_cold_when_the_store_hangs(hung_endpoint, tmp_path, keypair):
    from engine import EngineConfig, HybridEngine, SamplingParams

    endpoint, held = hung_endpoint
    t0 = time.monotonic()
    eng = HybridEngine(EngineConfig(model="tiny", device="cpu", cache_dir=str(tmp_path / "cache"),
                                    **_hung_cfg(endpoint, keypair[1], DEADLINE)))
    try:
        took = time.monotonic() - t0
        print(f"\nENGINE start with a hung store: {took:.2f} s, restore {eng.restore_result.seconds:.2f} s")
        events = []
        eng.add_listener(events.append)
        res = eng.restore_result
        assert held and not res.loaded and "deadline" in res.error and res.seconds < DEADLINE + SLACK
        assert took < DEADLINE + 30, took           # the tiny model itself starts in seconds
        assert any(e.get("type") == "store" and e.get("action") == "reject" and "deadline" in e.get("reason", "")
                   for e in events), events
        assert eng.generate("cold start", SamplingParams(max_tokens=4, temperature=0.0)).token_ids
    finally:
        eng.shutdown()
