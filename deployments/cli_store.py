"""`hybridserve warm` and `hybridserve store ls|verify|prune`: the artifact store from a shell.

    hybridserve warm --preset llama-2-7b --store /shared/hybridserve-store          # on a GPU box
    hybridserve store ls --store s3://bucket/hybridserve --endpoint-url http://minio:9000
    hybridserve store verify --store /shared/hybridserve-store      # exit 1 if any entry is bad
    hybridserve store prune --store /shared/hybridserve-store --keep 2 [--invalid] [--dry-run]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from typing import Any


def _progress_factory():
    from tqdm import tqdm

    def make(total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                    leave=False, file=sys.stderr, disable=None)

    return make


def _open_store(args) -> "Any":
    from engine.store import ArtifactStore, hmac_key_from_env

    opts = None
    if getattr(args, "endpoint_url", None):
        opts = {"endpoint_url": args.endpoint_url}
    return ArtifactStore(args.store, hmac_key=hmac_key_from_env(args.key_env),
                         storage_options=opts)


def _fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_time(t: float | None) -> str:
    if not t:
        return "-"
    return _dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


# --------------------------------------------------------------------------------------------
def cmd_ls(args) -> int:
    from rich.console import Console
    from rich.table import Table

    store = _open_store(args)
    infos = store.ls(args.fingerprint)
    if args.json:
        print(json.dumps([{
            "fingerprint": i.fingerprint, "entry": i.entry, "complete": i.complete,
            "created": i.created, "files": i.files, "bytes": i.bytes, "signed": i.signed,
            "latest": i.latest, "warm_buckets": {str(k): v for k, v in i.warm_buckets.items()},
            "fields": i.fields} for i in infos], indent=1))
        return 0
    console = Console(width=max(Console().width, 160))
    if not infos:
        console.print(f"store {args.store}: empty")
        return 0
    t = Table(title=f"artifact store {args.store}")
    for col in ("fingerprint", "entry", "state", "created", "files", "size", "warm buckets",
                "signed", "dtype / arch / torch / triton / engine"):
        t.add_column(col)
    for i in infos:
        f = i.fields
        t.add_row(i.fingerprint, i.entry + (" (latest)" if i.latest else ""),
                  "complete" if i.complete else "incomplete", _fmt_time(i.created), str(i.files),
                  _fmt_size(i.bytes), ",".join(str(b) for b in i.warm_buckets) or "-",
                  "yes" if i.signed else "no",
                  " / ".join(str(f.get(k, "-")) for k in
                             ("dtype", "compute_capability", "torch", "triton", "engine")))
    console.print(t)
    return 0


def cmd_verify(args) -> int:
    store = _open_store(args)
    reports = store.verify(args.fingerprint, args.entry, progress=_progress_factory())
    bad = 0
    for r in reports:
        if r.ok:
            print(f"ok      {r.fingerprint}/{r.entry}")
        else:
            bad += 1
            print(f"FAILED  {r.fingerprint}/{r.entry}: " + "; ".join(r.errors))
    print(f"{len(reports)} entries checked, {bad} failed"
          + ("" if store.hmac_key else " (signatures not checked: no key in "
             f"${args.key_env})"))
    return 1 if bad else 0


def cmd_prune(args) -> int:
    store = _open_store(args)
    removed = store.prune(keep=args.keep, incomplete_grace_s=args.grace,
                          remove_invalid=args.invalid, fp=args.fingerprint, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for r in removed:
        print(f"{verb} {r}")
    print(f"{verb} {len(removed)} item(s)")
    return 0


# --------------------------------------------------------------------------------------------
def _parse_buckets(s: str | None) -> list[int] | None:
    if not s:
        return None
    try:
        return [int(x) for x in s.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--buckets takes comma-separated integers, got {s!r}")


def cmd_warm(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from engine import EngineConfig, HybridEngine
    from engine.store import ArtifactStore, hmac_key_from_env

    console = Console(stderr=True)
    kw: dict[str, Any] = dict(model=args.preset, store=args.store, prewarm_buckets="all",
                              device=args.device, dtype=args.dtype)
    if args.buckets:
        kw["buckets"] = args.buckets
    if args.max_context:
        kw["max_context"] = args.max_context
    if args.layers:
        kw["num_layers"] = args.layers
    cfg = EngineConfig(**kw)
    captures: list[tuple[int, float]] = []
    store_events: list[dict] = []
    t0 = time.perf_counter()
    with console.status(f"building {args.preset}: load artifacts, compile, capture "
                        f"{len(cfg.buckets)} buckets {cfg.buckets} ..."):
        eng = HybridEngine(cfg)

        def on_event(ev: dict) -> None:
            if ev.get("type") == "capture":
                captures.append((ev.get("bucket"), ev.get("seconds")))
            elif ev.get("type") == "store":
                store_events.append(ev)

        eng.add_listener(on_event)
        build_s = time.perf_counter() - t0
        # let background captures (if any) finish, then shut down (publishes if not yet done)
        deadline = time.monotonic() + args.timeout
        while eng.capturing_buckets() and time.monotonic() < deadline:
            time.sleep(0.2)
        warm = sorted(eng.warm_buckets())
        mgr = getattr(eng, "artifacts", None)
        eng.shutdown()
    total_s = time.perf_counter() - t0

    fp = getattr(mgr, "fingerprint", None)
    store = ArtifactStore(args.store, hmac_key=hmac_key_from_env(cfg.store_hmac_key_env))
    entries = [i for i in store.ls(fp) if i.complete] if fp else [i for i in store.ls() if i.complete]
    t = Table(title=f"hybridserve warm {args.preset}")
    t.add_column("item")
    t.add_column("value")
    t.add_row("engine ready", f"{build_s:.1f} s")
    t.add_row("total", f"{total_s:.1f} s")
    t.add_row("warm buckets", ",".join(map(str, warm)) or "-")
    t.add_row("store", args.store)
    if fp:
        t.add_row("fingerprint", fp)
    pub = getattr(mgr, "last_publish", None)
    if pub is not None:
        t.add_row("published", f"{pub.entry} ({'new' if pub.created else 'already present'}, "
                               f"{pub.files} files, {_fmt_size(pub.bytes)})")
    for ev in store_events:
        t.add_row(f"store {ev.get('action')}", str(ev.get("reason", "")))
    newest = max(entries, key=lambda i: i.created or 0, default=None)
    if newest is not None:
        t.add_row("newest entry", f"{newest.fingerprint}/{newest.entry}: "
                                  f"{newest.files} files, {_fmt_size(newest.bytes)}, "
                                  f"buckets {','.join(map(str, newest.warm_buckets))}")
    Console().print(t)
    if newest is None:
        console.print("[red]no entry in the store after warming: the engine published nothing")
        return 1
    return 0


# --------------------------------------------------------------------------------------------
def _store_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--store", required=required,
                   help="store URL: a local directory or fsspec URL such as s3://bucket/prefix")
    p.add_argument("--endpoint-url", default=None,
                   help="S3-compatible endpoint (else $AWS_ENDPOINT_URL / AWS defaults)")
    p.add_argument("--key-env", default="HYBRIDSERVE_STORE_KEY",
                   help="environment variable holding the manifest HMAC key (optional)")


def add_parser(subparsers) -> None:
    names = subparsers.choices if hasattr(subparsers, "choices") else {}
    if "warm" not in names:
        w = subparsers.add_parser("warm", help="build + publish warm artifacts (GPU machine)",
                                  description="Build an engine with every bucket captured and "
                                              "publish its compile artifacts and warm buckets.")
        w.add_argument("--preset", required=True, help="preset name or HF checkpoint dir")
        w.add_argument("--store", required=True, help="store URL (directory or s3://...)")
        w.add_argument("--buckets", type=_parse_buckets, default=None,
                       help="comma-separated prefill buckets (default: the engine's)")
        w.add_argument("--device", choices=["auto", "cuda", "cpu"], default="cuda")
        w.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"],
                       default="auto")
        w.add_argument("--layers", type=int, default=None, help="presets: fewer layers (testing)")
        w.add_argument("--max-context", type=int, default=None)
        w.add_argument("--timeout", type=float, default=1800.0,
                       help="seconds to wait for background captures")
        w.set_defaults(func=cmd_warm)

    if "store" not in names:
        s = subparsers.add_parser("store", help="inspect / verify / prune the artifact store")
        ss = s.add_subparsers(dest="store_command", required=True)
        p = ss.add_parser("ls", help="list entries")
        _store_args(p)
        p.add_argument("--fingerprint", default=None)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_ls)
        p = ss.add_parser("verify", help="check every file's sha256 (and signatures with a key)")
        _store_args(p)
        p.add_argument("--fingerprint", default=None)
        p.add_argument("--entry", default=None)
        p.set_defaults(func=cmd_verify)
        p = ss.add_parser("prune", help="remove old, incomplete (and --invalid) entries")
        _store_args(p)
        p.add_argument("--fingerprint", default=None)
        p.add_argument("--keep", type=int, default=2, help="newest entries kept per fingerprint")
        p.add_argument("--grace", type=float, default=3600.0,
                       help="seconds before an incomplete entry counts as abandoned")
        p.add_argument("--invalid", action="store_true", help="also remove entries failing verify")
        p.add_argument("--dry-run", action="store_true")
        p.set_defaults(func=cmd_prune)
