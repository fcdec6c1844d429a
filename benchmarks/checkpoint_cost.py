"""What does a checkpoint cost? Bytes and seconds per checkpoint, against a round's time.

Runs an embedded task's recipe (PPO and GRPO) for a few rounds with a checkpoint after every
round, times each checkpoint (everything it writes: the policy's adapter, the trainable weights,
the optimizer, the schedule, the random streams, the data position, the info file), and reads
its size on disk. Reported beside the mean round time (rounds after the first), so that the
default --save_steps can be chosen as the rounds after which a checkpoint costs at most ~2% of
the training time. Results go to --out as JSON, one line per checkpoint and a summary.

Timings need the machine to themselves: run nothing else meanwhile.

    python benchmarks/checkpoint_cost.py --task reviews --rounds 4 --out benchmarks/results/checkpoint_cost_reviews
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def recipe_main(algorithm: str):
    path = ROOT / "recipes" / f"{algorithm}_iif.py"
    spec = importlib.util.spec_from_file_location(f"{algorithm}_iif_recipe", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.main


def measure(algorithm: str, task: str, rounds: int, run_dir: Path) -> dict:
    from rlhf_influence import IIFGRPOTrainer, IIFPPOTrainer
    from rlhf_influence.trainer.checkpoint import directory_bytes

    trainer_class, method = (IIFPPOTrainer, "save_checkpoint") if algorithm == "ppo" else (IIFGRPOTrainer, "_save_checkpoint")
    original = getattr(trainer_class, method)
    checkpoints: list[dict] = []
    round_ends: list[float] = []

    def timed(self, *args, **kwargs):
        round_ends.append(time.perf_counter())
        start = time.perf_counter()
        out = original(self, *args, **kwargs)
        seconds = time.perf_counter() - start
        path = sorted(run_dir.glob("checkpoint-*"), key=lambda p: p.stat().st_mtime)[-1]
        checkpoints.append({"checkpoint": path.name, "seconds": seconds, "bytes": directory_bytes(path)})
        round_ends[-1] += seconds  # the next round starts after the checkpoint
        return out

    setattr(trainer_class, method, timed)
    try:
        length = ["--total_episodes", str(16 * rounds)] if algorithm == "ppo" else ["--max_steps", str(rounds)]
        if task != "reviews" and algorithm == "ppo":
            length = ["--total_episodes", str(32 * rounds)]
        argv = ["--embedded_task", task, "--output_dir", str(run_dir), *length, "--save_strategy", "steps",
                "--save_steps", "1", "--disable_tqdm", "true", "--save_final_model", "false"]  # fmt: skip
        started = time.perf_counter()
        assert recipe_main(algorithm)(argv) == 0
    finally:
        setattr(trainer_class, method, original)
    # a round's time: from one checkpoint's end to the next one's start (the first round includes start-up)
    rounds_seconds = [
        (b - checkpoints[i + 1]["seconds"]) - a for i, (a, b) in enumerate(itertools.pairwise(round_ends))
    ]
    mean_round = statistics.mean(rounds_seconds) if rounds_seconds else float("nan")
    mean_checkpoint = statistics.mean(c["seconds"] for c in checkpoints[1:] or checkpoints)
    return {
        "algorithm": algorithm,
        "task": task,
        "rounds": rounds,
        "checkpoints": checkpoints,
        "round_seconds": rounds_seconds,
        "mean_round_seconds": mean_round,
        "mean_checkpoint_seconds": mean_checkpoint,
        "checkpoint_bytes": checkpoints[-1]["bytes"],
        "checkpoint_over_round": mean_checkpoint / mean_round,
        "rounds_for_2_percent": mean_checkpoint / mean_round / 0.02,
        "wall_seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="reviews", help="an embedded task (reviews: the real LM)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per algorithm (a checkpoint after each)")
    parser.add_argument("--algorithms", nargs="+", default=["ppo", "grpo"], choices=["ppo", "grpo"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "checkpoint_cost")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for algorithm in args.algorithms:
        run_dir = args.out / f"run_{algorithm}"
        shutil.rmtree(run_dir, ignore_errors=True)
        result = measure(algorithm, args.task, args.rounds, run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
        results.append(result)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        print(
            f"{algorithm} on {args.task}: checkpoint {result['checkpoint_bytes'] / 2**20:.1f} MiB in "
            f"{result['mean_checkpoint_seconds']:.2f} s; a round {result['mean_round_seconds']:.2f} s "
            f"({result['checkpoint_over_round']:.1%} of a round; every {result['rounds_for_2_percent']:.1f} rounds "
            "costs 2%)",
            flush=True,
        )


if __name__ == "__main__":
    main()
