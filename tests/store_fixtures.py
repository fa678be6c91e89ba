"""Shared pieces of the artifact-store tests: a real S3 API server (moto's standalone server, a
separate process on a free port, reached over HTTP through s3fs), a fresh store on either
backend, a Triton-like cache directory, key pairs and a manager built from a StoreConfig."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from artifacts import ArtifactManager, ArtifactStore, StoreConfig, Trust, fingerprint_fields, generate
from artifacts import load_public_key

MODEL_CFG = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2}
KEY = "QJ7WZ3BPK2M5"          # a Triton cache key directory name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fields():
    return fingerprint_fields(MODEL_CFG, "float16", "cpu")


@pytest.fixture(scope="session")
def keypair():
    return generate()


@pytest.fixture(scope="session")
def other_keypair():
    return generate()


def make_cache(d: Path, salt: str = "") -> Path:
    """What Triton leaves in TRITON_CACHE_DIR=<d>/triton for one kernel, plus non-artifacts."""
    k = d / "triton" / KEY
    k.mkdir(parents=True, exist_ok=True)
    (k / "rope.cubin").write_bytes(b"\x7fELF" + bytes(range(256)) * 40 + salt.encode())
    (k / "rope.ptx").write_text("//\n.version 8.4\n" + salt)
    (k / "rope.json").write_text(json.dumps({"name": "rope", "salt": salt}))
    (k / "__grp__rope.json").write_text(json.dumps({"child_paths": {
        n: str(k / n) for n in ("rope.cubin", "rope.ptx", "rope.json")}}))
    (k / "__triton_launcher.so").write_bytes(b"\x7fELF compiled host code")
    (k / "lock").write_text("")
    (d / "triton" / "tmp.pid_1_2").mkdir(exist_ok=True)
    return d


ARTIFACTS = {f"triton/{KEY}/{n}" for n in ("rope.cubin", "rope.ptx", "rope.json", "__grp__rope.json")}


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    port = free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    log_f = open(log_path, "wb")        # an unread pipe would fill up and block the server
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
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
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
    return {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
            "config_kwargs": {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 2}}}


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    """(url, storage_options, raw fsspec fs, root path) of a fresh, empty store."""
    if request.param == "local":
        import fsspec

        root = tmp_path / "store"
        return str(root), None, fsspec.filesystem("file"), str(root)
    import s3fs

    endpoint = request.getfixturevalue("s3_server")
    bucket = "hs-" + uuid.uuid4().hex[:12]
    fs = s3fs.S3FileSystem(**s3_opts(endpoint))
    fs.mkdir(bucket)
    return f"s3://{bucket}/artifacts", s3_opts(endpoint), fs, f"{bucket}/artifacts"


def manager(backend, fields, cache_dir, *, public=(), sign: str | None = None, unsigned=False,
            timeout: float = 60.0) -> ArtifactManager:
    """A replica's (``public``) or publisher's (``sign``: a private key text) manager."""
    url, opts = backend[0], backend[1]
    env = None
    if sign is not None:
        env = "HS_TEST_SIGNING_" + uuid.uuid4().hex[:8]
        os.environ[env] = sign
    cfg = StoreConfig(store=url, store_options=opts or {}, store_public_keys=list(public),
                      store_signing_key_env=env or "HS_TEST_NO_SUCH_VAR",
                      store_trust_unsigned_local=unsigned, store_restore_timeout_s=timeout)
    return ArtifactManager(cfg, fields, cache_dir)


def reader(backend, public=(), unsigned=False) -> ArtifactStore:
    return ArtifactStore(backend[0], Trust(tuple(load_public_key(k) for k in public), unsigned),
                         storage_options=backend[1])


def entry_ids(backend, fp):
    _, _, fs, root = backend
    fs.invalidate_cache()
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{fp}", detail=False))


def overwrite(backend, path: str, data: bytes) -> None:
    _, _, fs, _ = backend
    if backend[1] is None:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)
    fs.invalidate_cache()


def cache_files(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()) if d.exists() else []
