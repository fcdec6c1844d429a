"""Does IIF pay under GRPO (or RLOO)? TRL's GRPO against IIF-GRPO and the random-filter control, paired by seed.

Every run trains IIFGRPOTrainer (``--algorithm rloo``: IIFRLOOTrainer) on an embedded task with
the task's group-sampling settings (``TaskSpec.settings_for``), one subprocess per run; the
metrics come from each run's attribution store. A round is one generation batch (one optimizer
step with the defaults). The reference arm is named after the algorithm:

  grpo     iif_drop_fraction=0: TRL's GRPO updates (completions are still scored, for the curves;
           the weights equal TRL's GRPOTrainer's, tested); under --algorithm rloo the arm "rloo"
  iif      IIF: the round schedule, p=1, the held-out return target (held-out prompts, fresh
           completions, group-relative advantages)
  iif_half IIF with p=0.5
  iif_buffer IIF with the buffer return target (the round's own completions)
  random   the control: as many completions dropped a round as IIF's rule would, at random

The threshold is GRPO's final reward (median over seeds of its last-10-round mean); a run reaches
it at the first round whose 5-round moving average does. KL is the policy's KL to the reference on
a round's completions, summed over a completion's tokens; reward_at_grpo_kl is a run's reward when
its KL first reaches GRPO's final KL, or its final reward if it never does (a reward bought with
more drift is not the same reward). Seconds are wall time per round
(generation, held-out sampling, scoring, TRL's steps) and mean something only when nothing else
ran on the machine (--parallel 1 and nothing beside it); the tables print them either way.
Finished runs are kept (done.json) and reused, so seeds can be added later.

    python benchmarks/iif_vs_grpo.py --task keywords --seeds 0 1 2 3 4 --parallel 2
    python benchmarks/iif_vs_grpo.py --task reviews --rounds 20 --arms grpo iif random --seeds 0 --parallel 1
    python benchmarks/iif_vs_grpo.py --algorithm rloo --task keywords --arms rloo iif random --seeds 0 1 2 3 4 \
        --out benchmarks/results/iif_vs_rloo_keywords
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from iif_vs_ppo import moving_average, paired, plot, table

from rlhf_influence.tasks import TASKS, get_task

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ("grpo", "rloo")
ARMS = {
    **{algorithm: {"iif_drop_fraction": 0.0} for algorithm in ALGORITHMS},  # the reference: no record dropped
    "iif": {},
    "iif_half": {"iif_drop_fraction": 0.5},
    "iif_buffer": {"iif_target": "buffer_return"},
    "random": {"iif_filter": "random"},
}
FILTERING = set(ARMS) - set(ALGORITHMS)


def train_one(algorithm: str, task: str, arm: str, seed: int, rounds: int, run_dir: Path) -> None:
    """One run, in this process (the worker mode of this script)."""
    import torch

    from rlhf_influence import IIFGRPOConfig, IIFGRPOTrainer, IIFRLOOConfig, IIFRLOOTrainer

    config_class, trainer_class = {"grpo": (IIFGRPOConfig, IIFGRPOTrainer), "rloo": (IIFRLOOConfig, IIFRLOOTrainer)}[
        algorithm
    ]
    torch.set_num_threads(1)
    spec = get_task(task)
    built = spec.build(seed=seed)
    settings = {**spec.settings_for(algorithm), **ARMS[arm], "output_dir": str(run_dir), "seed": seed,
                "max_steps": rounds, "disable_tqdm": True, "iif_store_projection_dim": 0}  # fmt: skip
    config = config_class(**settings)

    def reward(prompts, completions, **kwargs):
        return built.reward(list(prompts), list(completions))

    reward.__name__ = f"{task}_reward"
    torch.manual_seed(seed)  # LoRA's initial weights come from the global stream
    trainer = trainer_class(
        model=built.policy,
        reward_funcs=[reward],
        args=config,
        train_dataset=built.train_dataset.select_columns(["prompt"]),
        target_dataset=built.heldout_dataset.select_columns(["prompt"]),
        processing_class=built.tokenizer,
        peft_config=built.lora_config,
    )
    trainer.train()


def run_one(algorithm: str, task: str, arm: str, seed: int, rounds: int, out: Path) -> Path:
    run_dir = out / arm / f"seed{seed}"
    if (run_dir / "done.json").is_file():
        return run_dir
    cmd = [sys.executable, __file__, "--worker", "--algorithm", algorithm, "--task", task, "--arms", arm,
           "--seeds", str(seed), "--rounds", str(rounds), "--out", str(out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{arm} seed {seed} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    (run_dir / "done.json").write_text(json.dumps({"seconds": time.time() - start}))
    return run_dir


def curves(run_dir: Path) -> dict[str, list[float]]:
    rows = [json.loads(p.read_text()) for p in sorted((run_dir / "attribution").glob("round_*/metrics.json"))]
    keys = ("objective/scores", "objective/kl", "iif/kept_fraction", "time/round_seconds", "time/rollout_seconds",
            "time/target_sampling_seconds", "time/scoring_seconds", "time/optimisation_seconds", "time/kl_seconds")  # fmt: skip
    return {k: [r.get(k, 0.0) for r in rows] for k in keys}


def seconds_per_round(arm: str, c: dict) -> float:
    """What a round costs the method: the reference arm's scoring exists only to draw its curves, and
    no arm's KL measurement is part of its method."""
    total = statistics.fmean(c["time/round_seconds"]) - statistics.fmean(c["time/kl_seconds"])
    if arm not in FILTERING:
        total -= statistics.fmean(c["time/scoring_seconds"]) + statistics.fmean(
            c["time/target_sampling_seconds"]
        )
    return total


