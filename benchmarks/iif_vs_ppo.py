"""Does IIF pay? PPO against IIF and its controls on an embedded task, paired by seed.

Every arm runs `recipes/ppo_iif.py` on one of its embedded tasks with the same seeds; the
metrics come from each run's attribution store.

  --task sentiment  tiny GPT-2 + LoRA from random weights, VADER sentiment reward (80 rounds)
  --task keywords   tiny GPT-2 pre-trained on a generated corpus where the rewarded colour
                    words are rare, reward = colour words per completion (100 rounds)
  --task reviews    SmolLM2-135M-Instruct + LoRA r=16 continuing movie-review openings, VADER
                    sentiment reward (30 rounds; about 15-35 s a round on 2 CPU cores)

  ppo          iif_drop_fraction=0: PPO's updates (records are still scored, for the curves)
  ppo_matched  as ppo, with as many more rollout records per round as the held-out target
               samples (the samples IIF spends on its target, given to PPO as training data)
  iif          IIF with the defaults: round schedule, p=1, held-out return target
  iif_round    IIF, round schedule (the paper's)
  iif_half     IIF, p=0.5
  iif_buffer   IIF with the buffer return target
  random       the control: as many records dropped per scoring as iif, at random
  random_round the control for iif_round (scored once a round)
  iif_round_steps, random_round_steps, iif_steps, random_steps
               the same with iif_keep_steps: PPO's number of optimizer steps, each mini-batch
               smaller (the default drops steps: fewer mini-batches of the usual size)
  iif_round_half      iif_round with p=0.5
  iif_round_heldout64 iif_round with 64 held-out prompts a round (the task's default: 16)
  iif_round_rewhiten  iif_round with the kept records' advantages whitened anew (after filtering)
  ppo_shared, iif_round_shared
               ppo and iif_round with PPO's value head on the policy's backbone (--value_head shared)
  iif_round_shared_value
               iif_round_shared scoring each record's loss with its value term (the paper's code)

--set FIELD=VALUE passes recipe flags to every arm (e.g. num_mini_batches=32 learning_rate=1e-3:
the optimisation regime). On a task with known label noise (noisy_sentiment: the sign of 20% of
the rewards flipped) the curves use the clean reward, and a table says how often each arm
dropped the flipped records against the others, and where they rank by influence.

Training time per round counts what each method needs: rollout + optimisation for the PPO arms
(their scoring exists only to draw these curves), plus held-out sampling and scoring for the
filtering arms. The threshold is PPO's final reward (median over seeds of its last-10-round
mean); a run reaches it at the first round whose 5-round moving average does. "80pct" uses 80%
of it (PPO's own median run reaches the full threshold late, so it is censored in many runs:
1 to 5 of 10 per arm on the keyword task). early_step_kl is PPO's approximate KL of each update, rounds 1-10.
Finished runs are kept (done.json) and reused, so more seeds can be added later.

    python benchmarks/iif_vs_ppo.py --task sentiment --seeds 0 1 2 3 4 5 6 7 8 9 --parallel 2  # ~30 min
    python benchmarks/iif_vs_ppo.py --task keywords --seeds 0 1 2 3 4 5 6 7 8 9 --parallel 2   # ~35 min
    python benchmarks/iif_vs_ppo.py --task reviews --arms ppo iif iif_round random --seeds 0 --parallel 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rlhf_influence.audit.jumps import round_kl
from rlhf_influence.tasks import DEFAULT_TASK, TASKS, get_task, noisy_sentiment

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "ppo_iif.py"
ROUNDS = {"sentiment": 80}  # where this benchmark runs fewer rounds than the task's own run


def rounds_of(task: str) -> int:
    return ROUNDS.get(task, get_task(task).rounds)


def results_dir(task: str) -> Path:
    name = "iif_vs_ppo" if task == DEFAULT_TASK else f"iif_vs_ppo_{task}"
    return ROOT / "benchmarks" / "results" / name


def records_per_round(task: str, arm: str) -> int:
    """The task's records per round; ppo_matched adds as many as the held-out target samples."""
    settings = get_task(task).settings_for("ppo")
    batch = settings["per_device_train_batch_size"]
    return batch + settings["iif_num_heldout_prompts"] if arm == "ppo_matched" else batch


