"""The store: fingerprint-keyed entries of Triton kernel files and warm lists, on any fsspec URL.

Layout (a local directory or ``s3://bucket/prefix``)::

    <root>/<fingerprint>/<entry-id>/files/triton/<key>/<file>    artifact files
    <root>/<fingerprint>/<entry-id>/manifest.json                written last: present = complete

Only entries whose manifest passes ``manifest.check`` under the reader's ``Trust`` are loaded,
ranked (by their signed ``created``) or pruned; every file is read capped at its declared size and
sha256-checked in a staging directory before anything is moved into the cache directory.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import maintain
from . import manifest as mf
from .backend import Backend, progress_bar
from .kinds import Rejected, is_group, localize_group
from .maintain import EntryInfo, VerifyReport
from .publish import PublishResult, publish

log = logging.getLogger("hybridserve.store")

SMALL_FILE = 8 * 2**20             # files up to this size are fetched in concurrent batches
_BATCH_BYTES = 64 * 2**20

# progress(total_bytes, description) -> object with .update(n) and .close() (tqdm fits)
ProgressFactory = Callable[[int, str], Any]


class DeadlinePassed(Rejected):
    pass


class Deadline:
    """An overall time limit; ``lock`` serialises the final move into the cache with a cancel."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds
        self.lock = threading.Lock()
        self.cancelled = False

    def remaining(self) -> float | None:
        return None if self.end is None else max(0.0, self.end - time.monotonic())

    def check(self) -> None:
        if self.cancelled or (self.end is not None and time.monotonic() > self.end):
            raise DeadlinePassed(f"restore deadline of {self.seconds:g} s passed")


@dataclass
class LoadResult:
    fingerprint: str
    entry: str | None = None
    files: list[str] = field(default_factory=list)                 # relpaths placed in dest_dir
    warm_buckets: dict[int, float] = field(default_factory=dict)   # bucket -> capture cost (ms)
    warm_batches: dict[int, float] = field(default_factory=dict)   # batch size -> capture ms
    rejected: list[str] = field(default_factory=list)              # refused: trust / integrity
    skipped: list[str] = field(default_factory=list)               # not for here (fingerprint)
    manifest: dict | None = None
    bytes: int = 0
    seconds: float = 0.0

    @property
    def loaded(self) -> bool:
        return self.entry is not None


