"""IIF on the reward-KL frontier: PPO, IIF and random filtering, with a fixed and an adaptive KL coefficient.

RLHF methods are compared at equal KL to the reference (Gao et al. 2022; the DPO paper): a
reward gain bought with more drift is not a better method. Each arm runs `recipes/ppo_iif.py` on
an embedded task with the same seeds (`iif_vs_ppo.run_one`), once with the task's fixed KL
coefficient and once with the adaptive controller (`--kl_control adaptive`, the task's
`kl_target` and `kl_horizon`):

  ppo      iif_drop_fraction=0 (PPO's updates; records still scored, for the curves)
  iif      IIF with today's score (raw inner product, held-out return target, round schedule)
  random   as many records dropped as iif, at random (the control)

KL is each round's KL to the reference per response, exact over the vocabulary
(`objective/kl_exact`). Per arm and KL setting: rounds to PPO's final reward (the median over
seeds of PPO's last-10-round mean, same KL setting), final reward, final KL, and the reward at
PPO's final KL: where the run's smoothed (5-round) KL first reaches PPO's final KL, its smoothed
reward there, linearly interpolated between the two rounds around it (a run that never reaches
it is left out and counted). The plot draws every arm's reward against KL (median over seeds of
the smoothed curves, each seed faint), fixed and adaptive side by side.

    python benchmarks/frontier.py --task keywords --seeds 0 1 2 3 4 --parallel 2
    python benchmarks/frontier.py --task reviews --seeds 0 1 --rounds 20 --parallel 2
    # IIF with a 256-sample target, every arm with PPO's value head on the policy's backbone:
    python benchmarks/frontier.py --task reviews --flags="--value_head shared" \
        --iif_flags="--iif_num_heldout_prompts 256" --out benchmarks/results/frontier_reviews_heldout256
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from iif_vs_ppo import curves, describe, moving_average, rounds_of, run_one

from rlhf_influence.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("ppo", "iif", "random")
KL_SETTINGS = {"fixed": (), "adaptive": ("--kl_control", "adaptive")}
NAMES = {"ppo": "PPO", "iif": "IIF", "random": "random filter"}


def reward_at_kl(reward: list[float], kl: list[float], level: float) -> float | None:
    """The smoothed reward where the smoothed KL first reaches ``level`` (interpolated), else None."""
    smooth, smooth_kl = moving_average(reward), moving_average(kl)
    for i, value in enumerate(smooth_kl):
        if value >= level:
            if i == 0 or smooth_kl[i] == smooth_kl[i - 1]:
                return smooth[i]
            t = (level - smooth_kl[i - 1]) / (smooth_kl[i] - smooth_kl[i - 1])
            return smooth[i - 1] + t * (smooth[i] - smooth[i - 1])
    return None


def summarise(results: dict, threshold: float, kl_level: float) -> dict:
    summary = {}
    for arm, by_seed in results.items():
        rows = {}
        for seed, c in by_seed.items():
            reward, kl = c["objective/scores"], c["objective/kl"]
            smooth = moving_average(reward)
            hit = next((i for i, v in enumerate(smooth) if v >= threshold), None)
            rows[seed] = {
                "rounds_to_ppo_final": None if hit is None else hit + 1,
                "final_reward": statistics.fmean(reward[-10:]),
                "final_kl": statistics.fmean(kl[-10:]),
                "reward_at_ppo_kl": reward_at_kl(reward, kl, kl_level),
                "final_kl_coef": c["objective/kl_coef"][-1],
                "kept_fraction": statistics.fmean(c["iif/kept_fraction"]),
            }
        summary[arm] = rows
    return summary


METRICS = ["rounds_to_ppo_final", "final_reward", "final_kl", "reward_at_ppo_kl", "final_kl_coef", "kept_fraction"]


def table(summary: dict) -> str:
    lines = ["| arm | " + " | ".join(METRICS) + " | reward at PPO's KL, per seed |", "|---" * (len(METRICS) + 2) + "|"]
    for arm, rows in summary.items():
        cells = [describe([rows[s][m] for s in sorted(rows)]) for m in METRICS]
        per_seed = ", ".join(
            "-" if rows[s]["reward_at_ppo_kl"] is None else f"{rows[s]['reward_at_ppo_kl']:.3g}" for s in sorted(rows)
        )
        lines.append(f"| {NAMES[arm]} | " + " | ".join(cells) + f" | {per_seed} |")
    return "\n".join(lines)


def wins(summary: dict, arm: str, other: str) -> str:
    """Seeds on which ``arm``'s reward at PPO's KL is higher than ``other``'s (both reached it)."""
    pairs = [
        (summary[arm][s]["reward_at_ppo_kl"], summary[other][s]["reward_at_ppo_kl"])
        for s in summary[arm]
        if s in summary[other]
    ]
    both = [(a, b) for a, b in pairs if a is not None and b is not None]
    return f"{sum(a > b for a, b in both)} of {len(both)} seeds (of {len(pairs)}; the others did not reach PPO's KL)"


