"""`hybridserve` command line: each sub-command family lives in its own module."""
from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> module exposing add_parser(subparsers); each parser sets func=callable(args)->int
SUBCOMMANDS = {
    "warm": "deployments.cli_store",
    "store": "deployments.cli_store",
    "dashboards": "deployments.dashboards",
}

NEEDS_GPU = ("hybridserve warm needs a CUDA GPU: it captures the engine's CUDA graphs and compiles its "
             "kernels for the GPU it runs on, and publishes them for replicas of that GPU kind. No GPU is "
             "visible here, so there is nothing to warm; run it on a GPU machine. (CPU replicas need no "
             "warm-up: they serve on the eager path.)")


def version() -> str:
    try:
        from importlib.metadata import version as dist_version
        return dist_version("hybridserve")
    except Exception:
        from engine import __version__
        return __version__


def _has_gpu() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybridserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hybridserve {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in dict.fromkeys(SUBCOMMANDS.values()):
        importlib.import_module(module).add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "warm" and args.device != "cpu" and not _has_gpu():
        print(NEEDS_GPU)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
