"""The ``rlhf-influence`` command: parses arguments and calls the library, nothing else."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings

from . import __version__
from .engine.checks import finite_number_problem, whole_number_problem

JUMP_RULE = (
    "Round k is a jump when its mean reward minus round k-1's exceeds --z standard deviations of all "
    "round-to-round changes and --min-delta. Round k's rollouts came from the policy trained on round "
    "k-1's records, so the jump is attributed to round k-1: its records ranked by influence on that "
    "round's return target (top: pushed the reward up; bottom: pushed it down)."
)


def whole_number(low: int):
    """An argparse type: a whole number >= ``low``, said in the error when it is not."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if problem := whole_number_problem(value, low):
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def finite_number(low: float, high: float = math.inf, low_included: bool = True):
    """An argparse type: a finite number in the range, said in the error when it is not."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if problem := finite_number_problem(value, low, high, low_included):
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def _run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a run's output directory (or its attribution/ folder)")


def _jump_rule(parser: argparse.ArgumentParser, top: int) -> None:
    parser.add_argument(
        "--z",
        type=finite_number(0.0),
        default=1.5,
        help="jump threshold in standard deviations (default 1.5)",
    )
    parser.add_argument(
        "--min-delta",
        type=finite_number(0.0),
        default=0.0,
        help="smallest reward change that counts (default 0)",
    )
    parser.add_argument(
        "--top", type=whole_number(1), default=top, help=f"records listed per jump and side (default {top})"
    )


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def terminal_text(text) -> str:
    """Model or user text made safe to print: control characters (terminal escape sequences among
    them) and newlines shown as visible escapes, so a response cannot recolour or retitle the terminal."""
    return _CONTROL.sub(lambda m: "\\n" if m.group() == "\n" else f"\\x{ord(m.group()):02x}", str(text))


def _show_warning(
    message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning
) -> None:
    """This package's warnings as one line on stderr; anything else as Python shows it."""
    from .engine.errors import UnknownTokenWarning

    if issubclass(category, UnknownTokenWarning):
        print(f"rlhf-influence: warning: {terminal_text(message)}", file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


class UsageError(Exception):
    """Flags that parse but do not go together (reported like a store error: one line, exit 2)."""


def _behaviour(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--prompt", required=required, help="the prompt text")
    parser.add_argument("--response", required=required, help="the response text whose likelihood is traced")


def _adam(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adam",
        action="store_true",
        help="Adam-aware scores: the behaviour's gradient multiplied by Adam's preconditioner at the round start "
        "(1 / (sqrt(v_hat) + eps), from the moments the run stored), the direction Adam moved the weights along for "
        "each record. Needs a run trained with --iif_store_optimizer_state true; rounds before Adam's first step "
        "have no second moment and are left out",
    )


def _responses(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--responses",
        type=whole_number(0),
        default=4,
        help="for each jump, trace its round's N highest-reward responses to the records of the round before "
        "that made them more likely (from the stored gradients; rebuilds the policy once from the saved base "
        "model, or from the one the run names, which may need the hub or its cache: seconds on a small "
        "model; 0: skip; default 4)",
    )


def _json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for machines instead of tables")


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {terminal_text(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="rlhf-influence",
        description=(
            "Local data attribution for RLHF: which rollout records drove a PPO update, and "
            "influence-based filtering (IIF) of the harmful ones. Every command only reads the run."
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
    _run(audit)
    _jump_rule(audit, top=5)
    _responses(audit)
    _json(audit)

    score = commands.add_parser(
        "score",
        help="which records of a round pushed the model toward saying RESPONSE to PROMPT",
        description="Score a behaviour chosen now against round K's stored projected gradients: the "
        "gradient of log pi(response | prompt) at round K's stored adapter, projected with the run's seed, "
        "dotted with every record's gradient. Positive: the record's update made the response more likely.",
    )
    _run(score)
    score.add_argument(
        "--round", type=whole_number(1), required=True, help="the round whose records are scored"
    )
    _behaviour(score)
    score.add_argument(
        "--top", type=whole_number(1), default=10, help="records listed on each side (default 10)"
    )
    _adam(score)
    _json(score)

    diagnose = commands.add_parser(
        "diagnose",
        help="are the most harmful records the ones with wrong-sign advantages?",
        description="For every round, the share of records whose advantage estimate (mean over the response) "
        "has the opposite sign of their reward minus the round's mean reward, among the bottom records by "
        "influence, the top ones, and all of them.",
    )
    _run(diagnose)
    diagnose.add_argument(
        "--bottom-fraction",
        type=finite_number(0.0, 0.5, low_included=False),
        default=0.1,
        help="share of records called bottom/top, in (0, 0.5] (default 0.1)",
    )
    _json(diagnose)

    formation = commands.add_parser(
        "formation",
        help="how the records behind a behaviour change across rounds",
        description="For each round, the records whose update made RESPONSE to PROMPT more likely, scored from "
        "the round's stored gradients at its round-start adapter.",
    )
    _run(formation)
    _behaviour(formation)
    formation.add_argument(
        "--top", type=whole_number(1), default=3, help="records listed per round (default 3)"
    )
    formation.add_argument(
        "--rounds", type=whole_number(1), nargs="+", help="only these rounds (default: all)"
    )
    _adam(formation)
    _json(formation)

    intervene = commands.add_parser(
        "intervene",
        help="re-run a round without the records that most raised a behaviour or its return target",
        description="Re-run round K's policy update (PPO's or GRPO's) from its stored snapshot three ways: on all records, "
        "without the --remove records that most raised the target (exact influence at the snapshot), and "
        "without as many random records. Prints the target after each. The target is a behaviour, "
        "log p(RESPONSE | PROMPT), or with --return-target the round's own return target: the held-out "
        "samples it drew that round with their advantages (or its buffer, for buffer_return runs), i.e. what "
        "IIF filtered against.",
    )
    _run(intervene)
    intervene.add_argument("--round", type=whole_number(1), required=True, help="the round to re-run")
    _behaviour(intervene, required=False)
    intervene.add_argument(
        "--return-target",
        action="store_true",
        help="trace the round's return target instead of a behaviour (no --prompt/--response)",
    )
    intervene.add_argument(
        "--remove", type=whole_number(1), help="records removed (default: 10%% of the round)"
    )
    intervene.add_argument(
        "--seed", type=whole_number(0), default=0, help="seed of the mini-batch order and random control"
    )
    _json(intervene)

    report = commands.add_parser(
        "report",
        help="one self-contained HTML page: curves, influence distribution, records behind each jump",
        description="Write a self-contained HTML report that opens offline: interactive Plotly charts (reward and "
        "KL per round, kept share, influence distributions; plotly.js inlined, about 5 MB) and, for each jump, "
        "the records behind it with their reward, advantages and influence. Run text is escaped. "
        + JUMP_RULE,
    )
    _run(report)
    report.add_argument(
        "-o", "--output", default="report.html", help="the HTML file to write (default report.html)"
    )
    report.add_argument(
        "--compare", metavar="RUN", help="another run (e.g. plain PPO with --iif_drop_fraction 0) whose reward "
        "and KL are drawn dashed beside this run's",
    )  # fmt: skip
    _jump_rule(report, top=5)
    _responses(report)
    return parser


def run_intervene(args) -> int:
    from dataclasses import asdict

    from .audit.intervention import intervene, intervene_return

    if args.return_target:
        if args.prompt is not None or args.response is not None:
            raise UsageError(
                "--return-target traces the round's return target: leave out --prompt/--response"
            )
        result = intervene_return(args.run, args.round, remove=args.remove, seed=args.seed)
    else:
        if args.prompt is None or args.response is None:
            raise UsageError("give the behaviour as --prompt and --response, or use --return-target")
        result = intervene(
            args.run, args.round, args.prompt, args.response, remove=args.remove, seed=args.seed
        )
    if args.json:
        print(json.dumps(asdict(result), indent=2))
        return 0
    print(f"round {result.round}: {terminal_text(result.target)}")
    rows = [
        ("at the round start", result.target_before),
        ("after the round's update on all records", result.target_all),
        (f"... without the top {result.removed} records for it", result.target_without_top),
        (f"... without {result.removed} random records (mean)", result.target_without_random),
    ]
    for label, value in rows:
        print(f"  {label:<46}{value:+.4f}")
    if result.moments == "fresh":
        print("  (the re-runs start from fresh Adam moments: the run stored none; --iif_store_optimizer_state true "
              "keeps them)")
    return 0


def run_report(args) -> int:
    from pathlib import Path

    from .audit.report import render_report
    from .store import AttributionStore, StoreError

    output = Path(args.output).resolve()
    runs = [("", args.run)] + ([("--compare ", args.compare)] if args.compare is not None else [])
    for which, path in runs:
        try:
            run = AttributionStore.open(path).run_dir.resolve()
        except StoreError as exc:
            if not which:
                raise
            raise UsageError(f"--compare {path}: {exc}") from None
        if output == run or run in output.parents:
            raise UsageError(
                f"--output {args.output} lies inside the {which}run {run}: the CLI never writes there"
            )
    if output.is_dir():
        raise UsageError(f"--output {args.output} is a directory; name the HTML file to write")
    page = render_report(
        args.run,
        z=args.z,
        min_delta=args.min_delta,
        top=args.top,
        responses=args.responses,
        compare=args.compare,
    )
    try:
        output.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write --output {args.output}: {exc.strerror or exc}") from None
    print(f"wrote {args.output}")
    return 0


def run_diagnose(args) -> int:
    from .audit.analyses import diagnose

    result = diagnose(args.run, bottom_fraction=args.bottom_fraction)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"wrong-sign advantages (bottom/top = {args.bottom_fraction:.0%} by influence)")
    for name in ("round", "records", "bottom", "top", "all"):
        table.add_column(name, justify="right")
    for r in result["rounds"]:
        table.add_row(str(r["round"]), str(r["records"]), f"{r['bottom_wrong_sign']:.0%}", f"{r['top_wrong_sign']:.0%}",
                      f"{r['all_wrong_sign']:.0%}")  # fmt: skip
    o = result["overall"]
    table.add_row("all", "", f"{o['bottom_wrong_sign']:.0%}", f"{o['top_wrong_sign']:.0%}", f"{o['all_wrong_sign']:.0%}",
                  style="bold")  # fmt: skip
    Console().print(table)
    return 0


def run_formation(args) -> int:
    from .audit.analyses import formation

    result = formation(args.run, args.prompt, args.response, top=args.top, rounds=args.rounds, adam=args.adam)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if result.get("rounds_before_adam"):
        print(f"note: rounds {', '.join(map(str, result['rounds_before_adam']))} start before Adam's first step "
              "(no second moment yet) and have no Adam-aware scores")  # fmt: skip
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"records making {args.response!r} more likely after {args.prompt!r}, by round"
        + (" (Adam-aware)" if args.adam else "")
    )  # repr: escaped
    for name, justify in (("round", "right"), ("positive", "right"), ("influence", "right"), ("reward", "right"),
                          ("prompt", "left"), ("response", "left")):  # fmt: skip
        table.add_column(name, justify=justify, overflow="fold")
    for r in result["rounds"]:
        for i, rec in enumerate(r["top_records"]):
            table.add_row(str(r["round"]) if i == 0 else "", f"{r['positive_fraction']:.0%}" if i == 0 else "",
                          f"{rec['influence']:+.3e}", f"{rec['reward']:+.3f}", terminal_text(rec["prompt"]),
                          terminal_text(rec["response"]))  # fmt: skip
    Console().print(table, markup=False)
    return 0


def print_records(title: str, groups: list[tuple[str, list, str]], what: str = "influence") -> None:
    """One rich table of records (influence in fixed notation, reward, advantages where known,
    kept, prompt, response), grouped and coloured."""
    import math

    from rich.console import Console
    from rich.table import Table

    from .audit.report import fixed_scale

    rows_all = [r for _, rows, _ in groups for r in rows]
    scale, note = fixed_scale([r.influence for r in rows_all])
    advantages = any(math.isfinite(getattr(r, "advantage_mean", math.nan)) for r in rows_all)
    table = Table(title=title)
    columns = [("", "left"), (what + note, "right"), ("reward", "right")]
    columns += [("adv. mean", "right"), ("adv. last", "right")] if advantages else []
    columns += [("kept", "center"), ("prompt", "left"), ("response", "left")]
    for name, justify in columns:
        table.add_column(name, justify=justify, overflow="fold")
    for label, rows, style in groups:
        for r in rows:
            cells = [label, f"{r.influence / 10**scale:+.2f}", f"{r.reward:+.3f}"]
            if advantages:
                cells += [f"{r.advantage_mean:+.3f}", f"{r.advantage_last:+.3f}"]
            cells += ["yes" if r.kept else "no", terminal_text(r.prompt), terminal_text(r.response)]
            table.add_row(*cells, style=style)
    Console().print(table, markup=False)


def run_score(args) -> int:
    from dataclasses import asdict

    from .audit.rescore import score_behaviour

    scored = score_behaviour(args.run, args.round, args.prompt, args.response, adam=args.adam)
    ranked = sorted(scored, key=lambda r: -r.influence)
    if args.json:
        print(json.dumps({"round": args.round, "prompt": args.prompt, "response": args.response, "adam": args.adam,
                          "records": [asdict(r) for r in ranked]}, indent=2))  # fmt: skip
        return 0
    print_records(
        f"round {args.round}: {'Adam-aware ' if args.adam else ''}influence on log p({args.response!r} | {args.prompt!r})",
        [("toward", ranked[: args.top], "green"), ("away", ranked[::-1][: args.top], "red")],
    )
    return 0


def run_audit(args) -> int:
    from .audit import audit_run

    report = audit_run(args.run, z=args.z, min_delta=args.min_delta, top=args.top, responses=args.responses)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, allow_nan=False))
        return 0
    from rich.console import Console

    console = Console()
    rewards = [r.mean_reward for r in report.rounds]
    kept = sum(r.kept for r in report.rounds)
    total = kept + sum(r.dropped for r in report.rounds)
    console.print(
        f"[bold]{len(report.rounds)} rounds[/], mean reward {rewards[0]:+.3f} -> {rewards[-1]:+.3f} "
        f"(best {max(rewards):+.3f}); {kept}/{total} records kept ({kept / max(total, 1):.0%}); "
        + (f"influence scores: {report.score}{' (Adam-aware)' if report.score == 'adam' else ''}"
           if report.score != "none" else "recorded only (iif_target none): no scores")
        + ("; each record's loss with its value term" if report.record_loss == "policy_and_value" else "")
    )
    if not report.jumps:
        console.print(f"no reward jump above {args.z} standard deviations of the round-to-round changes")
    for jump in report.jumps:
        if report.score == "none":  # a record-only run: only the traced responses attribute the jump
            console.print(f"round {jump.round}: reward {jump.reward_delta:+.3f}; the run recorded gradients "
                          "only (iif_target none): traced through its best responses (--responses)", markup=False)  # fmt: skip
        else:
            print_records(
                f"round {jump.round}: reward {jump.reward_delta:+.3f}, driven by round {jump.attributed_round}'s "
                "records",
                [("top", jump.top_records, "green"), ("bottom", jump.bottom_records, "red")],
            )
        best = jump.best_responses
        if best is None:
            continue
        if best.note:
            console.print(f"round {jump.round}'s best responses: {best.note}", markup=False)
            continue
        print_responses(
            f"round {jump.round}'s {len(best.responses)} highest-reward responses", best.responses
        )
        print_records(
            f"round {jump.attributed_round}'s records that most raised their probability ({best.kept_text()})",
            [("raised", best.records, "green")],
            what="influence on them",
        )
    return 0


def print_responses(title: str, rows: list) -> None:
    """Records as reward, prompt and response only."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name, justify in (("reward", "right"), ("prompt", "left"), ("response", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    for r in rows:
        table.add_row(f"{r.reward:+.3f}", terminal_text(r.prompt), terminal_text(r.response), style="cyan")
    Console().print(table, markup=False)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0

    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _dispatch(args)


def _dispatch(args) -> int:
    from .store import AttributionStore, StoreError

    try:
        stale = AttributionStore.open(args.run).stale_temporaries()
        if stale:
            names = ", ".join(terminal_text(p.name) for p in stale)
            print(f"rlhf-influence: note: ignoring {len(stale)} half-written round(s) of a killed run: {names}",
                  file=sys.stderr)  # fmt: skip
        commands = {
            "audit": run_audit,
            "score": run_score,
            "diagnose": run_diagnose,
            "formation": run_formation,
            "report": run_report,
            "intervene": run_intervene,
        }
        return commands[args.command](args)
    except (StoreError, UsageError) as exc:
        print(f"rlhf-influence: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
