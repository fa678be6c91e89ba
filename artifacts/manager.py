"""One engine's view of the store: restore before compiling (within a deadline), publish after.

Never raises on store trouble: failures are logged and reported in the results (``error``,
``rejected``); the engine then starts cold and compiles on its JIT path.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import manifest as mf
from .config import OBJECT_STORE_SCHEMES, StoreConfig
from .fingerprint import fingerprint
from .keys import load_public_key, signing_key_from_env
from .kinds import collect
from .store import ArtifactStore, Deadline, DeadlinePassed, ProgressFactory

log = logging.getLogger("hybridserve.store")


@dataclass
class RestoreResult:
    warm_buckets: dict[int, float] = field(default_factory=dict)   # bucket -> capture cost ms
    warm_batches: dict[int, float] = field(default_factory=dict)   # decode batch size -> capture ms
    rejected: list[str] = field(default_factory=list)              # trust / integrity refusals
    loaded: bool = False
    entry: str | None = None
    files: int = 0
    skipped: list[str] = field(default_factory=list)               # fingerprint mismatch etc.
    error: str | None = None              # store unreachable, deadline passed, no trusted key
    seconds: float = 0.0


def storage_options(cfg: StoreConfig) -> dict:
    """The config's fsspec options (else $HYBRIDSERVE_STORE_OPTIONS); on S3, socket timeouts
    within the restore deadline unless given."""
    env = os.environ.get("HYBRIDSERVE_STORE_OPTIONS")
    opts = dict(cfg.store_options) if cfg.store_options else (json.loads(env) if env else {})
    scheme = (cfg.store or "").split("://", 1)[0] if "://" in (cfg.store or "") else ""
    if scheme in ("s3", "s3a") and "config_kwargs" not in opts:
        t = cfg.store_restore_timeout_s
        opts["config_kwargs"] = {"connect_timeout": min(10.0, t), "read_timeout": t,
                                 "retries": {"max_attempts": 2}}
    elif scheme in OBJECT_STORE_SCHEMES:
        opts.setdefault("skip_instance_cache", True)
    return opts


class ArtifactManager:
    """``cache_dir``: the directory the engine points its compile cache at (TRITON_CACHE_DIR is
    ``<cache_dir>/triton``)."""

    def __init__(self, config: StoreConfig, fields: dict, cache_dir: str | os.PathLike,
                 progress: ProgressFactory | None = None):
        self.config = config
        self.store_url = config.store
        self.fields = dict(fields)
        self.fingerprint = fingerprint(self.fields)
        self.cache_dir = Path(cache_dir)
        self.progress = progress
        self.signing_key = signing_key_from_env(config.store_signing_key_env)
        self.trust = mf.Trust(tuple(load_public_key(k) for k in config.store_public_keys),
                              config.store_trust_unsigned_local)
        self._store: ArtifactStore | None = None
        self._restored_files: dict[str, str] | None = None     # relpath -> sha256
        self._restored_warm: dict[int, float] = {}
        self._restored_batches: dict[int, float] = {}
        self._said_unsigned = False
        self.last_publish = None

    @classmethod
    def from_config(cls, cfg: StoreConfig, fields: dict, cache_dir: str | os.PathLike,
                    **kw: Any) -> "ArtifactManager":
        """From an EngineConfig (a StoreConfig)."""
        return cls(cfg, fields, cache_dir, **kw)

    @property
    def enabled(self) -> bool:
        return bool(self.store_url)

    @property
    def store(self) -> ArtifactStore:
        if self._store is None:
            self._store = ArtifactStore(self.store_url, self.trust, storage_options(self.config),
                                        signing_key=self.signing_key)
        return self._store

    def restore(self) -> RestoreResult:
        out = RestoreResult()
        if not self.enabled:
            return out
        t0 = time.perf_counter()
        if not self.trust.any and self.signing_key is None:
            out.error = ("no trusted key: set store_public_keys (`hybridserve store keygen`), or "
                         "store_trust_unsigned_local for a local directory only you write")
            log.warning("artifact store %s: nothing restored (%s); starting cold", self.store_url, out.error)
            return out
        deadline = Deadline(self.config.store_restore_timeout_s)
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["res"] = self.store.load(self.fingerprint, self.cache_dir, fields=self.fields,
                                             progress=self.progress, deadline=deadline)
            except BaseException as e:  # noqa: BLE001 - reported below
                box["err"] = e

        t = threading.Thread(target=work, name="hybridserve-restore", daemon=True)
        t.start()
        t.join(deadline.seconds)
        if t.is_alive():
            with deadline.lock:         # after this no file moves into the cache
                deadline.cancelled = True
            t.join(0.1)
        res, err = box.get("res"), box.get("err")
        out.seconds = time.perf_counter() - t0
        if res is None:
            if err is None or isinstance(err, DeadlinePassed):
                out.error = (f"restore deadline of {deadline.seconds:g} s passed (store_restore_timeout_s; "
                             f"the store did not answer in time)")
            else:
                out.error = f"{type(err).__name__}: {err}"[:500]
            log.warning("artifact store %s: nothing restored (%s); starting cold", self.store_url, out.error)
            return out
        out.rejected, out.skipped = list(res.rejected), list(res.skipped)
        if res.loaded:
            out.loaded, out.entry, out.files = True, res.entry, len(res.files)
            out.warm_buckets, out.warm_batches = dict(res.warm_buckets), dict(res.warm_batches)
            self._restored_warm, self._restored_batches = dict(res.warm_buckets), dict(res.warm_batches)
            self._restored_files = {k: v["sha256"] for k, v in res.manifest["files"].items()}
        return out

    def publish(self, costs: dict[int, float], batch_costs: dict[int, float] | None = None) -> bool:
        """Publish the cache dir's kernel files + warm buckets ({bucket: capture_ms}) and warm
        decode batch sizes ({batch: capture_ms}) unless nothing is new. True if an entry was written."""
        if not self.enabled:
            return False
        if self.signing_key is None and not self.trust.unsigned:
            if not self._said_unsigned:
                log.info("artifact store %s: not publishing: no signing key in $%s (replicas load only "
                         "signed entries)", self.store_url, self.config.store_signing_key_env)
                self._said_unsigned = True
            return False
        try:
            files, rewritten = collect(self.cache_dir)
            warm = {**self._restored_warm, **{int(b): float(c) for b, c in costs.items()}}
            batches = {**self._restored_batches,
                       **{int(b): float(c) for b, c in (batch_costs or {}).items()}}
            cur = {k: v["sha256"] for k, v in files.items()}
            if not files and not warm and not batches:
                log.info("artifact store %s: nothing to publish", self.store_url)
                return False
            if (self._restored_files is not None and cur == self._restored_files
                    and set(warm) <= set(self._restored_warm) and set(batches) <= set(self._restored_batches)):
                log.info("artifact store %s: nothing new since restore of %s; not publishing",
                         self.store_url, self.fingerprint)
                return False
            res = self.store.publish(self.fingerprint, self.fields, self.cache_dir, warm, batches,
                                     progress=self.progress, collected=(files, rewritten))
        except Exception as e:  # noqa: BLE001 - the engine serves on regardless
            log.warning("artifact store %s: publish failed: %s: %s", self.store_url, type(e).__name__, e)
            return False
        self.last_publish = res
        self._restored_files, self._restored_warm, self._restored_batches = cur, warm, batches
        return res.created