def at_kl_levels(results: dict, levels: list[float]) -> tuple[dict, list[str]]:
    """Each run's smoothed reward where its smoothed KL first reaches each of ``levels`` (per arm,
    per seed; None where it never does), and a table with the seeds on which IIF is higher."""
    found = {
        level: {arm: {seed: reward_at_kl(c["objective/scores"], c["objective/kl"], level) for seed, c in by_seed.items()}
                for arm, by_seed in results.items()}
        for level in levels
    }  # fmt: skip
    lines = ["| KL | " + " | ".join(NAMES[a] for a in ARMS) + " | IIF higher than PPO | than random |",
             "|---" * (len(ARMS) + 3) + "|"]  # fmt: skip

    def higher(level: float, other: str) -> str:
        pairs = [(v, found[level][other].get(s)) for s, v in found[level]["iif"].items()]
        both = [(a, b) for a, b in pairs if a is not None and b is not None]
        return f"{sum(a > b for a, b in both)} of {len(both)}"

    for level in levels:
        cells = [", ".join("never" if v is None else f"{v:.3f}" for _, v in sorted(found[level][a].items()))
                 for a in ARMS]  # fmt: skip
        lines.append(f"| {level:g} | " + " | ".join(cells) + f" | {higher(level, 'ppo')} | {higher(level, 'random')} |")
    return found, lines


