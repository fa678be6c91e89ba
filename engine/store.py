"""Shared artifact store: what a warm engine needs to start again without compiling.

An *entry* holds the compile artifacts of the JIT kernels (a directory of files: the Triton cache
directory, optionally a ``torch.compiler.save_cache_artifacts`` blob) and the warm buckets with
their measured capture costs. Entries are grouped by a *fingerprint* of everything that makes them
valid on a machine: model config, dtype, GPU architecture, torch / triton / CUDA / Python versions,
host architecture and engine version.

Layout (any fsspec URL; a local directory or ``s3://bucket/prefix``)::

    <root>/<fingerprint>/<entry-id>/files/<relpath>    artifact files
    <root>/<fingerprint>/<entry-id>/blobs/<name>       in-memory artifacts (e.g. torch mega-cache)
    <root>/<fingerprint>/<entry-id>/manifest.json      written last: present = entry complete
    <root>/<fingerprint>/latest.json                   pointer to the newest entry (a hint)

The entry id is a digest of the entry's content (file hashes, blob hashes, warm bucket set), so
concurrent publishers of the same artifacts converge on one entry. Publishing is atomic: locally
the entry is assembled under ``.tmp-*`` and renamed into place; on object stores the files are
uploaded first and the manifest is put last with a conditional put (``If-None-Match: *``).

Compile artifacts are executable code (cubins, compiled launcher modules). Loading verifies every
file against the manifest's sha256 and size -- and the manifest's HMAC when a key is configured --
in a staging directory *before* anything is moved into the destination cache directory. A bad
entry is rejected as a whole; the caller falls back to compiling.
"""
from __future__ import annotations

import hashlib
import hmac
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import posixpath
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

log = logging.getLogger("hybridserve.store")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest.json"
TMP_PREFIX = ".tmp-"
MAX_MANIFEST_BYTES = 32 * 2**20
_CHUNK = 2**20
_BATCH_BYTES = 64 * 2**20          # object stores: fetch/put small files in concurrent batches
_SMALL_FILE = 8 * 2**20

# progress(total_bytes, description) -> object with .update(n) and .close() (tqdm fits)
ProgressFactory = Callable[[int, str], Any]


# --------------------------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------------------------
def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      default=str).encode()


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def engine_version() -> str:
    eng = sys.modules.get("engine")
    if eng is None:
        try:
            eng = importlib.import_module("engine")
        except Exception:  # noqa: BLE001 - any import failure: fall back to the dist version
            eng = None
    v = getattr(eng, "__version__", None)
    if v:
        return str(v)
    return _dist_version("hybridserve") or "0"


def _compute_capability(device: Any) -> str:
    dev = str(device) if device is not None else "cpu"
    if not dev.startswith("cuda"):
        return dev.split(":")[0] or "cpu"
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def fingerprint_fields(model_config: dict, dtype: str, device: Any) -> dict:
    """Everything that decides whether stored compile artifacts are valid here.

    ``device``: a torch.device or string ("cuda", "cuda:0", "cpu"). Triton's version is read from
    package metadata only: triton is never imported here.
    """
    import torch

    triton = None
    if importlib.util.find_spec("triton") is not None:
        triton = _dist_version("triton", "pytorch-triton", "triton-nightly") or "unknown"
    return {
        "format": FORMAT_VERSION,
        "model_config_sha256": hashlib.sha256(canonical_json(model_config)).hexdigest(),
        "dtype": str(dtype).replace("torch.", ""),
        "compute_capability": _compute_capability(device),
        "torch": torch.__version__,
        "triton": triton,
        "cuda": torch.version.cuda,
        # Triton's cache holds compiled host-side launcher modules: host arch + CPython matter.
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "machine": platform.machine(),
        "engine": engine_version(),
    }


def fingerprint(fields: dict) -> str:
    return hashlib.sha256(canonical_json(fields)).hexdigest()[:16]


def fields_diff(stored: dict | None, local: dict) -> list[str]:
    """Human-readable differences, e.g. ["torch: stored 2.11.0, here 2.13.0"]."""
    stored = stored or {}
    out = []
    for k in sorted(set(stored) | set(local)):
        if stored.get(k) != local.get(k):
            out.append(f"{k}: stored {stored.get(k)!r}, here {local.get(k)!r}")
    return out


# --------------------------------------------------------------------------------------------
# signing
# --------------------------------------------------------------------------------------------
def hmac_key_from_env(var: str = "HYBRIDSERVE_STORE_KEY") -> bytes | None:
    v = os.environ.get(var)
    return v.encode() if v else None


def _unsigned(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "signature"}


def sign_manifest(manifest: dict, key: bytes) -> dict:
    out = _unsigned(manifest)
    out["signature"] = {"alg": "hmac-sha256",
                        "value": hmac.new(key, canonical_json(out), hashlib.sha256).hexdigest()}
    return out


