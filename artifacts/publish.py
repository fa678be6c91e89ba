"""Publishing an entry: the cache directory's Triton kernel files plus warm lists, signed.

Atomic: locally the entry is assembled under ``.tmp-*`` and renamed into place; on object stores
the files go first and the manifest last with a conditional put (``If-None-Match: *``), so
concurrent publishers of the same content converge on one entry.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import manifest as mf
from .backend import TMP_PREFIX, progress_bar
from .fingerprint import fingerprint
from .kinds import Rejected, check_kind, collect

log = logging.getLogger("hybridserve.store")
_BATCH_BYTES = 64 * 2**20


@dataclass
class PublishResult:
    fingerprint: str
    entry: str
    created: bool          # False: an identical entry was already there (or another publisher won)
    files: int
    bytes: int
    seconds: float = 0.0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            h.update(chunk)
    return h.hexdigest()


def publish(store, fp: str, fields: dict, src_dir, warm_buckets: dict[int, float],
            warm_batches: dict[int, float], progress=None, collected=None) -> PublishResult:
    """Publish ``src_dir``'s kernel files and the warm lists as one entry of ``fp``."""
    t0 = time.perf_counter()
    if fingerprint(fields) != fp:
        raise ValueError("fingerprint does not match fields")
    if store.signing_key is None and not store.trust.unsigned:
        raise ValueError("no signing key: replicas load only signed entries; set the private key of "
                         "`hybridserve store keygen` in the signing key's environment variable")
    files, rewritten = collected if collected is not None else (collect(src_dir) if src_dir else ({}, {}))
    for rel in files:
        try:
            check_kind(rel)
        except Rejected as e:
            raise ValueError(str(e)) from None
    entry = mf.entry_id(fp, files, warm_buckets, warm_batches)
    m = mf.build(fp, entry, fields, files, warm_buckets, warm_batches)
    if store.signing_key is not None:
        m = mf.sign(m, store.signing_key)
    mbytes = json.dumps(m, indent=1, sort_keys=True).encode()
    total = sum(v["size"] for v in files.values())
    bar = progress_bar(progress, total, f"publish {fp}/{entry}")
    src = Path(src_dir) if src_dir else None
    try:
        created = (_local if store.local else _remote)(store.io, fp, entry, src, files, rewritten,
                                                       mbytes, bar)
    finally:
        bar.close()
    log.info("artifact store %s: %s %s/%s: %d files, %d bytes, warm buckets %s, batches %s",
             store.url, "published" if created else "already present, not republished", fp, entry,
             len(files), total, sorted(warm_buckets), sorted(warm_batches))
    return PublishResult(fp, entry, created, len(files), total, time.perf_counter() - t0)


def _local(io, fp, entry, src, files, rewritten, mbytes, bar) -> bool:
    fp_dir = Path(io.p(fp))
    final = fp_dir / entry
    if (final / mf.MANIFEST).exists():
        return False
    fp_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{entry}-", dir=fp_dir))
    try:
        for rel, meta in files.items():
            dst = tmp / "files" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if rel in rewritten:
                dst.write_bytes(rewritten[rel])
            else:
                shutil.copyfile(src / rel, dst)
            if _sha256(dst) != meta["sha256"]:      # a live cache may change under us
                raise RuntimeError(f"{rel} changed while publishing; retry")
            bar.update(meta["size"])
        (tmp / mf.MANIFEST).write_bytes(mbytes)     # last: manifest present = complete
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        try:
            os.rename(tmp, final)                   # atomic; fails if another publisher won
        except OSError:
            if (final / mf.MANIFEST).exists():
                return False
            raise
        tmp = None
        return True
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _remote(io, fp, entry, src, files, rewritten, mbytes, bar) -> bool:
    mpath = io.p(fp, entry, mf.MANIFEST)
    if io.exists(mpath):
        return False
    batch: dict[str, bytes] = {}
    for rel, meta in files.items():
        data = rewritten[rel] if rel in rewritten else (src / rel).read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise RuntimeError(f"{rel} changed while publishing; retry")
        batch[io.p(fp, entry, "files", rel)] = data
        if sum(map(len, batch.values())) >= _BATCH_BYTES or len(batch) >= 256:
            io.fs.pipe(batch)
            bar.update(sum(map(len, batch.values())))
            batch = {}
    if batch:
        io.fs.pipe(batch)
        bar.update(sum(map(len, batch.values())))
    return io.put_if_absent(mpath, mbytes)   # manifest last: exactly one publisher wins
