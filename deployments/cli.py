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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybridserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in dict.fromkeys(SUBCOMMANDS.values()):
        importlib.import_module(module).add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
