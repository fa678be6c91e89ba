"""Ed25519 keys of the store: the publisher signs manifests, replicas hold only public keys.

Text forms (one line, fit for YAML and environment variables): ``ed25519:<base64 raw key>`` for a
public key, ``ed25519-private:<base64 raw seed>`` for a private one. PEM and OpenSSH public keys
are read too, and any of these may be given as the path of a file holding it.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PUBLIC_PREFIX = "ed25519:"
PRIVATE_PREFIX = "ed25519-private:"
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw
_FIX = "generate a pair with `hybridserve store keygen`"


class StoreKeyError(ValueError):
    """A key that cannot be read; the message names the fix."""


def generate() -> tuple[str, str]:
    """A new key pair as (private text, public text)."""
    priv = Ed25519PrivateKey.generate()
    seed = priv.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                              serialization.NoEncryption())
    return PRIVATE_PREFIX + base64.b64encode(seed).decode(), public_text(priv.public_key())


def public_text(pub: Ed25519PublicKey) -> str:
    return PUBLIC_PREFIX + base64.b64encode(pub.public_bytes(*_RAW)).decode()


def key_id(pub: Ed25519PublicKey) -> str:
    return hashlib.sha256(pub.public_bytes(*_RAW)).hexdigest()[:16]


def _text(value: str, what: str) -> str:
    value = value.strip()
    known = (PUBLIC_PREFIX, PRIVATE_PREFIX, "ssh-ed25519 ", "-----BEGIN")
    if value.startswith(known):
        return value
    p = Path(os.path.expanduser(value))
    if p.is_file():
        return p.read_text().strip()
    raise StoreKeyError(f"{what} {value[:40]!r} is neither a key (ed25519:..., PEM, ssh-ed25519) "
                        f"nor a readable file; {_FIX}")


def _b64(s: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise StoreKeyError(f"{what} is not valid base64; {_FIX}") from None
    if len(raw) != 32:
        raise StoreKeyError(f"{what} must hold 32 bytes, got {len(raw)}; {_FIX}")
    return raw


def load_public_key(value: str) -> Ed25519PublicKey:
    text = _text(value, "public key")
    try:
        if text.startswith(PUBLIC_PREFIX):
            return Ed25519PublicKey.from_public_bytes(_b64(text[len(PUBLIC_PREFIX):], "public key"))
        if text.startswith(PRIVATE_PREFIX):
            raise StoreKeyError("a private key was given where a public key belongs: replicas hold "
                                "only the public key (the .pub file of `hybridserve store keygen`)")
        key = (serialization.load_ssh_public_key(text.encode()) if text.startswith("ssh-")
               else serialization.load_pem_public_key(text.encode()))
    except StoreKeyError:
        raise
    except ValueError as e:
        raise StoreKeyError(f"public key not readable ({e}); {_FIX}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise StoreKeyError(f"public key is {type(key).__name__}, not Ed25519; {_FIX}")
    return key


def load_private_key(value: str) -> Ed25519PrivateKey:
    text = _text(value, "signing key")
    try:
        if text.startswith(PRIVATE_PREFIX):
            return Ed25519PrivateKey.from_private_bytes(_b64(text[len(PRIVATE_PREFIX):], "signing key"))
        key = serialization.load_pem_private_key(text.encode(), password=None)
    except StoreKeyError:
        raise
    except (ValueError, TypeError) as e:
        raise StoreKeyError(f"signing key not readable ({e}); {_FIX}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise StoreKeyError(f"signing key is {type(key).__name__}, not Ed25519; {_FIX}")
    return key


def signing_key_from_env(var: str | None) -> Ed25519PrivateKey | None:
    """The private key in ``$var`` (its text or a file path), None when the variable is unset."""
    value = os.environ.get(var) if var else None
    return load_private_key(value) if value else None


def sign(data: bytes, priv: Ed25519PrivateKey) -> dict:
    pub = priv.public_key()
    return {"alg": "ed25519", "key_id": key_id(pub),
            "value": base64.b64encode(priv.sign(data)).decode()}


def verify(data: bytes, sig: dict, pubs: list[Ed25519PublicKey]) -> bool:
    """True when ``sig`` is a valid signature of ``data`` by one of ``pubs``."""
    try:
        raw = base64.b64decode(str(sig.get("value", "")), validate=True)
    except (binascii.Error, ValueError):
        return False
    for pub in pubs:
        if sig.get("key_id") not in (None, key_id(pub)):
            continue
        try:
            pub.verify(raw, data)
            return True
        except InvalidSignature:
            continue
    return False