def check_signature(manifest: dict, key: bytes | None) -> str | None:
    """None when acceptable, else the reason it is not."""
    if key is None:
        return None
    sig = manifest.get("signature")
    if not isinstance(sig, dict) or not sig.get("value"):
        return "manifest is not signed but an HMAC key is configured"
    if sig.get("alg") != "hmac-sha256":
        return f"unsupported signature algorithm {sig.get('alg')!r}"
    want = hmac.new(key, canonical_json(_unsigned(manifest)), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, str(sig["value"])):
        return "bad manifest signature (wrong key or modified manifest)"
    return None


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
@dataclass
class LoadResult:
    fingerprint: str
    entry: str | None = None
    files: list[str] = field(default_factory=list)           # relpaths placed in dest_dir
    blobs: dict[str, bytes] = field(default_factory=dict)    # verified in-memory artifacts
    warm_buckets: dict[int, float] = field(default_factory=dict)  # bucket -> capture cost (ms)
    rejected: list[str] = field(default_factory=list)        # entries refused (integrity)
    skipped: list[str] = field(default_factory=list)         # not applicable (fingerprint, ...)
    manifest: dict | None = None
    bytes: int = 0
    seconds: float = 0.0

    @property
    def loaded(self) -> bool:
        return self.entry is not None


@dataclass
class PublishResult:
    fingerprint: str
    entry: str
    created: bool          # False: an identical entry was already there (or another publisher won)
    files: int
    bytes: int
    seconds: float = 0.0


@dataclass
class EntryInfo:
    fingerprint: str
    entry: str
    complete: bool
    created: float | None = None
    files: int = 0
    bytes: int = 0
    warm_buckets: dict[int, float] = field(default_factory=dict)
    signed: bool = False
    fields: dict = field(default_factory=dict)
    latest: bool = False


@dataclass
class VerifyReport:
    fingerprint: str
    entry: str
    ok: bool
    errors: list[str] = field(default_factory=list)


class _Reject(Exception):
    pass


class _NullProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(factory: ProgressFactory | None, total: int, desc: str):
    return factory(total, desc) if factory is not None else _NullProgress()


