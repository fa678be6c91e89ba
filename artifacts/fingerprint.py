"""Fingerprint: everything that decides whether stored compile artifacts are valid on a machine."""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import platform
import sys
from typing import Any

FORMAT_VERSION = 2      # 2: Ed25519-signed manifests, Triton kernel files only, warm batch sizes


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
    """The engine's __version__ when it is loaded (it is, when it calls us), else the dist's."""
    v = getattr(sys.modules.get("engine"), "__version__", None)
    return str(v) if v else (_dist_version("hybridserve") or "0")


def _compute_capability(device: Any) -> str:
    dev = str(device) if device is not None else "cpu"
    if not dev.startswith("cuda"):
        return dev.split(":")[0] or "cpu"
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def fingerprint_fields(model_config: dict, dtype: str, device: Any) -> dict:
    """``device``: a torch.device or string ("cuda", "cuda:0", "cpu"). Triton's version is read
    from package metadata: triton is never imported here."""
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
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "machine": platform.machine(),
        "engine": engine_version(),
    }


def fingerprint(fields: dict) -> str:
    return hashlib.sha256(canonical_json(fields)).hexdigest()[:16]


def fields_diff(stored: dict | None, local: dict) -> list[str]:
    """Human-readable differences, e.g. ["torch: stored '2.11.0', here '2.13.0'"]."""
    stored = stored or {}
    return [f"{k}: stored {stored.get(k)!r}, here {local.get(k)!r}"
            for k in sorted(set(stored) | set(local)) if stored.get(k) != local.get(k)]
