"""What does IIF cost per round? TRL's PPOTrainer against IIF (round and epoch schedules, p=1).

Each arm runs in its own process on the embedded default task (tiny GPT-2 + LoRA policy, 32
records per round, 4 PPO epochs), with a tiny reward *model* so that TRL's own PPOTrainer can
be the baseline, from the same seed (so the first rounds see the same batches). Reported:

- per-round wall time (median over rounds after the first), as a ratio to TRL's PPO;
- IIF's split of the round: rollout, held-out sampling (generation for the target), scoring,
  optimisation (from the trainer's time/* metrics); scoring as a share of PPO's round;
- peak resident memory of the process, and its increase over the memory in use before
  training, as ratios to PPO's.

Goals from the evidence issue: round schedule <= PPO's round time with scoring <= 15% of a PPO
round; epoch schedule <= 1.3x PPO's; IIF peak memory <= 1.1x PPO's.

    python benchmarks/overhead.py --rounds 30
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"ppo": {}, "iif_round": {"iif_schedule": "round"}, "iif_epoch": {"iif_schedule": "epoch"}}
PHASES = ("rollout", "target_sampling", "scoring", "optimisation")


def worker(arm: str, rounds: int, seed: int, out: Path) -> None:
    """Run one arm in this process and write its timings and memory to ``out``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import numpy as np
    import psutil
    import torch
    from transformers import TrainerCallback

    from rlhf_influence.default_task import build_default_task
    from rlhf_influence.toy import tiny_scalar_head_model

    torch.manual_seed(seed)
    np.random.seed(seed)
    task = build_default_task(seed=seed)
    reward_model = tiny_scalar_head_model(len(task.tokenizer), hidden=64, layers=1, seed=seed + 2)
    common = dict(
        output_dir=str(out.parent / f"{arm}-run"), per_device_train_batch_size=32, gradient_accumulation_steps=1,
        num_mini_batches=4, num_ppo_epochs=4, total_episodes=32 * rounds, response_length=8,
        local_rollout_forward_batch_size=32, learning_rate=5e-3, lr_scheduler_type="constant", temperature=1.0,
        kl_coef=0.02, num_sample_generations=0, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
        seed=seed, disable_tqdm=True,
    )  # fmt: skip

    class RoundClock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, *a, **k):
            self.marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.marks.append(time.perf_counter())

    clock = RoundClock()
    if arm == "ppo":
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        trainer = PPOTrainer(
            args=PPOConfig(**common), processing_class=task.tokenizer, model=task.policy, ref_model=None,
            reward_model=reward_model, train_dataset=task.train_dataset.select_columns(["input_ids"]),
            value_model=task.value_model, peft_config=task.lora_config,
        )  # fmt: skip
    else:
        from rlhf_influence import IIFPPOConfig, IIFPPOTrainer

        trainer = IIFPPOTrainer(
            args=IIFPPOConfig(**common, **ARMS[arm], iif_num_heldout_prompts=16, iif_store=False),
            processing_class=task.tokenizer, model=task.policy, ref_model=None, reward_model=reward_model,
            train_dataset=task.train_dataset.select_columns(["input_ids"]), value_model=task.value_model,
            target_dataset=task.heldout_dataset.select_columns(["input_ids"]), peft_config=task.lora_config,
        )  # fmt: skip
    trainer.add_callback(clock)
    before = psutil.Process().memory_info().rss
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    round_seconds = [b - a for a, b in zip(clock.marks, clock.marks[1:], strict=False)]
    phases = {}
    if arm != "ppo":
        rows = [r for r in trainer.state.log_history if "time/rollout_seconds" in r]
        phases = {p: [r.get(f"time/{p}_seconds", 0.0) for r in rows] for p in PHASES}
    out.write_text(
        json.dumps({"round_seconds": round_seconds, "phases": phases, "peak": peak, "before": before})
    )


def median_after_first(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "overhead")
    parser.add_argument("--worker", choices=list(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.rounds, args.seed, args.result)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for arm in ARMS:  # one at a time: timings need the machine to themselves
        result = args.out / f"{arm}.json"
        cmd = [sys.executable, __file__, "--worker", arm, "--rounds", str(args.rounds), "--seed", str(args.seed),
               "--result", str(result)]  # fmt: skip
        subprocess.run(
            cmd, check=True, capture_output=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
        results[arm] = json.loads(result.read_text())
    ppo = results["ppo"]
    ppo_round = median_after_first(ppo["round_seconds"])
    ppo_growth = ppo["peak"] - ppo["before"]
    print(
        f"{args.rounds} rounds, seed {args.seed}; median round time after the first; ratios to TRL's PPOTrainer\n"
    )
    print(
        "| arm | round s | x PPO | rollout | held-out sampling | scoring | optimisation | scoring / PPO round "
        "| peak RSS MiB | x PPO | growth MiB | x PPO |"
    )
    print("|---" * 12 + "|")
    summary = {}
    for arm, r in results.items():
        round_s = median_after_first(r["round_seconds"])
        split = {p: median_after_first(v) for p, v in r["phases"].items()}
        growth = r["peak"] - r["before"]
        summary[arm] = {"round_seconds": round_s, "ratio": round_s / ppo_round, "split": split,
                        "scoring_share_of_ppo_round": split.get("scoring", 0.0) / ppo_round,
                        "peak_mib": r["peak"] / 2**20, "peak_ratio": r["peak"] / ppo["peak"],
                        "growth_mib": growth / 2**20, "growth_ratio": growth / ppo_growth}  # fmt: skip
        cells = [f"{split[p]:.3f}" if p in split else "-" for p in PHASES]
        s = summary[arm]
        print(f"| {arm} | {round_s:.3f} | {s['ratio']:.2f} | " + " | ".join(cells)
              + f" | {s['scoring_share_of_ppo_round']:.0%} | {s['peak_mib']:.0f} | {s['peak_ratio']:.2f} "
              f"| {s['growth_mib']:.0f} | {s['growth_ratio']:.2f} |")  # fmt: skip
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