ARMS = {
    "ppo": ["--iif_drop_fraction", "0"],
    "ppo_matched": ["--iif_drop_fraction", "0"],  # and records_per_round(task, "ppo_matched") records
    "iif": [],
    "iif_round": ["--iif_schedule", "round"],
    "iif_half": ["--iif_drop_fraction", "0.5"],
    "iif_buffer": ["--iif_target", "buffer_return"],
    "random": ["--iif_filter", "random"],
    "random_round": ["--iif_filter", "random", "--iif_schedule", "round"],
    "iif_round_steps": ["--iif_schedule", "round", "--iif_keep_steps", "true"],
    "random_round_steps": ["--iif_filter", "random", "--iif_schedule", "round", "--iif_keep_steps", "true"],
    "iif_steps": ["--iif_keep_steps", "true"],
    "random_steps": ["--iif_filter", "random", "--iif_keep_steps", "true"],
    "iif_round_half": ["--iif_schedule", "round", "--iif_drop_fraction", "0.5"],
    "iif_round_heldout64": ["--iif_schedule", "round", "--iif_num_heldout_prompts", "64"],
    "iif_round_rewhiten": ["--iif_schedule", "round", "--iif_whiten_after_filter", "true"],
    # PPO's value head on the policy's own LoRA backbone (--value_head shared) instead of a value model
    "ppo_shared": ["--iif_drop_fraction", "0", "--value_head", "shared"],
    "iif_round_shared": ["--iif_schedule", "round", "--value_head", "shared"],
    "iif_round_shared_value": ["--iif_schedule", "round", "--value_head", "shared", "--iif_record_loss",
                               "policy_and_value"],
}
# the arms before the shared head ran with a separate value model, the recipe's default until then
ARMS = {arm: flags if "--value_head" in flags else ["--value_head", "separate", *flags] for arm, flags in ARMS.items()}
FILTERING = set(ARMS) - {"ppo", "ppo_matched", "ppo_shared"}
# Tasks whose reward is known to be corrupted for some records: (flip fraction, salt) of
# rlhf_influence.tasks.rewards.is_flipped; their curves use the clean reward, recomputed per record.
NOISY_TASKS = {"noisy_sentiment": (noisy_sentiment.FLIP_FRACTION, noisy_sentiment.SALT)}


def run_one(
    arm: str, seed: int, rounds: int, out: Path, task: str = "sentiment", extra: tuple[str, ...] = ()
) -> Path:
    run_dir = out / arm / f"seed{seed}"
    if (run_dir / "done.json").is_file():
        done = json.loads((run_dir / "done.json").read_text())
        if done.get("flags", []) != list(extra):
            raise RuntimeError(
                f"{run_dir} was run with {done.get('flags', [])}, not {list(extra)}: use another --out"
            )
        return run_dir
    if task in NOISY_TASKS and "--missing_eos_penalty" in extra:
        raise ValueError(
            "the label-noise analysis recomputes clean rewards from stored ones: no --missing_eos_penalty"
        )
    batch = records_per_round(task, arm)
    # the curves need the store alone: no checkpoints, no trained model kept (1.6 GB a run on the real LM)
    cmd = [sys.executable, str(RECIPE), "--embedded_task", task, *ARMS[arm], "--per_device_train_batch_size", str(batch),
           "--seed", str(seed), "--total_episodes", str(batch * rounds),
           "--output_dir", str(run_dir), "--disable_tqdm", "true", "--iif_store_projection_dim", "0",
           "--save_strategy", "no", "--save_final_model", "false", *extra]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{arm} seed {seed} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    (run_dir / "done.json").write_text(json.dumps({"seconds": time.time() - start, "flags": list(extra)}))
    return run_dir


