"""The artifact store: compiled Triton kernels and warm lists shared between replicas, signed.

Imports neither Ray nor the engine; the engine calls ``ArtifactManager`` (restore / publish).
"""
from .config import StoreConfig
from .fingerprint import fields_diff, fingerprint, fingerprint_fields
from .keys import StoreKeyError, generate, load_private_key, load_public_key
from .manager import ArtifactManager, RestoreResult
from .manifest import Trust
from .store import ArtifactStore, LoadResult

__all__ = ["ArtifactManager", "ArtifactStore", "LoadResult", "RestoreResult", "StoreConfig",
           "StoreKeyError", "Trust", "fields_diff", "fingerprint", "fingerprint_fields", "generate",
           "load_private_key", "load_public_key"]
