"""`hybridserve warm` and `hybridserve store keygen|ls|verify|prune`: the artifact store from a shell.

    hybridserve store keygen --out ~/.hybridserve/store-key          # once; key + key.pub
    HYBRIDSERVE_STORE_SIGNING_KEY=~/.hybridserve/store-key \
      hybridserve warm --preset llama-2-7b --store s3://bucket/hybridserve   # on a GPU box: signs
    hybridserve store ls --store s3://bucket/hybridserve --public-key ~/.hybridserve/store-key.pub
    hybridserve store verify --store /shared/store --public-key KEY.pub     # exit 1 if any entry is bad
    hybridserve store prune --store /shared/store --public-key KEY.pub --keep 2 [--invalid] [--dry-run]
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


class _Usage(Exception):
    """A command-line mistake: printed, exit status 2."""


def _open_store(args) -> "Any":
    from artifacts import ArtifactStore, StoreKeyError, Trust, load_public_key
    from artifacts.keys import signing_key_from_env

    opts = {"endpoint_url": args.endpoint_url} if getattr(args, "endpoint_url", None) else None
    try:
        trust = Trust(tuple(load_public_key(k) for k in args.public_key), args.trust_unsigned)
        return ArtifactStore(args.store, trust, storage_options=opts,
                             signing_key=signing_key_from_env(args.signing_key_env))
    except (StoreKeyError, ValueError) as e:
        raise _Usage(str(e)) from None


def _guard(fn):
    """fn(args) with a command-line mistake printed as one line and exit status 2."""
    def run(args) -> int:
        try:
            return fn(args)
        except _Usage as e:
            print(f"hybridserve: {e}", file=sys.stderr)
            return 2
    run.__wrapped__ = fn
    return run


def _no_trust_note(store) -> str:
    return ("" if store.trust.any else " (no trusted key given: pass --public-key KEY.pub, or "
            "--trust-unsigned for a local directory)")


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
    if not store.exists():
        print(f"store {args.store}: does not exist (no such directory, or nothing stored under "
              "that bucket/prefix)", file=sys.stderr)
        return 1
    infos = store.ls(args.fingerprint)
    if args.json:
        print(json.dumps([{
            "fingerprint": i.fingerprint, "entry": i.entry, "complete": i.complete,
            "created": i.created, "files": i.files, "bytes": i.bytes, "signer": i.signer,
            "trusted": i.trusted, "error": i.error, "latest": i.latest,
            "warm_buckets": {str(k): v for k, v in i.warm_buckets.items()},
            "warm_batches": {str(k): v for k, v in i.warm_batches.items()},
            "fields": i.fields} for i in infos], indent=1))
        return 0
    console = Console(width=max(Console().width, 200))
    if not infos:
        console.print(f"store {args.store}: exists, no entries")
        return 0
    t = Table(title=f"artifact store {args.store}")
    for col in ("fingerprint", "entry", "state", "created", "files", "size", "warm buckets",
                "warm batches", "signer", "trusted", "dtype / arch / torch / triton / engine"):
        t.add_column(col)
    for i in infos:
        f = i.fields
        t.add_row(i.fingerprint, i.entry + (" (latest)" if i.latest else ""),
                  "complete" if i.complete else "incomplete", _fmt_time(i.created), str(i.files),
                  _fmt_size(i.bytes), ",".join(str(b) for b in i.warm_buckets) or "-",
                  ",".join(str(b) for b in i.warm_batches) or "-", i.signer or "unsigned",
                  "yes" if i.trusted else "no",
                  " / ".join(str(f.get(k, "-")) for k in
                             ("dtype", "compute_capability", "torch", "triton", "engine")))
    console.print(t)
    for i in infos:
        if i.complete and not i.trusted:
            console.print(f"not trusted {i.fingerprint}/{i.entry}: {i.error}", soft_wrap=True)
    if not store.trust.any:
        console.print(_no_trust_note(store).strip(" ()"))
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
    print(f"{len(reports)} entries checked, {bad} failed" + _no_trust_note(store))
    return 1 if bad else 0


def cmd_prune(args) -> int:
    store = _open_store(args)
    removed = store.prune(keep=args.keep, incomplete_grace_s=args.grace,
                          remove_invalid=args.invalid, fp=args.fingerprint, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    if not store.trust.any:
        print("note: no trusted key given, so no entry counts as valid; only incomplete ones "
              "(and with --invalid, all) are removed", file=sys.stderr)
    for r in removed:
        print(f"{verb} {r}")
    print(f"{verb} {len(removed)} item(s)")
    return 0


def cmd_keygen(args) -> int:
    import os
    from pathlib import Path

    from artifacts import generate

    priv_path = Path(os.path.expanduser(args.out))
    pub_path = priv_path.with_name(priv_path.name + ".pub")
    for p in (priv_path, pub_path):
        if p.exists() and not args.force:
            raise _Usage(f"{p} exists; pass --force to replace it (entries signed with the old key "
                         "then stop loading on replicas that trust only the new one)")
    priv, pub = generate()
    priv_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(priv + "\n")
    os.chmod(priv_path, 0o600)
    pub_path.write_text(pub + "\n")
    print(f"private key: {priv_path} (only where artifacts are built: "
          f"HYBRIDSERVE_STORE_SIGNING_KEY={priv_path} hybridserve warm ...)")
    print(f"public key:  {pub_path}")
    print(f"replicas (serve_config.yaml, engine:):  store_public_keys: [\"{pub}\"]")
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

    from artifacts import StoreKeyError
    from artifacts.config import is_local_url
    from artifacts.keys import signing_key_from_env
    from engine import EngineConfig, HybridEngine

    console = Console(stderr=True)
    try:
        key = signing_key_from_env(args.signing_key_env)
    except StoreKeyError as e:
        raise _Usage(f"${args.signing_key_env}: {e}") from None
    if args.trust_unsigned and not is_local_url(args.store):
        raise _Usage(f"--trust-unsigned applies to a local directory only, not {args.store}")
    if key is None and not args.trust_unsigned:
        raise _Usage(f"hybridserve warm signs what it publishes: set ${args.signing_key_env} to the "
                     "private key from `hybridserve store keygen` (or its file path); "
                     "--trust-unsigned publishes unsigned, to a local directory only")
    kw: dict[str, Any] = dict(model=args.preset, store=args.store, prewarm_buckets="all",
                              device=args.device, dtype=args.dtype,
                              store_signing_key_env=args.signing_key_env,
                              store_trust_unsigned_local=bool(args.trust_unsigned))
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
    store = mgr.store
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
    p.add_argument("--public-key", action="append", default=[],
                   help="trusted Ed25519 public key (ed25519:... or a .pub file); repeatable")
    p.add_argument("--trust-unsigned", action="store_true",
                   help="also trust unsigned entries (a local directory only)")
    p.add_argument("--signing-key-env", default="HYBRIDSERVE_STORE_SIGNING_KEY",
                   help="env var with the publisher's private key (its entries count as trusted)")


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
        w.add_argument("--signing-key-env", default="HYBRIDSERVE_STORE_SIGNING_KEY",
                       help="env var with the private key that signs the entry")
        w.add_argument("--trust-unsigned", action="store_true",
                       help="publish unsigned (a local directory whose replicas opt in)")
        w.set_defaults(func=_guard(cmd_warm))

    if "store" not in names:
        s = subparsers.add_parser("store", help="keys for / inspect / verify / prune the artifact store")
        ss = s.add_subparsers(dest="store_command", required=True)
        p = ss.add_parser("keygen", help="new Ed25519 key pair: PATH (private) and PATH.pub")
        p.add_argument("--out", required=True, help="private key file (written 0600); PATH.pub too")
        p.add_argument("--force", action="store_true", help="replace existing files")
        p.set_defaults(func=_guard(cmd_keygen))
        p = ss.add_parser("ls", help="list entries")
        _store_args(p)
        p.add_argument("--fingerprint", default=None)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=_guard(cmd_ls))
        p = ss.add_parser("verify", help="check signatures and every file's size and sha256")
        _store_args(p)
        p.add_argument("--fingerprint", default=None)
        p.add_argument("--entry", default=None)
        p.set_defaults(func=_guard(cmd_verify))
        p = ss.add_parser("prune", help="remove old, incomplete (and --invalid) entries")
        _store_args(p)
        p.add_argument("--fingerprint", default=None)
        p.add_argument("--keep", type=int, default=2, help="newest entries kept per fingerprint")
        p.add_argument("--grace", type=float, default=3600.0,
                       help="seconds before an incomplete entry counts as abandoned")
        p.add_argument("--invalid", action="store_true", help="also remove entries failing verify")
        p.add_argument("--dry-run", action="store_true")
        p.set_defaults(func=_guard(cmd_prune))
