"""The ``rlhf-influence`` command: parses arguments and calls the library, nothing else."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-influence",
        description=(
            "Local data attribution for RLHF: which rollout records drove a PPO update, and "
            "influence-based filtering (IIF) of the harmful ones."
        ),
    )
    parser.add_argument("--version", action="version", version=f"rlhf-influence {__version__}")
    parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
