"""The store's settings: one pydantic model that engine.config.EngineConfig extends, so they sit
in serve_config.yaml's ``engine:`` section next to the engine's own (``store: PATH`` etc.)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .keys import StoreKeyError, load_public_key

OBJECT_STORE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs")


def is_local_url(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


class StoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store: str | None = Field(None, description="artifact store: local dir or fsspec URL (s3://...)")
    store_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec storage options, e.g. {endpoint_url: http://minio:9000} "
                                          "(default: $HYBRIDSERVE_STORE_OPTIONS as JSON; credentials from the env)")
    store_public_keys: list[str] = Field(
        default_factory=list, description="Ed25519 public keys (ed25519:..., or a file holding one) whose "
                                          "signed entries this replica loads; from `hybridserve store keygen`")
    store_signing_key_env: str = Field(
        "HYBRIDSERVE_STORE_SIGNING_KEY", description="env var with the private key (or its file path) that "
                                                     "signs published entries; set only where artifacts are built")
    store_trust_unsigned_local: bool = Field(
        False, description="also load unsigned entries; only for a local directory that only you can write")
    store_restore_timeout_s: float = Field(
        60.0, gt=0, description="restore gives up after this long and the replica starts cold")

    @field_validator("store_public_keys")
    @classmethod
    def _keys_parse(cls, v: list[str]) -> list[str]:
        for k in v:
            try:
                load_public_key(k)
            except StoreKeyError as e:
                raise ValueError(f"store_public_keys: {e}") from None
        return v

    @model_validator(mode="after")
    def _unsigned_only_local(self) -> "StoreConfig":
        if self.store_trust_unsigned_local and self.store and not is_local_url(self.store):
            raise ValueError(f"store_trust_unsigned_local applies to a local directory only, not "
                             f"{self.store}: sign entries and list the public key in store_public_keys")
        return self
