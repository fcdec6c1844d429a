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
        "kls": [r["objective/kl"] for r in rounds],
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


def plot(summary: dict, path: Path, title: str) -> None:
    """Reward and KL to the reference per round, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_k) = plt.subplots(1, 2, figsize=(12, 4))
    for name, s in summary.items():
        rounds = range(1, len(s["rewards"]) + 1)
        ax_r.plot(rounds, s["rewards"], alpha=0.35, lw=1)
        smooth = [statistics.fmean(s["rewards"][max(0, i - 4) : i + 1]) for i in range(len(s["rewards"]))]
        ax_r.plot(rounds, smooth, lw=2, label=name, color=ax_r.lines[-1].get_color())
        ax_k.plot(rounds, s["kls"], lw=2, label=name)
    ax_r.set(title="mean reward per round (thin) and its 5-round moving average", xlabel="round")
    ax_k.set(title="KL to the reference", xlabel="round")
    for ax in (ax_r, ax_k):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
        plot(summary, args.out / "reward_curves.png", device)


if __name__ == "__main__":
    main()
