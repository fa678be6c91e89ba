"""An entry's manifest: what it holds (each file's sha256 and size), for which fingerprint, its
warm lists, and the publisher's Ed25519 signature over all of it.

The signature covers the per-file hashes, so a replica that trusts the signer trusts the bytes;
without a trusted signature an entry is not loaded, ranked or pruned (unless the operator opted
into unsigned entries of a local directory).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import keys
from .fingerprint import FORMAT_VERSION, canonical_json, fields_diff, fingerprint
from .kinds import Rejected, check_kind

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 8 * 2**20


class FingerprintMismatch(Rejected):
    """A valid entry built for another machine or model (not an attack: skipped, not rejected)."""


@dataclass(frozen=True)
class Trust:
    """What a reader accepts: signatures by these keys; unsigned entries only if ``unsigned``."""
    public_keys: tuple[Ed25519PublicKey, ...] = ()
    unsigned: bool = False

    @property
    def any(self) -> bool:
        return bool(self.public_keys) or self.unsigned

    def describe(self) -> str:
        ids = ", ".join(keys.key_id(k) for k in self.public_keys)
        return (f"keys [{ids}]" if ids else "no keys") + (" + unsigned (local)" if self.unsigned else "")


def _unsigned(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "signature"}


def build(fp: str, entry: str, fields: dict, files: dict[str, dict],
          warm_buckets: dict[int, float], warm_batches: dict[int, float]) -> dict:
    return {
        "format": FORMAT_VERSION, "fingerprint": fp, "entry": entry, "fields": fields,
        "created": time.time(),
        "created_by": {"host": socket.gethostname(), "pid": os.getpid()},
        "files": files,
        "warm_buckets": {str(int(b)): round(float(c), 3) for b, c in sorted(warm_buckets.items())},
        "warm_batches": {str(int(b)): round(float(c), 3) for b, c in sorted(warm_batches.items())},
    }


def entry_id(fp: str, files: dict[str, dict], warm_buckets, warm_batches) -> str:
    """A digest of the content, so publishers of the same artifacts converge on one entry."""
    doc = {"fingerprint": fp, "files": {k: v["sha256"] for k, v in files.items()},
           "warm": sorted(int(b) for b in warm_buckets),
           "warm_batches": sorted(int(b) for b in warm_batches)}
    return hashlib.sha256(canonical_json(doc)).hexdigest()[:20]


def sign(m: dict, priv: Ed25519PrivateKey) -> dict:
    out = _unsigned(m)
    out["signature"] = keys.sign(canonical_json(out), priv)
    return out


def signer(m: dict) -> str | None:
    sig = m.get("signature")
    return str(sig.get("key_id")) if isinstance(sig, dict) and sig.get("key_id") else None


def check_trust(m: dict, trust: Trust) -> str | None:
    """None when ``trust`` accepts the manifest, else the reason it does not."""
    sig = m.get("signature")
    if isinstance(sig, dict) and sig.get("alg") == "ed25519" and trust.public_keys:
        if keys.verify(canonical_json(_unsigned(m)), sig, list(trust.public_keys)):
            return None
        if not trust.unsigned:
            return (f"signature by key {sig.get('key_id')!r} does not verify with the trusted "
                    f"{trust.describe()} (modified manifest or untrusted signer)")
    if trust.unsigned:
        return None
    if not trust.public_keys:
        return ("no trusted public key configured (store_public_keys); unsigned or unverifiable "
                "entries are never loaded")
    return "manifest is not signed with ed25519"


def parse(data: bytes) -> dict:
    try:
        m = json.loads(data)
    except ValueError as e:
        raise Rejected(f"manifest is not valid JSON: {e}") from None
    if not isinstance(m, dict):
        raise Rejected("manifest is not a JSON object")
    return m


def check(m: dict, fp: str, entry: str, trust: Trust, fields: dict | None = None) -> dict[str, dict]:
    """Trust first, then structure and fingerprint. Returns the files {relpath: {sha256, size}},
    each of a known kind with a path that stays inside the cache directory."""
    why = check_trust(m, trust)
    if why:
        raise Rejected(why)
    if m.get("format") != FORMAT_VERSION:
        raise Rejected(f"unsupported manifest format {m.get('format')!r} (this reader: {FORMAT_VERSION})")
    if m.get("entry") != entry:
        raise Rejected(f"manifest names entry {m.get('entry')!r}, found at {entry!r}")
    mfields = m.get("fields")
    if not isinstance(mfields, dict) or m.get("fingerprint") != fp or fingerprint(mfields) != fp:
        raise Rejected(f"manifest fingerprint does not match its location {fp}")
    if fields is not None and mfields != fields:
        raise FingerprintMismatch("; ".join(fields_diff(mfields, fields)) or "fields differ")
    if m.get("blobs"):
        raise Rejected("unknown artifact kind: blobs (torch's mega-cache is never loaded)")
    if not isinstance(m.get("created"), (int, float)):
        raise Rejected("manifest has no numeric 'created'")
    items = m.get("files", {})
    if not isinstance(items, dict):
        raise Rejected("manifest files is not an object")
    out = {}
    for rel, meta in items.items():
        check_kind(rel)
        if (not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str)
                or len(meta["sha256"]) != 64 or not isinstance(meta.get("size"), int)
                or isinstance(meta.get("size"), bool) or meta["size"] < 0):
            raise Rejected(f"manifest entry for {rel!r} lacks sha256/size")
        out[rel] = {"sha256": meta["sha256"], "size": meta["size"]}
    for key in ("warm_buckets", "warm_batches"):
        if not isinstance(m.get(key, {}), dict):
            raise Rejected(f"manifest {key} is not an object")
    return out


def warm_list(m: dict, key: str = "warm_buckets") -> dict[int, float]:
    out = {}
    for k, v in (m.get(key) or {}).items():
        try:
            out[int(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return dict(sorted(out.items()))


@dataclass
class Verified:
    """A manifest that passed ``check``: safe to rank by its (signed) ``created``."""
    entry: str
    manifest: dict
    files: dict[str, dict] = field(default_factory=dict)

    @property
    def created(self) -> float:
        return float(self.manifest["created"])