def curves(run_dir: Path, task: str = "sentiment") -> dict[str, list[float]]:
    rows = []
    for metrics in sorted((run_dir / "attribution").glob("round_*/metrics.json")):
        rows.append(json.loads(metrics.read_text()))
    keys = ("objective/scores", "objective/kl", "iif/kept_fraction", "time/rollout_seconds",
            "time/target_sampling_seconds", "time/scoring_seconds", "time/optimisation_seconds",
            "policy/approxkl_avg")  # fmt: skip
    result = {k: [r.get(k, 0.0) for r in rows] for k in keys}
    # the KL per response: the exact one where the run logged it (never negative), else TRL's estimate
    result["objective/kl"] = [round_kl(r) if round_kl(r) is not None else 0.0 for r in rows]
    if task in NOISY_TASKS:
        result.update(label_noise(run_dir, *NOISY_TASKS[task]))
        result["observed_scores"] = result["objective/scores"]
        result["objective/scores"] = result["clean_scores"]  # what the task is meant to reward
    return result


def label_noise(run_dir: Path, fraction: float, salt: str) -> dict[str, list[float]]:
    """Per round: the clean mean reward, and for the flipped records (those whose clean reward is
    not 0, so the flip changed something) and the others: how many, how many dropped (over all
    scorings), and their mean percentile rank by influence (0 = most harmful)."""
    import pyarrow.parquet as pq

    from rlhf_influence.tasks.rewards import is_flipped

    out: dict[str, list[float]] = {k: [] for k in (
        "clean_scores", "flipped", "flipped_dropped", "flipped_rank", "other", "other_dropped", "other_rank",
    )}  # fmt: skip
    for records in sorted((run_dir / "attribution").glob("round_*/records.parquet")):
        rows = pq.read_table(records).to_pylist()
        n = len(rows)
        flips = [is_flipped(r["prompt"], r["response"], fraction, salt) for r in rows]
        clean = [-r["reward"] if f else r["reward"] for r, f in zip(rows, flips, strict=True)]
        out["clean_scores"].append(statistics.fmean(clean))
        finite = [i for i in range(n) if math.isfinite(rows[i]["influence"])]
        order = sorted(finite, key=lambda i: rows[i]["influence"])
        percentile = {i: k / max(1, len(order) - 1) for k, i in enumerate(order)}
        for name, members in (
            ("flipped", [i for i in range(n) if flips[i] and clean[i] != 0]),
            ("other", [i for i in range(n) if not (flips[i] and clean[i] != 0)]),
        ):
            out[name].append(len(members))
            dropped = [
                sum(not k for k in rows[i]["kept_by_scoring"]) / len(rows[i]["kept_by_scoring"])
                for i in members
            ]
            out[f"{name}_dropped"].append(statistics.fmean(dropped) if members else float("nan"))
            ranked = [percentile[i] for i in members if i in percentile]
            out[f"{name}_rank"].append(statistics.fmean(ranked) if ranked else float("nan"))
    return out


def noise_table(results: dict[str, dict[int, dict]]) -> str:
    """How each arm treated the records whose reward sign was flipped, pooled over rounds and seeds."""
    lines = [
        "| arm | flipped records a round | dropped: flipped | dropped: the others | influence percentile: "
        "flipped | the others |",
        "|---|---|---|---|---|---|",
    ]

    def pooled(by_seed: dict, key: str, weight: str) -> float:
        """Mean of a per-round rate, weighted by the records it is over."""
        pairs = [(v, w) for c in by_seed.values() for v, w in zip(c[key], c[weight], strict=True) if w]
        return sum(v * w for v, w in pairs) / max(1, sum(w for _, w in pairs))

    for arm, by_seed in results.items():
        per_round = statistics.fmean(v for c in by_seed.values() for v in c["flipped"])
        lines.append(
            f"| {arm} | {per_round:.1f} | {pooled(by_seed, 'flipped_dropped', 'flipped'):.1%} | "
            f"{pooled(by_seed, 'other_dropped', 'other'):.1%} | {pooled(by_seed, 'flipped_rank', 'flipped'):.2f} | "
            f"{pooled(by_seed, 'other_rank', 'other'):.2f} |"
        )
    return "\n".join(lines)