def plot(all_results: dict, path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_results), figsize=(6 * len(all_results), 4.5), squeeze=False)
    colours = {"ppo": "#2c6fbb", "iif": "#c0392b", "random": "#7f8c8d"}
    for ax, (setting, results) in zip(axes[0], all_results.items(), strict=True):
        for arm, by_seed in results.items():
            for c in by_seed.values():
                ax.plot(moving_average(c["objective/kl"]), moving_average(c["objective/scores"]),
                        color=colours[arm], alpha=0.2, linewidth=0.8)  # fmt: skip
            kls = list(zip(*[moving_average(c["objective/kl"]) for c in by_seed.values()], strict=False))
            rewards = list(zip(*[moving_average(c["objective/scores"]) for c in by_seed.values()], strict=False))
            ax.plot([statistics.median(k) for k in kls], [statistics.median(r) for r in rewards],
                    color=colours[arm], linewidth=2, label=f"{NAMES[arm]} (median of {len(by_seed)} seeds)")  # fmt: skip
        ax.set(title=f"{task}: {setting} KL coefficient", xlabel="KL to the reference per response (exact, 5-round mean)",
               ylabel="mean reward (5-round mean)")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(TASKS), default="keywords")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--rounds", type=int, default=None, help="default: the task's own (keywords 100, reviews 30)")
    parser.add_argument("--kl", nargs="+", default=list(KL_SETTINGS), choices=list(KL_SETTINGS))
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (each uses one thread)")
    parser.add_argument(
        "--kl_levels", type=float, nargs="*", default=[],
        help="also each run's reward where its KL first reaches these levels (e.g. 0.5 0.75 1.0: levels every "
        "run reaches, where PPO's final KL leaves some runs out)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/frontier_<task>")
    parser.add_argument("--flags", default="", help="recipe flags for every arm, e.g. --flags='--value_head shared'")
    parser.add_argument(
        "--iif_flags",
        default="",
        help="recipe flags for the IIF arm only, e.g. --iif_flags='--iif_num_heldout_prompts 256'. The random "
        "control keeps the task's target (it drops as many records at random as IIF would against that target: "
        "compare the kept fractions)",
    )
    args = parser.parse_args(argv)
    args.rounds = args.rounds or rounds_of(args.task)
    args.out = args.out or ROOT / "benchmarks" / "results" / f"frontier_{args.task}"
    jobs = [(setting, arm, seed) for seed in args.seeds for setting in args.kl for arm in ARMS]

    def run(job):
        setting, arm, seed = job
        flags = (*KL_SETTINGS[setting], *shlex.split(args.flags))
        if arm == "iif":
            flags += tuple(shlex.split(args.iif_flags))
        return run_one(arm, seed, args.rounds, args.out / setting, args.task, flags)

    with ThreadPoolExecutor(args.parallel) as pool:
        dirs = list(pool.map(run, jobs))
    all_results: dict[str, dict] = {s: {arm: {} for arm in ARMS} for s in args.kl}
    for (setting, arm, seed), run_dir in zip(jobs, dirs, strict=True):
        c = curves(run_dir, args.task)
        metrics = [json.loads(p.read_text()) for p in sorted((run_dir / "attribution").glob("round_*/metrics.json"))]
        c["objective/kl_coef"] = [m.get("objective/kl_coef", float("nan")) for m in metrics]
        all_results[setting][arm][seed] = c
    report, saved = [], {}
    for setting, results in all_results.items():
        ppo = results["ppo"].values()
        threshold = statistics.median(statistics.fmean(c["objective/scores"][-10:]) for c in ppo)
        kl_level = statistics.median(statistics.fmean(c["objective/kl"][-10:]) for c in ppo)
        summary = summarise(results, threshold, kl_level)
        saved[setting] = {"threshold": threshold, "kl_level": kl_level, "summary": summary}
        levels_table = []
        if args.kl_levels:
            saved[setting]["reward_at_kl_levels"], levels_table = at_kl_levels(results, args.kl_levels)
            levels_table = ["Reward at KL levels (per seed, in seed order):\n", *levels_table, ""]
        report += [
            f"## {args.task}, {setting} KL coefficient: {len(args.seeds)} seeds, {args.rounds} rounds",
            f"Flags for every arm: `{args.flags or '(none)'}`; for IIF only: "
            f"`{args.iif_flags or '(none)'}`.\n",
            f"PPO's final reward (median over seeds) {threshold:.3f}; PPO's final KL {kl_level:.3f}. "
            "Median [min, max] over seeds.\n",
            table(summary),
            "",
            f"- IIF's reward at PPO's final KL is higher than PPO's on {wins(summary, 'iif', 'ppo')}, and than "
            f"random filtering's on {wins(summary, 'iif', 'random')}.",
            "",
            *levels_table,
        ]
    args.out.mkdir(parents=True, exist_ok=True)
    flags = {"flags": args.flags, "iif_flags": args.iif_flags}
    (args.out / "summary.json").write_text(
        json.dumps({"task": args.task, "rounds": args.rounds, **flags, **saved}, indent=2)
    )
    plot(all_results, args.out / "frontier.png", args.task)
    (args.out / "table.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))
    print(f"plot: {args.out / 'frontier.png'}; table: {args.out / 'table.md'}")


if __name__ == "__main__":
    main()
