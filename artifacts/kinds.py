"""Which files an entry may hold and where they may go: Triton's kernel cache files only.

The engine points TRITON_CACHE_DIR at ``<cache_dir>/triton``; Triton writes one directory per
kernel key holding the kernel's IR stages, its binary, its metadata JSON and a ``__grp__`` JSON
naming them. Compiled host modules (``*.so`` launchers) and anything else are never published or
restored: Triton rebuilds its launchers itself. Group files name their children by absolute
path; they are published with bare names and restored pointing into the replica's own cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from pathlib import Path, PurePosixPath

log = logging.getLogger("hybridserve.store")

TRITON_DIR = "triton"
KERNEL_EXTS = ("json", "source", "ttir", "ttgir", "llir", "ptx", "cubin", "hsaco", "amdgcn")
_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}"
_FILE = re.compile(rf"^{_NAME}\.(?:{'|'.join(KERNEL_EXTS)})$")
_KEY = re.compile(r"^[A-Za-z0-9_=-]{1,128}$")
_CHUNK = 2**20
MAX_GROUP_BYTES = 2**20


class Rejected(Exception):
    """An entry (or one of its files) that must not be loaded; the message says why."""


def safe_relpath(rel: object) -> str:
    """A relative POSIX path with no way out of the directory it is joined to."""
    if not isinstance(rel, str) or not rel or len(rel) > 512 or any(c in rel for c in "\\\x00*?[]"):
        raise Rejected(f"unsafe path in manifest: {str(rel)[:80]!r}")
    if PurePosixPath(rel).is_absolute() or any(p in ("", ".", "..") for p in rel.split("/")):
        raise Rejected(f"unsafe path in manifest: {rel[:80]!r}")
    return rel


def check_kind(rel: str) -> str:
    """``rel`` when it is a Triton kernel cache file (``triton/<key>/<name>.<ext>``)."""
    parts = safe_relpath(rel).split("/")
    if len(parts) != 3 or parts[0] != TRITON_DIR or not _KEY.match(parts[1]) or not _FILE.match(parts[2]):
        raise Rejected(f"unknown artifact kind: {rel[:80]!r} (only Triton kernel files "
                       f"{TRITON_DIR}/<key>/<name>.{{{','.join(KERNEL_EXTS)}}} are restored)")
    return rel


def is_group(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name.startswith("__grp__") and name.endswith(".json")


def _children(data: bytes) -> dict[str, str]:
    try:
        doc = json.loads(data)
        paths = doc["child_paths"]
        if not isinstance(paths, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise Rejected("Triton group file is not {'child_paths': {...}}") from None
    return paths


def portable_group(data: bytes) -> bytes:
    """A group file as published: children by bare file name (Triton wrote absolute paths)."""
    out = {}
    for child, path in _children(data).items():
        if not isinstance(child, str) or not _FILE.match(child) or not isinstance(path, str):
            raise Rejected(f"Triton group file names an unknown child {str(child)[:80]!r}")
        out[child] = child
    return json.dumps({"child_paths": out}, sort_keys=True).encode()


def localize_group(data: bytes, key_dir: Path) -> bytes:
    """A group file as restored: each child in ``key_dir`` (the group's own directory)."""
    out = {}
    for child, path in _children(data).items():
        if not isinstance(child, str) or not _FILE.match(child) or path != child:
            raise Rejected(f"Triton group file child {str(child)[:80]!r} points elsewhere "
                           f"({str(path)[:80]!r}); children must be files of its own directory")
        out[child] = str(key_dir / child)
    return json.dumps({"child_paths": out}).encode()


def collect(cache_dir: str | os.PathLike) -> tuple[dict[str, dict], dict[str, bytes]]:
    """What ``cache_dir`` holds to publish: ({relpath: {sha256, size}}, {relpath: bytes}) where
    the second dict holds the rewritten group files (the others are read from disk)."""
    files: dict[str, dict] = {}
    rewritten: dict[str, bytes] = {}
    root = Path(cache_dir)
    tdir = root / TRITON_DIR
    if not tdir.is_dir() or tdir.is_symlink():
        return files, rewritten
    for key_dir in sorted(tdir.iterdir()):
        if key_dir.is_symlink() or not key_dir.is_dir() or not _KEY.match(key_dir.name):
            continue
        for p in sorted(key_dir.iterdir()):
            rel = f"{TRITON_DIR}/{key_dir.name}/{p.name}"
            try:
                check_kind(rel)
            except Rejected:
                continue                    # launchers (.so), locks, temp files: not artifacts
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                continue
            if is_group(rel):
                if st.st_size > MAX_GROUP_BYTES:
                    continue
                try:
                    data = portable_group(p.read_bytes())
                except Rejected as e:
                    log.warning("not publishing %s: %s", p, e)
                    continue
                rewritten[rel] = data
                files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                continue
            h = hashlib.sha256()
            size = 0
            with open(p, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
            files[rel] = {"sha256": h.hexdigest(), "size": size}
    return files, rewritten