def _safe_relpath(rel: Any) -> str:
    """Reject anything that could escape the destination directory."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise _Reject(f"unsafe path in manifest: {rel!r}")
    p = PurePosixPath(rel)
    if any(c in rel for c in "*?[]") or p.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")):
        raise _Reject(f"unsafe path in manifest: {rel!r}")
    return str(p)


def _skip_local_name(name: str) -> bool:
    # Triton writes tmp.pid_* files then renames them; lock and hidden files are not artifacts
    return name.startswith(".") or name.startswith("tmp.") or name.endswith(".lock")


def scan_dir(src_dir: str | os.PathLike) -> dict[str, dict]:
    """relpath -> {"sha256", "size"} for every artifact file under src_dir."""
    out: dict[str, dict] = {}
    src = Path(src_dir)
    if not src.is_dir():
        return out
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not _skip_local_name(d))
        for name in sorted(files):
            if _skip_local_name(name):
                continue
            p = Path(root) / name
            if any(c in name for c in "*?[]\\"):
                log.warning("not publishing %s: unsupported characters in its name", p)
                continue
            if p.is_symlink() or not p.is_file():
                continue
            h = hashlib.sha256()
            size = 0
            with open(p, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
            out[p.relative_to(src).as_posix()] = {"sha256": h.hexdigest(), "size": size}
    return out


def content_id(fp: str, files: dict[str, dict], blobs: dict[str, dict],
               warm_buckets: Iterable[int]) -> str:
    doc = {"fingerprint": fp,
           "files": {k: v["sha256"] for k, v in files.items()},
           "blobs": {k: v["sha256"] for k, v in blobs.items()},
           "warm": sorted(int(b) for b in warm_buckets)}
    return hashlib.sha256(canonical_json(doc)).hexdigest()[:20]


# --------------------------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------------------------
class ArtifactStore:
    """Fingerprint-keyed artifact entries on any fsspec filesystem.

    ``storage_options`` go to ``fsspec.core.url_to_fs`` (e.g. ``{"endpoint_url": ...}`` for an
    S3-compatible server). When not given, ``$HYBRIDSERVE_STORE_OPTIONS`` (JSON) is used if set;
    s3fs also honours ``$AWS_ENDPOINT_URL``.
    """

    def __init__(self, url: str, hmac_key: bytes | None = None,
                 storage_options: dict | None = None):
        import fsspec.core
        from fsspec.implementations.local import LocalFileSystem

        if storage_options is None:
            env = os.environ.get("HYBRIDSERVE_STORE_OPTIONS")
            storage_options = json.loads(env) if env else {}
        self.url = url
        self.hmac_key = hmac_key or None
        if url.split("://", 1)[0] in ("s3", "s3a", "gs", "gcs", "az", "abfs"):
            # entries appear under other processes' feet: never answer from a stale listing
            storage_options = {"use_listings_cache": False, **storage_options}
        self.fs, self.root = fsspec.core.url_to_fs(os.path.expanduser(url), **storage_options)
        self.root = self.root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            os.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r}, signed={self.hmac_key is not None})"

    # ---- paths / low-level ---------------------------------------------------------------
    def _p(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _ls_names(self, path: str, dirs_only: bool = True) -> list[str]:
        try:
            self.fs.invalidate_cache(path)
        except Exception:  # noqa: BLE001
            pass
        try:
            items = self.fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for it in items:
            if dirs_only and it.get("type") != "directory":
                continue
            name = posixpath.basename(str(it["name"]).rstrip("/"))
            if name:
                out.append(name)
        return sorted(set(out))

    def _read_small(self, path: str, limit: int = MAX_MANIFEST_BYTES) -> bytes:
        with self.fs.open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise _Reject(f"{posixpath.basename(path)} larger than {limit} bytes")
        return data

    def _write_atomic(self, path: str, data: bytes) -> None:
        """Replace path's content atomically (local: temp + os.replace; object stores: a PUT)."""
        if self.local:
            d = os.path.dirname(path)
            os.makedirs(d, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=d)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                raise
        else:
            self.fs.pipe_file(path, data)

    def _put_if_absent(self, path: str, data: bytes) -> bool:
        """Object stores: conditional put. True if we wrote it, False if it already existed."""
        try:
            self.fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except TypeError:               # filesystem without mode=: best effort
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
            return True
        except OSError:
            # some servers answer 412 without the If-None-Match condition name
            try:
                self.fs.invalidate_cache(path)
            except Exception:  # noqa: BLE001
                pass
            if self.fs.exists(path):
                return False
            raise

    # ---- reading entries -------------------------------------------------------------------
    def fingerprints(self) -> list[str]:
        return [n for n in self._ls_names(self.root) if not n.startswith(".")]

    def entry_ids(self, fp: str) -> list[str]:
        return [n for n in self._ls_names(self._p(fp)) if not n.startswith(".")]

    def read_manifest(self, fp: str, entry: str) -> dict:
        data = self._read_small(self._p(fp, entry, MANIFEST))
        try:
            m = json.loads(data)
        except ValueError as e:
            raise _Reject(f"manifest is not valid JSON: {e}") from None
        if not isinstance(m, dict):
            raise _Reject("manifest is not a JSON object")
        return m

    def latest_pointer(self, fp: str) -> str | None:
        try:
            d = json.loads(self._read_small(self._p(fp, LATEST), 4096))
            e = d.get("entry") if isinstance(d, dict) else None
            return e if isinstance(e, str) and e and "/" not in e and not e.startswith(".") else None
        except Exception:  # noqa: BLE001 - a missing/garbled pointer is only a hint
            return None

    def _check_manifest(self, m: dict, fp: str, entry: str,
                        fields: dict | None) -> tuple[dict, dict]:
        """Structure, signature, fingerprint. Returns (files, blobs) with safe relpaths."""
        why = check_signature(m, self.hmac_key)
        if why:
            raise _Reject(why)
        if m.get("format") != FORMAT_VERSION:
            raise _Reject(f"unsupported manifest format {m.get('format')!r}")
        if m.get("entry") != entry:
            raise _Reject(f"manifest names entry {m.get('entry')!r}, found at {entry!r}")
        mfields = m.get("fields")
        if not isinstance(mfields, dict) or m.get("fingerprint") != fp or fingerprint(mfields) != fp:
            raise _Reject(f"manifest fingerprint does not match its location {fp}")
        if fields is not None and mfields != fields:
            raise _FingerprintMismatch("; ".join(fields_diff(mfields, fields)) or "fields differ")
        out = []
        for key in ("files", "blobs"):
            items = m.get(key, {})
            if not isinstance(items, dict):
                raise _Reject(f"manifest {key} is not an object")
            checked = {}
            for rel, meta in items.items():
                rel = _safe_relpath(rel)
                if (not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str)
                        or len(meta["sha256"]) != 64 or not isinstance(meta.get("size"), int)
                        or meta["size"] < 0):
                    raise _Reject(f"manifest entry for {rel!r} lacks sha256/size")
                checked[rel] = meta
            out.append(checked)
        wb = m.get("warm_buckets", {})
        if not isinstance(wb, dict):
            raise _Reject("manifest warm_buckets is not an object")
        return out[0], out[1]

    @staticmethod
    def _warm(m: dict) -> dict[int, float]:
        out = {}
        for k, v in (m.get("warm_buckets") or {}).items():
            try:
                out[int(k)] = float(v)
            except (TypeError, ValueError):
                continue
        return dict(sorted(out.items()))

    def _fetch_verified(self, fp: str, entry: str, kind: str, items: dict[str, dict],
                        staging: Path | None, bar) -> dict[str, bytes]:
        """Fetch items, checking size + sha256. Files go to staging (when given), else memory."""
        base = self._p(fp, entry, kind)
        mem: dict[str, bytes] = {}

        def check(rel: str, data: bytes) -> None:
            meta = items[rel]
            if len(data) != meta["size"]:
                raise _Reject(f"{kind}/{rel}: size {len(data)} != manifest {meta['size']} "
                              f"(truncated or modified)")
            if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise _Reject(f"{kind}/{rel}: sha256 mismatch (modified)")

        def place(rel: str, data: bytes) -> None:
            check(rel, data)
            if staging is None:
                mem[rel] = data
            else:
                dst = staging / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(data)
            bar.update(len(data))

        small = [r for r, m in items.items() if m["size"] <= _SMALL_FILE]
        large = [r for r, m in items.items() if m["size"] > _SMALL_FILE]
        # small files: batched (concurrent on async filesystems like s3fs)
        batch: list[str] = []
        batch_bytes = 0
        for rel in small + [None]:
            if rel is not None:
                batch.append(rel)
                batch_bytes += items[rel]["size"]
            if batch and (rel is None or batch_bytes >= _BATCH_BYTES or len(batch) >= 256):
                paths = {posixpath.join(base, r): r for r in batch}
                got = self._cat_many(list(paths))
                for path, r in paths.items():
                    data = got.get(path)
                    if data is None:
                        # some filesystems key results without protocol; look up by suffix
                        data = next((v for k, v in got.items() if str(k).endswith(path)), None)
                    if isinstance(data, BaseException) or data is None:
                        raise _Reject(f"{kind}/{r}: missing or unreadable ({data!r})")
                    place(r, data)
                batch, batch_bytes = [], 0
        # large files: streamed and hashed chunk by chunk, never fully in memory (on disk)
        for rel in large:
            meta = items[rel]
            h = hashlib.sha256()
            size = 0
            try:
                src = self.fs.open(posixpath.join(base, rel), "rb")
            except FileNotFoundError:
                raise _Reject(f"{kind}/{rel}: missing file") from None
            buf = bytearray() if staging is None else None
            out_f = None
            if staging is not None:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                out_f = open(staging / rel, "wb")
            try:
                with src:
                    while chunk := src.read(_CHUNK):
                        size += len(chunk)
                        if size > meta["size"]:
                            raise _Reject(f"{kind}/{rel}: larger than manifest size {meta['size']}")
                        h.update(chunk)
                        if out_f is not None:
                            out_f.write(chunk)
                        else:
                            buf.extend(chunk)
                        bar.update(len(chunk))
            finally:
                if out_f is not None:
                    out_f.close()
            if size != meta["size"]:
                raise _Reject(f"{kind}/{rel}: size {size} != manifest {meta['size']} "
                              f"(truncated or modified)")
            if h.hexdigest() != meta["sha256"]:
                raise _Reject(f"{kind}/{rel}: sha256 mismatch (modified)")
            if buf is not None:
                mem[rel] = bytes(buf)
        return mem

    def _cat_many(self, paths: list[str]) -> dict[str, Any]:
        """path -> bytes, or the exception reading it raised."""
        if self.local:
            out: dict[str, Any] = {}
            for p in paths:
                try:
                    with open(p, "rb") as f:
                        out[p] = f.read()
                except OSError as e:
                    out[p] = e
            return out
        try:
            got = self.fs.cat(paths, on_error="return")
        except FileNotFoundError as e:
            return {p: e for p in paths}
        return got if isinstance(got, dict) else {paths[0]: got}

    def _candidates(self, fp: str) -> list[str]:
        """Complete entries of fp, newest first (the latest pointer's entry first)."""
        ids = self.entry_ids(fp)
        created = {}
        for e in ids:
            try:
                c = self.read_manifest(fp, e).get("created")
                created[e] = float(c) if isinstance(c, (int, float)) else 0.0
            except FileNotFoundError:
                continue                      # incomplete entry (publisher still running/crashed)
            except Exception:  # noqa: BLE001 - garbled manifest: still a candidate, rejected later
                created[e] = 0.0
        order = sorted(created, key=lambda e: (-created[e], e))
        return order

    def _explain_other_fingerprints(self, fp: str, fields: dict | None, res: LoadResult) -> None:
        others = [f for f in self.fingerprints() if f != fp]
        if not others:
            log.info("artifact store %s: no entry for fingerprint %s (empty store)", self.url, fp)
            res.skipped.append(f"no entry for fingerprint {fp}")
            return
        for other in others[:8]:
            e = self.latest_pointer(other)
            if e is None:
                ids = self.entry_ids(other)
                e = ids[-1] if ids else None
            why = "differs"
            if e is not None and fields is not None:
                try:
                    mf = self.read_manifest(other, e).get("fields")
                    why = "; ".join(fields_diff(mf if isinstance(mf, dict) else {}, fields))
                except Exception:  # noqa: BLE001
                    pass
            msg = f"skipping fingerprint {other} (fingerprint mismatch: {why})"
            log.info("artifact store %s: no entry for fingerprint %s; %s", self.url, fp, msg)
            res.skipped.append(msg)

    def load(self, fp: str, dest_dir: str | os.PathLike, fields: dict | None = None,
             progress: ProgressFactory | None = None, max_entries: int = 3) -> LoadResult:
        """Load the newest valid entry of ``fp`` into ``dest_dir``.

        Every file is verified (size + sha256, and the manifest HMAC when a key is set) in a
        staging directory next to dest_dir; only a fully verified entry is moved into dest_dir.
        Up to ``max_entries`` entries are tried, newest first. ``fields``, when given, must equal
        the manifest's fingerprint fields exactly.
        """
        t0 = time.perf_counter()
        res = LoadResult(fingerprint=fp)
        dest = Path(dest_dir)
        cands = self._candidates(fp)
        hint = self.latest_pointer(fp)
        if hint in cands:
            cands.remove(hint)
            cands.insert(0, hint)
        if not cands:
            self._explain_other_fingerprints(fp, fields, res)
        for entry in cands[:max_entries]:
            try:
                m = self.read_manifest(fp, entry)
                files, blobs = self._check_manifest(m, fp, entry, fields)
            except _FingerprintMismatch as e:
                msg = f"entry {fp}/{entry}: fingerprint mismatch ({e}); not loaded"
                log.warning("artifact store %s: %s", self.url, msg)
                res.skipped.append(msg)
                continue
            except (_Reject, FileNotFoundError, OSError) as e:
                msg = f"entry {fp}/{entry}: rejected: {e}"
                log.warning("artifact store %s: %s", self.url, msg)
                res.rejected.append(msg)
                continue
            total = sum(v["size"] for v in files.values()) + sum(v["size"] for v in blobs.values())
            dest.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=dest.parent))
            bar = _progress(progress, total, f"load {fp}/{entry}")
            try:
                self._fetch_verified(fp, entry, "files", files, staging, bar)
                blob_data = self._fetch_verified(fp, entry, "blobs", blobs, None, bar)
            except (_Reject, OSError) as e:
                shutil.rmtree(staging, ignore_errors=True)
                msg = f"entry {fp}/{entry}: rejected: {e}"
                log.warning("artifact store %s: %s; nothing from this entry was loaded",
                            self.url, msg)
                res.rejected.append(msg)
                continue
            finally:
                bar.close()
            # everything verified: move into place (same filesystem: renames)
            try:
                dest.mkdir(parents=True, exist_ok=True)
                for rel in sorted(files):
                    target = dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staging / rel, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            res.entry = entry
            res.files = sorted(files)
            res.blobs = blob_data
            res.warm_buckets = self._warm(m)
            res.manifest = m
            res.bytes = total
            break
        res.seconds = time.perf_counter() - t0
        if res.loaded:
            log.info("artifact store %s: loaded %s/%s: %d files, %d bytes, warm buckets %s "
                     "in %.2fs", self.url, fp, res.entry, len(res.files), res.bytes,
                     sorted(res.warm_buckets), res.seconds)
        return res

    # ---- publishing ------------------------------------------------------------------------
    def publish(self, fp: str, fields: dict, src_dir: str | os.PathLike | None,
                warm_buckets: dict[int, float], blobs: dict[str, bytes] | None = None,
                progress: ProgressFactory | None = None,
                scanned: dict[str, dict] | None = None) -> PublishResult:
        """Publish src_dir's files + blobs + warm buckets as one entry of fingerprint ``fp``."""
        t0 = time.perf_counter()
        if fingerprint(fields) != fp:
            raise ValueError("fingerprint does not match fields")
        files = scanned if scanned is not None else (scan_dir(src_dir) if src_dir else {})
        blobs = dict(blobs or {})
        for rel in list(files) + list(blobs):
            try:
                _safe_relpath(rel)
            except _Reject as e:
                raise ValueError(str(e)) from None
        bmeta = {k: {"sha256": hashlib.sha256(v).hexdigest(), "size": len(v)}
                 for k, v in blobs.items()}
        entry = content_id(fp, files, bmeta, warm_buckets)
        manifest = {
            "format": FORMAT_VERSION,
            "fingerprint": fp,
            "entry": entry,
            "fields": fields,
            "created": time.time(),
            "created_by": {"host": socket.gethostname(), "pid": os.getpid()},
            "files": files,
            "blobs": bmeta,
            "warm_buckets": {str(int(b)): round(float(c), 3)
                             for b, c in sorted(warm_buckets.items())},
        }
        if self.hmac_key:
            manifest = sign_manifest(manifest, self.hmac_key)
        mbytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
        total = sum(v["size"] for v in files.values()) + sum(v["size"] for v in bmeta.values())
        bar = _progress(progress, total, f"publish {fp}/{entry}")
        try:
            created = (self._publish_local if self.local else self._publish_remote)(
                fp, entry, src_dir, files, blobs, mbytes, bar)
        finally:
            bar.close()
        if created:
            self._update_latest(fp, entry, manifest["created"])
            log.info("artifact store %s: published %s/%s: %d files, %d blobs, %d bytes, "
                     "warm buckets %s", self.url, fp, entry, len(files), len(blobs), total,
                     sorted(int(b) for b in warm_buckets))
        else:
            log.info("artifact store %s: entry %s/%s already present; not republished",
                     self.url, fp, entry)
        return PublishResult(fp, entry, created, len(files), total, time.perf_counter() - t0)

    def _publish_local(self, fp, entry, src_dir, files, blobs, mbytes, bar) -> bool:
        fp_dir = Path(self._p(fp))
        final = fp_dir / entry
        if (final / MANIFEST).exists():
            return False
        fp_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{entry}-", dir=fp_dir))
        try:
            src = Path(src_dir) if src_dir else None
            for rel, meta in files.items():
                dst = tmp / "files" / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / rel, dst)
                # the source may change under us (a live cache): re-verify what we copied
                if _sha256_file(dst) != meta["sha256"]:
                    raise RuntimeError(f"{rel} changed while publishing; retry")
                bar.update(meta["size"])
            for name, data in blobs.items():
                dst = tmp / "blobs" / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(data)
                bar.update(len(data))
            (tmp / MANIFEST).write_bytes(mbytes)     # last: manifest present = complete
            for p in [*tmp.rglob("*")]:
                if p.is_file():
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
            try:
                os.rename(tmp, final)               # atomic; fails if another publisher won
            except OSError:
                if (final / MANIFEST).exists():
                    return False
                raise
            tmp = None
            return True
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def _publish_remote(self, fp, entry, src_dir, files, blobs, mbytes, bar) -> bool:
        mpath = self._p(fp, entry, MANIFEST)
        try:
            self.fs.invalidate_cache(mpath)
        except Exception:  # noqa: BLE001
            pass
        if self.fs.exists(mpath):
            return False
        src = Path(src_dir) if src_dir else None
        batch: dict[str, bytes] = {}
        batch_bytes = 0

        def flush():
            nonlocal batch, batch_bytes
            if batch:
                self.fs.pipe(batch)
                bar.update(batch_bytes)
                batch, batch_bytes = {}, 0

        for rel, meta in files.items():
            data = (src / rel).read_bytes()
            if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise RuntimeError(f"{rel} changed while publishing; retry")
            batch[self._p(fp, entry, "files", rel)] = data
            batch_bytes += len(data)
            if batch_bytes >= _BATCH_BYTES or len(batch) >= 256:
                flush()
        for name, data in blobs.items():
            batch[self._p(fp, entry, "blobs", name)] = data
            batch_bytes += len(data)
        flush()
        # manifest last, conditional: concurrent publishers of this entry -> exactly one wins
        return self._put_if_absent(mpath, mbytes)

    def _update_latest(self, fp: str, entry: str, created: float) -> None:
        cur = self.latest_pointer(fp)
        if cur and cur != entry:
            try:
                c = float(self.read_manifest(fp, cur).get("created", 0))
                if c > created:
                    return
            except Exception:  # noqa: BLE001 - stale/garbled pointer target: replace it
                pass
        self._write_atomic(self._p(fp, LATEST),
                           json.dumps({"entry": entry, "created": created}).encode())

    # ---- operators -------------------------------------------------------------------------
    def ls(self, fp: str | None = None) -> list[EntryInfo]:
        out = []
        for f in ([fp] if fp else self.fingerprints()):
            latest = self.latest_pointer(f)
            for e in self.entry_ids(f):
                info = EntryInfo(fingerprint=f, entry=e, complete=False, latest=(e == latest))
                try:
                    m = self.read_manifest(f, e)
                    info.complete = True
                    info.created = float(m.get("created") or 0)
                    fl = m.get("files") or {}
                    bl = m.get("blobs") or {}
                    info.files = len(fl) + len(bl)
                    info.bytes = sum(int(v.get("size", 0)) for v in [*fl.values(), *bl.values()]
                                     if isinstance(v, dict))
                    info.warm_buckets = self._warm(m)
                    info.signed = isinstance(m.get("signature"), dict)
                    info.fields = m.get("fields") if isinstance(m.get("fields"), dict) else {}
                except FileNotFoundError:
                    pass
                except Exception:  # noqa: BLE001 - garbled manifest: list as complete, no data
                    info.complete = True
                out.append(info)
        return out

    def verify(self, fp: str | None = None, entry: str | None = None,
               progress: ProgressFactory | None = None) -> list[VerifyReport]:
        """Check every complete entry (manifest, signature, every file's size + sha256)."""
        reports = []
        for f in ([fp] if fp else self.fingerprints()):
            for e in ([entry] if entry else self.entry_ids(f)):
                rep = VerifyReport(f, e, ok=False)
                try:
                    m = self.read_manifest(f, e)
                except FileNotFoundError:
                    rep.errors.append("incomplete entry (no manifest)")
                    reports.append(rep)
                    continue
                except _Reject as ex:
                    rep.errors.append(str(ex))
                    reports.append(rep)
                    continue
                try:
                    files, blobs = self._check_manifest(m, f, e, None)
                    total = sum(v["size"] for v in [*files.values(), *blobs.values()])
                    bar = _progress(progress, total, f"verify {f}/{e}")
                    try:
                        for kind, items in (("files", files), ("blobs", blobs)):
                            for rel, meta in items.items():
                                err = self._verify_one(self._p(f, e, kind, rel), meta, bar)
                                if err:
                                    rep.errors.append(f"{kind}/{rel}: {err}")
                    finally:
                        bar.close()
                except (_Reject, OSError) as ex:
                    rep.errors.append(str(ex))
                rep.ok = not rep.errors
                if not rep.ok:
                    log.warning("artifact store %s: entry %s/%s failed verification: %s",
                                self.url, f, e, "; ".join(rep.errors))
                reports.append(rep)
        return reports

    def _verify_one(self, path: str, meta: dict, bar) -> str | None:
        h = hashlib.sha256()
        size = 0
        try:
            with self.fs.open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
        except FileNotFoundError:
            return "missing"
        if size != meta["size"]:
            return f"size {size} != manifest {meta['size']} (truncated or modified)"
        if h.hexdigest() != meta["sha256"]:
            return "sha256 mismatch (modified)"
        return None

    def _age_s(self, path: str) -> float:
        try:
            if self.local:
                return time.time() - os.path.getmtime(path)
            newest = 0.0
            for info in self.fs.find(path, detail=True).values():
                lm = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
                if hasattr(lm, "timestamp"):
                    newest = max(newest, lm.timestamp())
                elif isinstance(lm, (int, float)):
                    newest = max(newest, float(lm))
            return time.time() - newest if newest else float("inf")
        except FileNotFoundError:
            return float("inf")

    def prune(self, keep: int = 2, incomplete_grace_s: float = 3600.0,
              remove_invalid: bool = False, fp: str | None = None,
              dry_run: bool = False) -> list[str]:
        """Keep the ``keep`` newest complete entries per fingerprint; remove older ones and
        incomplete / temporary entries untouched for ``incomplete_grace_s`` (a publisher may
        still be writing younger ones). ``remove_invalid``: also remove entries failing verify.
        Returns the removed paths (relative to the store root)."""
        if keep < 0:
            raise ValueError("keep must be >= 0")
        removed: list[str] = []

        def rm(f: str, name: str) -> None:
            removed.append(f"{f}/{name}")
            if not dry_run:
                path = self._p(f, name)
                if self.local:
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    self.fs.rm(path, recursive=True)

        bad = set()
        if remove_invalid:
            bad = {(r.fingerprint, r.entry) for r in self.verify(fp) if not r.ok
                   and "incomplete" not in " ".join(r.errors)}
        for f in ([fp] if fp else self.fingerprints()):
            if self.local:   # temp dirs of local publishers (dot-prefixed)
                for name in os.listdir(self._p(f)) if os.path.isdir(self._p(f)) else []:
                    if name.startswith(TMP_PREFIX) and self._age_s(self._p(f, name)) >= incomplete_grace_s:
                        rm(f, name)
            complete = []
            for info in self.ls(f):
                if not info.complete:
                    if self._age_s(self._p(f, info.entry)) >= incomplete_grace_s:
                        rm(f, info.entry)
                elif (f, info.entry) in bad:
                    rm(f, info.entry)
                else:
                    complete.append(info)
            complete.sort(key=lambda i: (-(i.created or 0), i.entry))
            for info in complete[keep:]:
                rm(f, info.entry)
            kept = complete[:keep]
            if not dry_run:
                if kept:
                    if self.latest_pointer(f) not in {i.entry for i in kept}:
                        self._write_atomic(self._p(f, LATEST), json.dumps(
                            {"entry": kept[0].entry, "created": kept[0].created}).encode())
                else:
                    remaining = self.entry_ids(f)
                    if not remaining:
                        if self.local:
                            shutil.rmtree(self._p(f), ignore_errors=True)
                        else:
                            try:
                                self.fs.rm(self._p(f), recursive=True)
                            except FileNotFoundError:
                                pass
        for r in removed:
            log.info("artifact store %s: %spruned %s", self.url, "(dry run) " if dry_run else "", r)
        return removed