def summarise(results: dict[str, dict[int, dict]], threshold: float, kl_level: float) -> dict:
    summary = {}
    for arm, by_seed in results.items():
        rows = {}
        for seed, c in by_seed.items():
            reward = c["objective/scores"]
            smooth, smooth_kl = moving_average(reward), moving_average(c["objective/kl"])
            hit = next((i for i, v in enumerate(smooth) if v >= threshold), None)
            at_kl = next((i for i, v in enumerate(smooth_kl) if v >= kl_level), len(smooth) - 1)
            rows[seed] = {
                "rounds_to_threshold": None if hit is None else hit + 1,
                "auc": statistics.fmean(reward),
                "final_reward": statistics.fmean(reward[-10:]),
                "final_kl": statistics.fmean(c["objective/kl"][-10:]),
                # the reward when the run's KL to the reference first reaches the reference arm's final KL
                "reward_at_grpo_kl": smooth[at_kl],
                "kept_fraction": statistics.fmean(c["iif/kept_fraction"]),
                "seconds_per_round": seconds_per_round(arm, c),
                "scoring_seconds": statistics.fmean(c["time/scoring_seconds"]),
                "target_sampling_seconds": statistics.fmean(c["time/target_sampling_seconds"]),
            }
        summary[arm] = rows
    return summary


METRICS = ["rounds_to_threshold", "auc", "final_reward", "final_kl", "reward_at_grpo_kl", "kept_fraction",
           "seconds_per_round", "scoring_seconds", "target_sampling_seconds"]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="grpo", help="the trainer: GRPO's or RLOO's")
    parser.add_argument("--arms", nargs="+", default=None, choices=list(ARMS),
                        help="default: the algorithm's own (no record dropped), iif, random")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--task", choices=[t for t, s in TASKS.items() if "grpo" in s.settings], default="keywords"
    )
    parser.add_argument("--rounds", type=int, default=None, help="default: the task's own (keywords 100)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (each uses one thread)")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/iif_vs_grpo_<task>"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    reference = args.algorithm
    args.arms = args.arms or [reference, "iif", "random"]
    args.rounds = args.rounds or get_task(args.task).settings_for(reference)["max_steps"]
    args.out = args.out or ROOT / "benchmarks" / "results" / f"iif_vs_{reference}_{args.task}"
    if args.worker:
        train_one(
            args.algorithm,
            args.task,
            args.arms[0],
            args.seeds[0],
            args.rounds,
            args.out / args.arms[0] / f"seed{args.seeds[0]}",
        )
        return
    if reference not in args.arms or set(args.arms) & set(ALGORITHMS) != {reference}:
        parser.error(f"the {reference} arm is the reference under --algorithm {reference}; include it (and no other)")
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    with ThreadPoolExecutor(args.parallel) as pool:
        dirs = list(pool.map(lambda job: run_one(args.algorithm, args.task, *job, args.rounds, args.out), jobs))
    results: dict[str, dict[int, dict]] = {arm: {} for arm in args.arms}
    for (arm, seed), run_dir in zip(jobs, dirs, strict=True):
        results[arm][seed] = curves(run_dir)
    threshold = statistics.median(
        statistics.fmean(c["objective/scores"][-10:]) for c in results[reference].values()
    )
    kl_level = statistics.median(statistics.fmean(c["objective/kl"][-10:]) for c in results[reference].values())
    summary = summarise(results, threshold, kl_level)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps({"algorithm": reference, "threshold": threshold,
                                                       "kl_level": kl_level, "task": args.task, "rounds": args.rounds,
                                                       "summary": summary}, indent=2))  # fmt: skip
    plot(results, args.out / "reward_curves.png", round_label="round (generation batch)",
         kl_title="KL to the reference (summed over a completion)")  # fmt: skip
    report = "\n".join([
        f"task {args.task} under {reference.upper()}: threshold ({reference.upper()}'s final reward, median over "
        f"seeds) {threshold:.3f}; {reference.upper()}'s final KL {kl_level:.3f}",
        f"{len(args.seeds)} seeds, {args.rounds} rounds; median [min, max] over seeds; seconds are timings "
        f"only if nothing else ran (--parallel {args.parallel})\n",
        table(summary, METRICS), "", paired(summary, "auc", reference), "", paired(summary, "final_reward", reference),
        "", paired(summary, "rounds_to_threshold", reference), "", paired(summary, "reward_at_grpo_kl", reference), "",
        *([paired({a: r for a, r in summary.items() if a != reference}, "final_reward", "random"), ""]
          if "random" in summary else []),
    ])  # fmt: skip
    (args.out / "table.md").write_text(report + "\n")
    print(report)
    print(f"\nplot: {args.out / 'reward_curves.png'}; table: {args.out / 'table.md'}")


if __name__ == "__main__":
    main()