def moving_average(values: list[float], window: int = 5) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def training_seconds(arm: str, c: dict) -> list[float]:
    parts = ["time/rollout_seconds", "time/optimisation_seconds"]
    if arm in FILTERING:
        parts += ["time/target_sampling_seconds", "time/scoring_seconds"]
    return [sum(c[p][i] for p in parts) for i in range(len(c[parts[0]]))]


def summarise(results: dict[str, dict[int, dict]], threshold: float, kl_level: float) -> dict:
    summary = {}
    for arm, by_seed in results.items():
        rows = {}
        for seed, c in by_seed.items():
            reward, kl = c["objective/scores"], c["objective/kl"]
            smooth, smooth_kl = moving_average(reward), moving_average(kl)
            seconds = training_seconds(arm, c)
            hit = next((i for i, v in enumerate(smooth) if v >= threshold), None)
            hit_80 = next((i for i, v in enumerate(smooth) if v >= 0.8 * threshold), None)
            at_kl = next((i for i, v in enumerate(smooth_kl) if v >= kl_level), len(kl) - 1)
            rows[seed] = {
                "rounds_to_threshold": None if hit is None else hit + 1,
                "seconds_to_threshold": None if hit is None else sum(seconds[: hit + 1]),
                # 80% of it: PPO's own median run reaches its final reward late, so the full
                # threshold is censored in many runs
                "rounds_to_80pct": None if hit_80 is None else hit_80 + 1,
                "seconds_to_80pct": None if hit_80 is None else sum(seconds[: hit_80 + 1]),
                "auc": statistics.fmean(reward),
                "final_reward": statistics.fmean(reward[-10:]),
                "final_kl": statistics.fmean(kl[-10:]),
                "reward_at_ppo_kl": smooth[at_kl],
                "seconds_per_round": statistics.fmean(seconds),
                "kept_fraction": statistics.fmean(c["iif/kept_fraction"]),
                # how far each round's update moves the policy (PPO's approximate KL), early on
                "early_step_kl": statistics.fmean(c["policy/approxkl_avg"][:10]),
            }
        summary[arm] = rows
    return summary


def describe(values: list) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "never"
    text = f"{statistics.median(present):.3g} [{min(present):.3g}, {max(present):.3g}]"
    return text + (f" ({len(values) - len(present)} never)" if len(present) < len(values) else "")


METRICS = ["rounds_to_threshold", "seconds_to_threshold", "rounds_to_80pct", "seconds_to_80pct", "auc", "final_reward",
           "final_kl", "reward_at_ppo_kl", "seconds_per_round", "kept_fraction", "early_step_kl"]  # fmt: skip