class _FingerprintMismatch(_Reject):
    pass


def _sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# what the engine calls
# --------------------------------------------------------------------------------------------
TORCH_MEGA_CACHE = "torch_mega_cache.bin"


@dataclass
class RestoreResult:
    warm_buckets: dict[int, float] = field(default_factory=dict)   # bucket -> capture cost ms
    rejected: list[str] = field(default_factory=list)              # integrity rejections
    loaded: bool = False
    entry: str | None = None
    files: int = 0
    skipped: list[str] = field(default_factory=list)               # fingerprint mismatch etc.
    error: str | None = None                                       # store unreachable etc.
    seconds: float = 0.0


class ArtifactManager:
    """One engine's view of the store: restore before compiling, publish after compiling new.

    ``cache_dir`` is the directory the JIT compiler caches into (the engine points
    TRITON_CACHE_DIR at it before the first Triton compile). Never raises on store trouble:
    failures are logged and reported in the results; the engine then compiles (JIT path).
    """

    def __init__(self, store_url: str | None, hmac_key: bytes | None, fields: dict,
                 cache_dir: str | os.PathLike, storage_options: dict | None = None,
                 torch_cache: bool = True, progress: ProgressFactory | None = None):
        self.store_url = store_url
        self.hmac_key = hmac_key
        self.fields = dict(fields)
        self.fingerprint = fingerprint(self.fields)
        self.cache_dir = Path(cache_dir)
        self.storage_options = storage_options
        self.torch_cache = torch_cache
        self.progress = progress
        self._store: ArtifactStore | None = None
        self._restored_files: dict[str, str] | None = None     # relpath -> sha256
        self._restored_warm: dict[int, float] = {}
        self._restored_blob_sha: dict[str, str] = {}
        self.last_publish: PublishResult | None = None

    @classmethod
    def from_config(cls, cfg: Any, fields: dict, cache_dir: str | os.PathLike,
                    **kw) -> "ArtifactManager":
        """From an EngineConfig: ``cfg.store`` and the key in ``$<cfg.store_hmac_key_env>``."""
        return cls(cfg.store, hmac_key_from_env(cfg.store_hmac_key_env), fields, cache_dir, **kw)

    @property
    def enabled(self) -> bool:
        return bool(self.store_url)

    @property
    def store(self) -> ArtifactStore:
        if self._store is None:
            self._store = ArtifactStore(self.store_url, self.hmac_key, self.storage_options)
        return self._store

    def restore(self) -> RestoreResult:
        out = RestoreResult()
        if not self.enabled:
            return out
        t0 = time.perf_counter()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            res = self.store.load(self.fingerprint, self.cache_dir, fields=self.fields,
                                  progress=self.progress)
        except Exception as e:  # noqa: BLE001 - store down: compile instead
            out.error = f"{type(e).__name__}: {e}"
            log.warning("artifact store %s unavailable (%s); compiling from scratch",
                        self.store_url, out.error)
            out.seconds = time.perf_counter() - t0
            return out
        out.rejected = list(res.rejected)
        out.skipped = list(res.skipped)
        if res.loaded:
            out.loaded = True
            out.entry = res.entry
            out.files = len(res.files)
            out.warm_buckets = dict(res.warm_buckets)
            self._restored_warm = dict(res.warm_buckets)
            self._restored_files = {k: v["sha256"]
                                    for k, v in (res.manifest or {}).get("files", {}).items()}
            self._restored_blob_sha = {k: hashlib.sha256(v).hexdigest()
                                       for k, v in res.blobs.items()}
            mega = res.blobs.get(TORCH_MEGA_CACHE)
            if mega and self.torch_cache:
                try:
                    import torch

                    torch.compiler.load_cache_artifacts(mega)
                except Exception as e:  # noqa: BLE001 - verified but unusable: just compile
                    log.warning("torch cache artifacts of %s not loadable: %s", res.entry, e)
        out.seconds = time.perf_counter() - t0
        return out

    def _torch_blob(self) -> dict[str, bytes]:
        if not self.torch_cache:
            return {}
        try:
            import torch

            got = torch.compiler.save_cache_artifacts()
        except Exception:  # noqa: BLE001 - nothing compiled by torch.compile, or unsupported
            return {}
        if not got:
            return {}
        data = got[0] if isinstance(got, tuple) else got
        return {TORCH_MEGA_CACHE: bytes(data)} if data else {}

    def publish(self, warm_buckets: dict[int, float]) -> bool:
        """Upload cache_dir + warm buckets unless nothing changed since restore. True if a new
        entry was written."""
        if not self.enabled:
            return False
        try:
            files = scan_dir(self.cache_dir)
            blobs = self._torch_blob()
            warm = dict(self._restored_warm)
            warm.update({int(b): float(c) for b, c in warm_buckets.items()})
            cur_files = {k: v["sha256"] for k, v in files.items()}
            cur_blobs = {k: hashlib.sha256(v).hexdigest() for k, v in blobs.items()}
            if not files and not blobs and not warm:
                log.info("artifact store %s: nothing to publish", self.store_url)
                return False
            if (self._restored_files is not None and cur_files == self._restored_files
                    and set(cur_blobs) <= set(self._restored_blob_sha)
                    and set(warm) <= set(self._restored_warm)):
                log.info("artifact store %s: nothing new since restore of %s; not publishing",
                         self.store_url, self.fingerprint)
                return False
            res = self.store.publish(self.fingerprint, self.fields, self.cache_dir, warm,
                                     blobs=blobs, progress=self.progress, scanned=files)
        except Exception as e:  # noqa: BLE001
            log.warning("artifact store %s: publish failed: %s: %s", self.store_url,
                        type(e).__name__, e)
            return False
        self.last_publish = res
        self._restored_files = cur_files
        self._restored_blob_sha = cur_blobs
        self._restored_warm = warm
        return res.created
