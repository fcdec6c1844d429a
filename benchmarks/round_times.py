"""Time per round and its split, from finished runs' attribution stores, beside the reward.

Reads every round's metrics.json of each run (the trainer logs the wall time of each phase:
rollout, held-out target sampling, scoring, optimisation) and reports the median over rounds
2.. (round 1 includes warm-up), the ratio of each run's round to the `ppo` run's (iif_drop_fraction
0: its scoring is only there for the store, so PPO's round counts rollout + optimisation), and
the mean reward of the first and last rounds.

    python benchmarks/round_times.py ppo=runs/a iif_round=runs/b --out benchmarks/results/reviews_cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

PHASES = ("rollout", "target_sampling", "scoring", "optimisation")


def read_rounds(run_dir: Path) -> list[dict]:
    files = sorted((run_dir / "attribution").glob("round_*/metrics.json"))
    if not files:
        raise SystemExit(f"round_times.py: {run_dir} holds no finished rounds")
    return [json.loads(f.read_text()) for f in files]


def summarise(name: str, rounds: list[dict]) -> dict:
    timed = rounds[1:] or rounds
    phases = {p: statistics.median(r.get(f"time/{p}_seconds", 0.0) for r in timed) for p in PHASES}
    needed = ("rollout", "optimisation") if name == "ppo" else PHASES  # all plain PPO needs
    k = max(1, min(5, len(rounds) // 3))
    rewards = [r["objective/scores"] for r in rounds]
    return {
        "rounds": len(rounds),
        "seconds": phases,
        "round_seconds": sum(phases[p] for p in needed),
        "kept_fraction": statistics.fmean(r.get("iif/kept_fraction", 1.0) for r in rounds),
        "reward_first": statistics.fmean(rewards[:k]),
        "reward_last": statistics.fmean(rewards[-k:]),
        "kl_last": statistics.fmean(r["objective/kl"] for r in rounds[-k:]),
        "rewards": rewards,
    }


def table(summary: dict) -> str:
    base = summary.get("ppo", {}).get("round_seconds")
    lines = ["| run | precision | rounds | rollout | target sampling | scoring | optimisation | round | vs ppo | kept | reward first -> last |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, s in summary.items():
        t = s["seconds"]
        ratio = f"{s['round_seconds'] / base:.2f}x" if base else "-"
        lines.append(
            f"| {name} | {s.get('mixed_precision')} | {s['rounds']} | {t['rollout']:.2f} | {t['target_sampling']:.2f} | {t['scoring']:.2f} | "
            f"{t['optimisation']:.2f} | {s['round_seconds']:.2f} | {ratio} | {s['kept_fraction']:.2f} | "
            f"{s['reward_first']:+.3f} -> {s['reward_last']:+.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR; name a plain-PPO run 'ppo' to get ratios")
    parser.add_argument("--out", type=Path, help="folder for summary.json and table.md")
    parser.add_argument("--device", default=None, help="the machine, in words, for the record")
    args = parser.parse_args(argv)
    summary = {}
    for spec in args.runs:
        name, sep, path = spec.partition("=")
        if not sep:
            parser.error(f"{spec!r}: give runs as NAME=RUN_DIR")
        summary[name] = summarise(name, read_rounds(Path(path)))
        manifest = json.loads((Path(path) / "attribution" / "manifest.json").read_text())
        summary[name]["mixed_precision"] = manifest.get("mixed_precision")
    device = args.device or f"{platform.machine()} CPU, {platform.node()}"
    text = f"median over rounds 2.. (seconds); {device}\n\n{table(summary)}\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps({"device": device, "runs": summary}, indent=2))
        (args.out / "table.md").write_text(text)


if __name__ == "__main__":
    main()