def table(summary: dict, metrics: list[str] = METRICS) -> str:
    """One row per arm: each metric's median [min, max] over seeds."""
    lines = ["| arm | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for arm, rows in summary.items():
        cells = [describe([rows[s][m] for s in sorted(rows)]) for m in metrics]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


BASE_NAMES = {"ppo": "PPO", "grpo": "GRPO"}


def paired(summary: dict, metric: str, base_arm: str = "ppo") -> str:
    """Per-seed difference arm - ``base_arm`` (median [min, max]), for the seeds both have."""
    base = summary.get(base_arm, {})
    name = BASE_NAMES.get(base_arm, base_arm)
    lines = [f"| arm | {metric} minus {base_arm}'s, per seed |", "|---|---|"]
    for arm, rows in summary.items():
        if arm == base_arm:
            continue
        diffs = [
            rows[s][metric] - base[s][metric]
            for s in rows
            if s in base and None not in (rows[s][metric], base[s][metric])
        ]
        wins = f"; higher than {name}'s in {sum(d > 0 for d in diffs)} of {len(diffs)}" if diffs else ""
        lines.append(f"| {arm} | {describe(diffs)}{wins} |")
    return "\n".join(lines)


def plot(
    results: dict,
    path: Path,
    round_label: str = "round",
    kl_title: str = "KL to the reference (same smoothing)",
) -> None:
    """Median over seeds of each arm's smoothed reward and KL per round, and reward against KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_k, ax_rk) = plt.subplots(1, 3, figsize=(17, 4.5))
    for arm, by_seed in results.items():
        rewards = list(zip(*[moving_average(c["objective/scores"]) for c in by_seed.values()], strict=False))
        kls = list(zip(*[moving_average(c["objective/kl"]) for c in by_seed.values()], strict=False))
        reward_median = [statistics.median(r) for r in rewards]
        kl_median = [statistics.median(k) for k in kls]
        ax_r.plot(range(1, len(rewards) + 1), reward_median, label=arm)
        ax_k.plot(range(1, len(kls) + 1), kl_median, label=arm)
        ax_rk.plot(kl_median, reward_median, label=arm)
    ax_r.set(title="mean reward (5-round moving average, median over seeds)", xlabel=round_label)
    ax_k.set(title=kl_title, xlabel=round_label)
    ax_rk.set(title="reward against KL (the two medians, round by round)", xlabel="KL to the reference")
    ax_r.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--task", choices=list(TASKS), default=DEFAULT_TASK, help="which embedded task")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="default: 80 (sentiment), else the task's own (keywords 100, reviews 30)",
    )
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (each uses one thread)")
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="FIELD=VALUE",
        help="recipe flags for every arm, e.g. num_mini_batches=32 learning_rate=1e-3 (use a new --out)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/iif_vs_ppo[_keywords|_reviews]"
    )
    args = parser.parse_args(argv)
    args.rounds = args.rounds or rounds_of(args.task)
    args.out = args.out or results_dir(args.task)
    if "ppo" not in args.arms:
        parser.error("the ppo arm is the reference; include it")
    if bad := [item for item in args.set if "=" not in item or not item.partition("=")[2]]:
        parser.error(f"--set takes FIELD=VALUE items, got {bad}")
    extra = tuple(
        flag for item in args.set for flag in (f"--{item.partition('=')[0]}", item.partition("=")[2])
    )
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    with ThreadPoolExecutor(args.parallel) as pool:
        dirs = list(pool.map(lambda job: run_one(*job, args.rounds, args.out, args.task, extra), jobs))
    results: dict[str, dict[int, dict]] = {arm: {} for arm in args.arms}
    for (arm, seed), run_dir in zip(jobs, dirs, strict=True):
        results[arm][seed] = curves(run_dir, args.task)
    ppo_final = [statistics.fmean(c["objective/scores"][-10:]) for c in results["ppo"].values()]
    ppo_kl = [statistics.fmean(c["objective/kl"][-10:]) for c in results["ppo"].values()]
    threshold, kl_level = statistics.median(ppo_final), statistics.median(ppo_kl)
    summary = summarise(results, threshold, kl_level)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps({"threshold": threshold, "kl_level": kl_level, "task": args.task,
                                                       "settings": args.set, "summary": summary}, indent=2))  # fmt: skip
    plot(results, args.out / "reward_curves.png")
    report = "\n".join([
        f"task {args.task}: threshold (PPO's final reward, median over seeds) {threshold:.3f}; "
        f"PPO's final KL {kl_level:.3f}",
        f"{len(args.seeds)} seeds, {args.rounds} rounds; median [min, max] over seeds\n",
        table(summary), "", paired(summary, "auc"), "", paired(summary, "final_reward"), "",
        paired(summary, "rounds_to_threshold"), "", paired(summary, "seconds_to_threshold"), "",
        paired(summary, "rounds_to_80pct"), "", paired(summary, "seconds_to_80pct"),
        *(["", "label noise (rewards of the flipped records' sign reversed; 'reward' above is the clean one)\n",
           noise_table(results)] if args.task in NOISY_TASKS else []),
    ])  # fmt: skip
    if args.set:
        report = f"settings for every arm: {' '.join(args.set)}\n" + report
    (args.out / "table.md").write_text(report + "\n")
    print(report)
    print(f"\nplot: {args.out / 'reward_curves.png'}; table: {args.out / 'table.md'}")


if __name__ == "__main__":
    main()
