"""What does IIF cost per round? PPO against IIF (round and epoch schedules, p=1).

Each arm runs in its own process, one at a time, on the embedded default task (tiny GPT-2 +
LoRA policy, 32 records per round, 4 PPO epochs), with a tiny reward *model* so that TRL's own
PPOTrainer can run it, from the same seed. Two PPO baselines:

  trl        TRL's PPOTrainer (wall time per round)
  ppo        this project's loop at p=0: the same rollout and PPO epochs as TRL (bit-identical
             weights, see tests/test_trainer.py); its round = rollout + optimisation
  iif_round  IIF, round schedule; its round = rollout + held-out sampling + scoring + optimisation
  iif_epoch  IIF, epoch schedule; the same

The goals compare IIF with `ppo` (same loop, same bookkeeping, phase times from the trainer's
time/* metrics); the TRL column shows wall time per round. TRL's loop calls gc.collect() twice
a round, which on a model this small is most of its round: by default gc.collect is made a
no-op in every arm so that the times are compute (--keep-gc measures the loops as shipped).

Reported: mean per-round time over rounds after the first, as ratios to `ppo`; IIF's split
(rollout, held-out sampling, scoring, optimisation); scoring as a share of a PPO round; peak
resident memory and its increase over the memory in use before training, as ratios to TRL's.

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
ARMS = {
    "trl": {},
    "ppo": {"iif_drop_fraction": 0.0},
    "iif_round": {"iif_schedule": "round"},
    "iif_epoch": {"iif_schedule": "epoch"},
}
PPO_PHASES = ("rollout", "optimisation")  # what PPO needs; the p=0 arm's scoring only feeds its store
PHASES = ("rollout", "target_sampling", "scoring", "optimisation")


def worker(arm: str, rounds: int, seed: int, out: Path, keep_gc: bool = False) -> None:
    """Run one arm in this process and write its timings and memory to ``out``."""
    if not keep_gc:
        import gc

        gc.collect = lambda *args, **kwargs: 0  # both loops call it every round; see the docstring
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import numpy as np
    import psutil
    import torch
    from transformers import TrainerCallback

    from rlhf_influence.tasks.sentiment import HELDOUT_PROMPTS, TRAINING, build
    from rlhf_influence.tasks.toy import tiny_scalar_head_model

    torch.manual_seed(seed)
    np.random.seed(seed)
    task = build(seed=seed)
    reward_model = tiny_scalar_head_model(len(task.tokenizer), hidden=64, layers=1, seed=seed + 2)
    common = dict(
        **TRAINING, output_dir=str(out.parent / f"{arm}-run"),
        total_episodes=TRAINING["per_device_train_batch_size"] * rounds, report_to="none",
        save_strategy="no", use_cpu=True, bf16=False, seed=seed, disable_tqdm=True,
    )  # fmt: skip

    class RoundClock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, *a, **k):
            self.marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.marks.append(time.perf_counter())

    clock = RoundClock()
    if arm == "trl":
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        trainer = PPOTrainer(
            args=PPOConfig(**common), processing_class=task.tokenizer, model=task.policy, ref_model=None,
            reward_model=reward_model, train_dataset=task.train_dataset.select_columns(["input_ids"]),
            value_model=task.value_model, peft_config=task.lora_config,
        )  # fmt: skip
    else:
        from rlhf_influence import IIFPPOConfig, IIFPPOTrainer

        trainer = IIFPPOTrainer(
            args=IIFPPOConfig(**common, **ARMS[arm], iif_num_heldout_prompts=HELDOUT_PROMPTS, iif_store=False),
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
    if arm != "trl":
        rows = [r for r in trainer.state.log_history if "time/rollout_seconds" in r]
        phases = {p: [r.get(f"time/{p}_seconds", 0.0) for r in rows] for p in PHASES}
    out.write_text(
        json.dumps({"round_seconds": round_seconds, "phases": phases, "peak": peak, "before": before})
    )


def mean_after_first(values: list[float]) -> float:
    """Mean, not median: a round's optimisation time is bimodal (kept records fill 2 or 3
    mini-batches), and a median picks one mode."""
    return statistics.fmean(values[1:] if len(values) > 1 else values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-gc", action="store_true", help="leave gc.collect() in the loops (see above)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "overhead")
    parser.add_argument("--worker", choices=list(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.rounds, args.seed, args.result, args.keep_gc)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for arm in ARMS:  # one at a time: timings need the machine to themselves
        result = args.out / f"{arm}.json"
        cmd = [sys.executable, __file__, "--worker", arm, "--rounds", str(args.rounds), "--seed", str(args.seed),
               "--result", str(result), *(["--keep-gc"] if args.keep_gc else [])]  # fmt: skip
        done = subprocess.run(
            cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
        if done.returncode != 0:
            raise RuntimeError(f"arm {arm} failed:\n{done.stderr[-3000:]}")
        results[arm] = json.loads(result.read_text())
        result.unlink()

    def phase_round(r: dict, phases) -> list[float]:
        return [sum(r["phases"][p][i] for p in phases) for i in range(len(r["phases"]["rollout"]))]

    ppo_round = mean_after_first(phase_round(results["ppo"], PPO_PHASES))
    trl = results["trl"]
    trl_growth = trl["peak"] - trl["before"]
    gc_note = "gc.collect kept" if args.keep_gc else "gc.collect disabled in every arm"
    lines = [
        f"{args.rounds} rounds, seed {args.seed}, {gc_note}; mean per round after the first; "
        "time ratios to this loop's PPO (p=0: rollout + optimisation), memory ratios to TRL's PPOTrainer\n",
        "| arm | round s | x PPO | rollout | held-out sampling | scoring | optimisation | scoring / PPO round "
        "| wall s | peak RSS MiB | x TRL | growth MiB | x TRL |",
        "|---" * 13 + "|",
    ]
    summary = {"gc_disabled": not args.keep_gc, "rounds": args.rounds, "arms": {}}
    for arm, r in results.items():
        wall = mean_after_first(r["round_seconds"])
        if arm == "trl":
            round_s, split = wall, {}
        else:
            phases = PPO_PHASES if arm == "ppo" else PHASES
            round_s = mean_after_first(phase_round(r, phases))
            split = {p: mean_after_first(r["phases"][p]) for p in phases}
        growth = r["peak"] - r["before"]
        s = summary["arms"][arm] = {
            "round_seconds": round_s, "ratio": round_s / ppo_round, "wall_seconds": wall, "split": split,
            "scoring_share_of_ppo_round": split.get("scoring", 0.0) / ppo_round,
            "peak_mib": r["peak"] / 2**20, "peak_ratio": r["peak"] / trl["peak"],
            "growth_mib": growth / 2**20, "growth_ratio": growth / trl_growth,
        }  # fmt: skip
        cells = [f"{split[p]:.4f}" if p in split else "-" for p in PHASES]
        share = f"{s['scoring_share_of_ppo_round']:.0%}" if "scoring" in split else "-"
        lines.append(f"| {arm} | {round_s:.4f} | {s['ratio']:.2f} | " + " | ".join(cells)
                     + f" | {share} | {wall:.4f} | {s['peak_mib']:.0f} | {s['peak_ratio']:.2f} "
                     f"| {s['growth_mib']:.0f} | {s['growth_ratio']:.2f} |")  # fmt: skip
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
