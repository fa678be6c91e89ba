"""Byte I/O of the store on a local directory or any fsspec filesystem (s3:// through s3fs).

Every read of stored data is capped: a file is read up to its declared size plus one byte, so a
file that is larger than its manifest says is refused after reading that much, never read whole.
Local reads refuse symlinks and anything that is not a regular file (a FIFO would block).
"""
from __future__ import annotations

import errno
import os
import posixpath
import shutil
import stat
import tempfile
import time
from typing import Any, BinaryIO, Iterator

from .config import OBJECT_STORE_SCHEMES
from .kinds import Rejected

CHUNK = 2**20
TMP_PREFIX = ".tmp-"


class Backend:
    """``storage_options`` go to ``fsspec.core.url_to_fs`` (e.g. ``{"endpoint_url": ...}``)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        import fsspec.core
        from fsspec.implementations.local import LocalFileSystem

        opts = dict(storage_options or {})
        if url.split("://", 1)[0] in OBJECT_STORE_SCHEMES:
            # entries appear under other processes' feet: never answer from a stale listing
            opts.setdefault("use_listings_cache", False)
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(os.path.expanduser(url), **opts)
        self.root = root.rstrip("/") or "/"
        self.local = isinstance(self.fs, LocalFileSystem)

    def p(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _fresh(self, path: str) -> None:
        try:
            self.fs.invalidate_cache(path)
        except Exception:  # noqa: BLE001 - a filesystem without a listings cache
            pass

    def exists(self, path: str | None = None) -> bool:
        path = path or self.root
        if self.local:
            return os.path.isdir(path)
        self._fresh(path)
        return bool(self.fs.exists(path))

    def ls_dirs(self, path: str) -> list[str]:
        if self.local:
            try:
                return sorted(n for n in os.listdir(path)
                              if stat.S_ISDIR(os.lstat(os.path.join(path, n)).st_mode))
            except (FileNotFoundError, NotADirectoryError):
                return []
        self._fresh(path)
        try:
            items = self.fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        names = {posixpath.basename(str(it["name"]).rstrip("/"))
                 for it in items if it.get("type") == "directory"}
        return sorted(n for n in names if n)

    # ---- capped reads ------------------------------------------------------------------------
    def _open_local(self, path: str) -> BinaryIO:
        real_parent = os.path.realpath(os.path.dirname(path))
        real_root = os.path.realpath(self.root)
        if real_parent != real_root and not real_parent.startswith(real_root + os.sep):
            raise Rejected(f"{path}: leaves the store through a symlinked directory")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise Rejected(f"{path}: is a symlink") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise Rejected(f"{path}: not a regular file")
        return os.fdopen(fd, "rb")

    def chunks(self, path: str, limit: int) -> Iterator[bytes]:
        """The file's bytes in chunks, stopping after ``limit + 1`` bytes (enough to tell that it
        is larger than ``limit``); on object stores each chunk is one ranged GET."""
        want = limit + 1
        if self.local:
            with self._open_local(path) as f:
                while want > 0 and (chunk := f.read(min(CHUNK, want))):
                    want -= len(chunk)
                    yield chunk
            return
        want = min(want, int(self.fs.size(path)))    # a range past the end is an error on S3
        pos = 0
        while pos < want:
            chunk = self.fs.cat_file(path, start=pos, end=min(pos + CHUNK, want))
            if not chunk:
                return
            pos += len(chunk)
            yield chunk

    def read_prefix(self, path: str, n: int) -> bytes:
        """The first ``n`` bytes (fewer when the file is shorter)."""
        if self.local:
            with self._open_local(path) as f:
                return f.read(n)
        try:
            return self.fs.cat_file(path, start=0, end=n)
        except OSError:
            if self.fs.size(path) != 0:
                raise
            return b""                  # S3 answers a range on an empty object with 416

    def read_capped(self, path: str, limit: int) -> bytes:
        """The whole file when it holds at most ``limit`` bytes; Rejected when it holds more."""
        data = self.read_prefix(path, limit + 1)
        if len(data) > limit:
            raise Rejected(f"{posixpath.basename(path)}: larger than the declared {limit} bytes")
        return data

    def read_many(self, limits: dict[str, int]) -> dict[str, Any]:
        """path -> its first limit + 1 bytes, or the exception reading it raised (concurrent on
        object stores)."""
        paths = list(limits)
        if self.local or not hasattr(self.fs, "cat_ranges"):
            out: dict[str, Any] = {}
            for p in paths:
                try:
                    out[p] = self.read_prefix(p, limits[p] + 1)
                except (OSError, Rejected) as e:
                    out[p] = e
            return out
        got = dict(zip(paths, self.fs.cat_ranges(paths, [0] * len(paths), [limits[p] + 1 for p in paths],
                                                 on_error="return")))
        for p, v in got.items():       # e.g. 416 for an empty object: ask once more, alone
            if isinstance(v, OSError) and not isinstance(v, FileNotFoundError):
                try:
                    got[p] = self.read_prefix(p, limits[p] + 1)
                except OSError as e:
                    got[p] = e
        return got

    # ---- writes --------------------------------------------------------------------------------
    def write_atomic(self, path: str, data: bytes) -> None:
        if not self.local:
            self.fs.pipe_file(path, data)
            return
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

    def put_if_absent(self, path: str, data: bytes) -> bool:
        """Object stores: a conditional put. True if we wrote it, False if it was there."""
        try:
            self.fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except TypeError:               # a filesystem without mode=: best effort
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
            return True
        except OSError:
            self._fresh(path)           # some servers answer 412 without naming the condition
            if self.fs.exists(path):
                return False
            raise

    def rm_tree(self, path: str) -> None:
        if self.local:
            shutil.rmtree(path, ignore_errors=True)
            return
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def age_s(self, path: str) -> float:
        """Seconds since anything under ``path`` last changed (inf when unknown)."""
        try:
            if self.local:
                return time.time() - os.lstat(path).st_mtime
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


class _NullProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(factory, total: int, desc: str):
    """``factory(total, desc)`` (tqdm fits) or a bar that shows nothing."""
    return factory(total, desc) if factory is not None else _NullProgress()
