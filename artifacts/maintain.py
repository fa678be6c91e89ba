"""Operators' view of a store: list, verify and prune entries, under the reader's trust.

Pruning ranks only trusted entries (by their signed ``created``), so junk a writer without the
key drops into the store can neither push a valid entry out nor be kept in its place.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field

from . import manifest as mf
from .backend import TMP_PREFIX, progress_bar
from .kinds import Rejected

log = logging.getLogger("hybridserve.store")


@dataclass
class EntryInfo:
    fingerprint: str
    entry: str
    complete: bool
    trusted: bool = False
    error: str | None = None            # why this reader's trust refuses it
    signer: str | None = None           # key id of its signature, if any
    created: float | None = None
    files: int = 0
    bytes: int = 0
    warm_buckets: dict[int, float] = field(default_factory=dict)
    warm_batches: dict[int, float] = field(default_factory=dict)
    fields: dict = field(default_factory=dict)
    latest: bool = False                # the newest trusted entry of its fingerprint


@dataclass
class VerifyReport:
    fingerprint: str
    entry: str
    ok: bool
    errors: list[str] = field(default_factory=list)


def ls(store, fp: str | None = None) -> list[EntryInfo]:
    out = []
    for f in ([fp] if fp else store.fingerprints()):
        infos = []
        for e in store.entry_ids(f):
            info = EntryInfo(fingerprint=f, entry=e, complete=False)
            try:
                m = store.read_manifest(f, e)
            except FileNotFoundError:
                infos.append(info)
                continue
            except (Rejected, OSError) as ex:
                info.complete, info.error = True, str(ex)
                infos.append(info)
                continue
            info.complete = True
            info.signer = mf.signer(m)
            fl = m.get("files") if isinstance(m.get("files"), dict) else {}
            info.files = len(fl)
            info.bytes = sum(v.get("size", 0) for v in fl.values()
                             if isinstance(v, dict) and isinstance(v.get("size"), int))
            info.created = float(m["created"]) if isinstance(m.get("created"), (int, float)) else None
            info.warm_buckets = mf.warm_list(m, "warm_buckets")
            info.warm_batches = mf.warm_list(m, "warm_batches")
            info.fields = m.get("fields") if isinstance(m.get("fields"), dict) else {}
            try:
                mf.check(m, f, e, store.trust)
                info.trusted = True
            except Rejected as ex:
                info.error = str(ex)
            infos.append(info)
        trusted = [i for i in infos if i.trusted]
        if trusted:
            max(trusted, key=lambda i: (i.created, i.entry)).latest = True
        out.extend(infos)
    return out


def _verify_file(store, path: str, meta: dict, bar) -> str | None:
    h, size = hashlib.sha256(), 0
    try:
        for chunk in store.io.chunks(path, meta["size"]):
            size += len(chunk)
            if size > meta["size"]:
                return f"larger than manifest size {meta['size']}"
            h.update(chunk)
            bar.update(len(chunk))
    except FileNotFoundError:
        return "missing"
    except Rejected as e:
        return str(e)
    if size != meta["size"]:
        return f"size {size} != manifest {meta['size']} (truncated or modified)"
    if h.hexdigest() != meta["sha256"]:
        return "sha256 mismatch (modified)"
    return None


def verify(store, fp: str | None = None, entry: str | None = None, progress=None) -> list[VerifyReport]:
    """Check complete entries: manifest, trust, every file's size and sha256."""
    reports = []
    for f in ([fp] if fp else store.fingerprints()):
        for e in ([entry] if entry else store.entry_ids(f)):
            rep = VerifyReport(f, e, ok=False)
            try:
                files = mf.check(store.read_manifest(f, e), f, e, store.trust)
                bar = progress_bar(progress, sum(v["size"] for v in files.values()), f"verify {f}/{e}")
                try:
                    for rel, meta in files.items():
                        err = _verify_file(store, store.io.p(f, e, "files", rel), meta, bar)
                        if err:
                            rep.errors.append(f"files/{rel}: {err}")
                finally:
                    bar.close()
            except FileNotFoundError:
                rep.errors.append("incomplete entry (no manifest)")
            except (Rejected, OSError) as ex:
                rep.errors.append(str(ex))
            rep.ok = not rep.errors
            if not rep.ok:
                log.warning("artifact store %s: entry %s/%s failed verification: %s",
                            store.url, f, e, "; ".join(rep.errors))
            reports.append(rep)
    return reports


def prune(store, keep: int = 2, incomplete_grace_s: float = 3600.0, remove_invalid: bool = False,
          fp: str | None = None, dry_run: bool = False) -> list[str]:
    """Keep the ``keep`` newest trusted entries per fingerprint and remove older trusted ones;
    remove incomplete and temporary entries untouched for ``incomplete_grace_s`` (a publisher may
    still be writing younger ones). Untrusted entries stay unless ``remove_invalid``, which also
    removes trusted entries whose files fail verification. Returns the removed paths."""
    if keep < 0:
        raise ValueError("keep must be >= 0")
    removed: list[str] = []

    def rm(f: str, name: str) -> None:
        removed.append(f"{f}/{name}")
        if not dry_run:
            store.io.rm_tree(store.io.p(f, name))

    for f in ([fp] if fp else store.fingerprints()):
        if store.local and os.path.isdir(store.io.p(f)):
            for name in os.listdir(store.io.p(f)):     # local publishers' temp dirs
                if name.startswith(TMP_PREFIX) and store.io.age_s(store.io.p(f, name)) >= incomplete_grace_s:
                    rm(f, name)
        trusted = []
        for info in ls(store, f):
            if not info.complete:
                if store.io.age_s(store.io.p(f, info.entry)) >= incomplete_grace_s:
                    rm(f, info.entry)
            elif not info.trusted:
                if remove_invalid:
                    rm(f, info.entry)
            elif remove_invalid and not verify(store, f, info.entry)[0].ok:
                rm(f, info.entry)
            else:
                trusted.append(info)
        trusted.sort(key=lambda i: (-(i.created or 0), i.entry))
        for info in trusted[keep:]:
            rm(f, info.entry)
        if not dry_run and not store.entry_ids(f):
            store.io.rm_tree(store.io.p(f))
    for r in removed:
        log.info("artifact store %s: %spruned %s", store.url, "(dry run) " if dry_run else "", r)
    return removed