class ArtifactStore:
    """``trust``: what this reader loads. ``signing_key``: publishes signed (and trusts itself)."""

    def __init__(self, url: str, trust: mf.Trust | None = None, storage_options: dict | None = None,
                 signing_key: Ed25519PrivateKey | None = None):
        self.io = Backend(url, storage_options)
        trust = trust or mf.Trust()
        if signing_key is not None:
            trust = mf.Trust(trust.public_keys + (signing_key.public_key(),), trust.unsigned)
        if trust.unsigned and not self.io.local:
            raise ValueError(f"unsigned entries are trusted only in a local directory, not {url}; "
                             "sign with `hybridserve store keygen` keys instead")
        self.trust = trust
        self.signing_key = signing_key

    @property
    def url(self) -> str:
        return self.io.url

    @property
    def local(self) -> bool:
        return self.io.local

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r}, trust={self.trust.describe()})"

    def exists(self) -> bool:
        return self.io.exists()

    def fingerprints(self) -> list[str]:
        return [n for n in self.io.ls_dirs(self.io.root) if not n.startswith(".")]

    def entry_ids(self, fp: str) -> list[str]:
        return [n for n in self.io.ls_dirs(self.io.p(fp)) if not n.startswith(".")]

    def read_manifest(self, fp: str, entry: str) -> dict:
        """FileNotFoundError for an incomplete entry; Rejected for junk."""
        return mf.parse(self.io.read_capped(self.io.p(fp, entry, mf.MANIFEST), mf.MAX_MANIFEST_BYTES))

    # ---- reading ---------------------------------------------------------------------------
    def verified(self, fp: str, fields: dict | None = None, res: LoadResult | None = None,
                 deadline: Deadline | None = None) -> list[mf.Verified]:
        """The entries of ``fp`` this reader trusts, newest first; refusals go into ``res``."""
        out = []
        for e in self.entry_ids(fp):
            if deadline:
                deadline.check()
            try:
                m = self.read_manifest(fp, e)
                out.append(mf.Verified(e, m, mf.check(m, fp, e, self.trust, fields)))
            except FileNotFoundError:
                continue                    # incomplete: a publisher still running or crashed
            except mf.FingerprintMismatch as ex:
                if res is not None:
                    res.skipped.append(f"entry {fp}/{e}: fingerprint mismatch ({ex}); not loaded")
            except DeadlinePassed:
                raise
            except (Rejected, OSError) as ex:
                if res is not None:
                    res.rejected.append(f"entry {fp}/{e}: rejected: {ex}")
        return sorted(out, key=lambda v: (-v.created, v.entry))

    def _fetch(self, fp: str, v: mf.Verified, staging: Path, dest: Path, bar,
               deadline: Deadline | None) -> None:
        """Every file of ``v`` into staging, size-capped and sha256-checked."""
        base = self.io.p(fp, v.entry, "files")

        def place(rel: str, data: bytes) -> None:
            meta = v.files[rel]
            if len(data) != meta["size"]:
                how = "larger than" if len(data) > meta["size"] else f"size {len(data)} !="
                raise Rejected(f"files/{rel}: {how} manifest size {meta['size']} (truncated or modified)")
            if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise Rejected(f"files/{rel}: sha256 mismatch (modified)")
            if is_group(rel):
                data = localize_group(data, dest / rel.rsplit("/", 1)[0])
            out = staging / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
            bar.update(meta["size"])

        small = [r for r, m in v.files.items() if m["size"] <= SMALL_FILE]
        batch: dict[str, int] = {}
        for rel in small + [None]:
            if rel is not None:
                batch[posixpath.join(base, rel)] = v.files[rel]["size"]
            if batch and (rel is None or sum(batch.values()) >= _BATCH_BYTES or len(batch) >= 256):
                if deadline:
                    deadline.check()
                got = self.io.read_many(batch)
                for path in batch:
                    r = path[len(base) + 1:]
                    data = got.get(path)
                    if isinstance(data, Rejected):
                        raise Rejected(f"files/{r}: {data}")
                    if not isinstance(data, (bytes, bytearray)):
                        raise Rejected(f"files/{r}: missing or unreadable ({data!r})"[:300])
                    place(r, bytes(data))
                batch = {}
        for rel, meta in v.files.items():
            if meta["size"] > SMALL_FILE:
                self._stream(posixpath.join(base, rel), rel, meta, staging / rel, bar, deadline)

    def _stream(self, path: str, rel: str, meta: dict, out: Path, bar, deadline) -> None:
        h, size = hashlib.sha256(), 0
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(out, "wb") as dst:
                for chunk in self.io.chunks(path, meta["size"]):
                    size += len(chunk)
                    if size > meta["size"]:
                        raise Rejected(f"files/{rel}: larger than manifest size {meta['size']}")
                    h.update(chunk)
                    dst.write(chunk)
                    bar.update(len(chunk))
                    if deadline:
                        deadline.check()
        except FileNotFoundError:
            raise Rejected(f"files/{rel}: missing") from None
        if size != meta["size"]:
            raise Rejected(f"files/{rel}: size {size} != manifest {meta['size']} (truncated or modified)")
        if h.hexdigest() != meta["sha256"]:
            raise Rejected(f"files/{rel}: sha256 mismatch (modified)")

    @staticmethod
    def _commit(files: list[str], staging: Path, dest: Path) -> None:
        """Move verified files into dest, creating directories one level at a time: a symlink on
        the way (planted in the cache) is refused before anything is created through it."""
        for rel in files:
            d = dest
            for part in rel.split("/")[:-1]:
                d = d / part
                if d.is_symlink() or (d.exists() and not d.is_dir()):
                    raise Rejected(f"files/{rel}: {d} in the cache leads out of it (symlink or not a directory)")
                d.mkdir(exist_ok=True)
            target = dest / rel
            if target.is_symlink():
                target.unlink()             # replace the link itself, never write through it
            os.replace(staging / rel, target)

    def load(self, fp: str, dest_dir: str | os.PathLike, fields: dict | None = None,
             progress: ProgressFactory | None = None, deadline: Deadline | None = None) -> LoadResult:
        """Load the newest trusted, intact entry of ``fp`` into ``dest_dir`` (all or nothing)."""
        t0 = time.perf_counter()
        res = LoadResult(fingerprint=fp)
        dest = Path(os.path.abspath(dest_dir))
        cands = self.verified(fp, fields, res, deadline)
        if not cands and not res.rejected and not res.skipped:
            res.skipped.append(f"no entry for fingerprint {fp}")
        for v in cands:
            total = sum(m["size"] for m in v.files.values())
            dest.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=dest.parent))
            bar = progress_bar(progress, total, f"load {fp}/{v.entry}")
            try:
                self._fetch(fp, v, staging, dest, bar, deadline)
                with deadline.lock if deadline else contextlib.nullcontext():
                    if deadline:
                        deadline.check()
                    self._commit(sorted(v.files), staging, dest)
            except DeadlinePassed:
                raise
            except (Rejected, OSError) as e:
                msg = f"entry {fp}/{v.entry}: rejected: {e}"
                log.warning("artifact store %s: %s; nothing from this entry was loaded", self.url, msg)
                res.rejected.append(msg)
                continue
            finally:
                bar.close()
                shutil.rmtree(staging, ignore_errors=True)
            res.entry, res.files, res.manifest, res.bytes = v.entry, sorted(v.files), v.manifest, total
            res.warm_buckets = mf.warm_list(v.manifest, "warm_buckets")
            res.warm_batches = mf.warm_list(v.manifest, "warm_batches")
            break
        res.seconds = time.perf_counter() - t0
        if res.loaded:
            log.info("artifact store %s: loaded %s/%s: %d files, %d bytes, warm buckets %s, "
                     "batches %s in %.2fs", self.url, fp, res.entry, len(res.files), res.bytes,
                     sorted(res.warm_buckets), sorted(res.warm_batches), res.seconds)
        for msg in res.skipped:
            log.info("artifact store %s: %s", self.url, msg)
        return res

    # ---- publishing, listing, verifying, pruning: publish.py and maintain.py --------------
    def publish(self, fp: str, fields: dict, src_dir, warm_buckets: dict[int, float],
                warm_batches: dict[int, float] | None = None, progress: ProgressFactory | None = None,
                collected=None) -> PublishResult:
        return publish(self, fp, fields, src_dir, warm_buckets, warm_batches or {}, progress, collected)

    def ls(self, fp: str | None = None) -> list[EntryInfo]:
        return maintain.ls(self, fp)

    def verify(self, fp: str | None = None, entry: str | None = None,
               progress: ProgressFactory | None = None) -> list[VerifyReport]:
        return maintain.verify(self, fp, entry, progress)

    def prune(self, keep: int = 2, incomplete_grace_s: float = 3600.0, remove_invalid: bool = False,
              fp: str | None = None, dry_run: bool = False) -> list[str]:
        return maintain.prune(self, keep, incomplete_grace_s, remove_invalid, fp, dry_run)
