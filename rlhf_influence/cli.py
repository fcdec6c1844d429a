"""The ``rlhf-influence`` command: parses arguments and calls the library, nothing else."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__

JUMP_RULE = (
    "Round k is a jump when its mean reward minus round k-1's exceeds --z standard deviations of all "
    "round-to-round changes and --min-delta. Round k's rollouts came from the policy trained on round "
    "k-1's records, so the jump is attributed to round k-1: its records ranked by influence on that "
    "round's return target (top: pushed the reward up; bottom: pushed it down)."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-influence",
        description=(
            "Local data attribution for RLHF: which rollout records drove a PPO update, and "
            "influence-based filtering (IIF) of the harmful ones."
        ),
    )
    parser.add_argument("--version", action="version", version=f"rlhf-influence {__version__}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    audit = commands.add_parser(
        "audit",
        help="which responses drove each reward jump of a run",
        description="Find the rounds where the mean reward jumped and list the records that drove each. "
        + JUMP_RULE,
    )
    audit.add_argument("run", help="a run's output directory (or its attribution/ folder)")
    audit.add_argument(
        "--z", type=float, default=1.5, help="jump threshold in standard deviations (default 1.5)"
    )
    audit.add_argument(
        "--min-delta", type=float, default=0.0, help="smallest reward change that counts (default 0)"
    )
    audit.add_argument("--top", type=int, default=5, help="records listed per jump and side (default 5)")
    audit.add_argument("--json", action="store_true", help="print JSON for machines instead of tables")
    return parser


def run_audit(args) -> int:
    from .audit import audit_run

    report = audit_run(args.run, z=args.z, min_delta=args.min_delta, top=args.top)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    rewards = [r.mean_reward for r in report.rounds]
    kept = sum(r.kept for r in report.rounds)
    total = kept + sum(r.dropped for r in report.rounds)
    console.print(
        f"[bold]{len(report.rounds)} rounds[/], mean reward {rewards[0]:+.3f} -> {rewards[-1]:+.3f} "
        f"(best {max(rewards):+.3f}); {kept}/{total} records kept ({kept / max(total, 1):.0%})"
    )
    if not report.jumps:
        console.print(f"no reward jump above {args.z} standard deviations of the round-to-round changes")
    for jump in report.jumps:
        table = Table(
            title=f"round {jump.round}: reward {jump.reward_delta:+.3f}, driven by round {jump.attributed_round}'s records",
            show_lines=False,
        )
        for name, justify in (("", "left"), ("influence", "right"), ("reward", "right"), ("kept", "center"),
                              ("prompt", "left"), ("response", "left")):  # fmt: skip
            table.add_column(name, justify=justify, overflow="fold")
        for label, rows in (("top", jump.top_records), ("bottom", jump.bottom_records)):
            for r in rows:
                table.add_row(
                    label, f"{r.influence:+.3e}", f"{r.reward:+.3f}", "yes" if r.kept else "no", r.prompt, r.response,
                    style="green" if label == "top" else "red",
                )  # fmt: skip
        console.print(table, markup=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .store import StoreError

    try:
        return run_audit(args)
    except StoreError as exc:
        print(f"rlhf-influence: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
