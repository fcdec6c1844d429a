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
    score = commands.add_parser(
        "score",
        help="which records of a round pushed the model toward saying RESPONSE to PROMPT",
        description="Score a behaviour chosen now against round K's stored projected gradients: the "
        "gradient of log pi(response | prompt) at round K's stored adapter, projected with the run's seed, "
        "dotted with every record's gradient. Positive: the record's update made the response more likely.",
    )
    score.add_argument("run", help="a run's output directory (or its attribution/ folder)")
    score.add_argument("--round", type=int, required=True, help="the round whose records are scored")
    score.add_argument("--prompt", required=True, help="the prompt text")
    score.add_argument("--response", required=True, help="the response text whose likelihood is traced")
    score.add_argument("--top", type=int, default=10, help="records listed on each side (default 10)")
    score.add_argument("--json", action="store_true", help="print every record's influence as JSON")
    return parser


def run_score(args) -> int:
    from dataclasses import asdict

    from .audit.rescore import score_behaviour

    scored = score_behaviour(args.run, args.round, args.prompt, args.response)
    ranked = sorted(scored, key=lambda r: -r.influence)
    if args.json:
        print(json.dumps({"round": args.round, "prompt": args.prompt, "response": args.response,
                          "records": [asdict(r) for r in ranked]}, indent=2))  # fmt: skip
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"round {args.round}: influence on log p({args.response!r} | {args.prompt!r})")
    for name, justify in (("", "left"), ("influence", "right"), ("reward", "right"), ("kept", "center"),
                          ("prompt", "left"), ("response", "left")):  # fmt: skip
        table.add_column(name, justify=justify, overflow="fold")
    for label, rows in (("toward", ranked[: args.top]), ("away", ranked[::-1][: args.top])):
        for r in rows:
            table.add_row(label, f"{r.influence:+.3e}", f"{r.reward:+.3f}", "yes" if r.kept else "no", r.prompt,
                          r.response, style="green" if label == "toward" else "red")  # fmt: skip
    Console().print(table, markup=False)
    return 0


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
        return {"audit": run_audit, "score": run_score}[args.command](args)
    except StoreError as exc:
        print(f"rlhf-influence: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
