"""What does IIF cost per round? Plain PPO against IIF's schedules and targets, on any task.

Each arm runs in its own process, one after the other, from the same seed, on an embedded task
(`--task`: the toy `sentiment` default, or the real LM `reviews`) with its own settings, the
attribution store on at its defaults (what a user's run writes):

  ppo               iif_enabled=false: plain PPO, no held-out sampling, scoring or store (the
                    same updates as TRL's PPOTrainer, bit-identical weights: tests/test_trainer.py)
  iif_round         IIF, round schedule (scored once a round, the paper's), p=1, held-out target
                    (its prompts generated in the rollout's batched call, the default)
  iif_round_separate  the same with the held-out prompts in a generation of their own
  iif_epoch         IIF, epoch schedule (re-scored before each PPO epoch), p=1, held-out target
  iif_round_buffer  round schedule with the buffer target (the round's own records: no held-out
                    sampling, and one forward+backward scores the round)
  iif_epoch_buffer  epoch schedule with the buffer target

A round's time is its wall time, everything included (rollout, held-out sampling, scoring,
optimisation, storing, logging), between the trainer's step callbacks; its split comes from
the trainer's time/* metrics ("other" is the rest: storing, the adapter snapshot, metrics).
Reported: mean over rounds after the first, as ratios to `ppo`'s; scoring as a share of a PPO
round; peak resident memory of each arm's process and its ratio to `ppo`'s; the store's bytes
per round and per record (projected gradients, adapter snapshot, the rest). The goals
(issue 12): round schedule <= 1.0x PPO's round, epoch schedule <= 1.3x, scoring <= 15% of a
PPO round, peak memory <= 1.1x, stored attribution <= 64 KB per record.

Timings need the machine to themselves: run nothing else meanwhile.

    python benchmarks/overhead.py --task sentiment --rounds 30
    python benchmarks/overhead.py --task reviews --rounds 6 --out benchmarks/results/overhead_reviews
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "ppo": {"iif_enabled": False},
    "iif_round": {"iif_schedule": "round"},
    "iif_round_separate": {"iif_schedule": "round", "iif_heldout_sampling": "separate"},
    "iif_epoch": {"iif_schedule": "epoch"},
    "iif_round_buffer": {"iif_schedule": "round", "iif_target": "buffer_return"},
    "iif_epoch_buffer": {"iif_schedule": "epoch", "iif_target": "buffer_return"},
}
PHASES = ("rollout", "target_sampling", "scoring", "optimisation")


def round_clock():
    """A trainer callback that marks the start of training and the end of every step (a PPO round;
    a GRPO optimizer step): ``marks``, perf_counter seconds."""
    from transformers import TrainerCallback

    class RoundClock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, *a, **k):
            self.marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.marks.append(time.perf_counter())

    return RoundClock()


def worker(
    arm: str, task_name: str, rounds: int, seed: int, out: Path, overrides: dict, keep_gc: bool
) -> None:
    """Run one arm in this process and write its timings, memory and store sizes to ``out``."""
    if not keep_gc:
        import gc

        gc.collect = lambda *args, **kwargs: 0  # the loop calls it every round; see --keep-gc
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import numpy as np
    import psutil
    import torch

    from rlhf_influence import IIFPPOConfig, IIFPPOTrainer
    from rlhf_influence.tasks import get_task

    spec = get_task(task_name)
    torch.manual_seed(seed)
    np.random.seed(seed)
    task = spec.build(seed=seed)
    cuda = torch.cuda.is_available()
    # the recipe's precision: bf16 on a CUDA device that has it, float32 elsewhere (--set bf16=false)
    device_defaults = {"use_cpu": not cuda, "bf16": cuda and torch.cuda.is_bf16_supported()}
    settings = {**spec.settings_for("ppo"), **device_defaults, **overrides, **ARMS[arm]}
    per_round = settings["per_device_train_batch_size"] * settings.get("gradient_accumulation_steps", 1)
    run_dir = out.parent / f"{arm}-run"
    settings.update(
        output_dir=str(run_dir), total_episodes=per_round * rounds, report_to="none", save_strategy="no",
        seed=seed, disable_tqdm=True,
    )  # fmt: skip

    clock = round_clock()
    trainer = IIFPPOTrainer(
        args=IIFPPOConfig(**settings), processing_class=task.tokenizer, model=task.policy, ref_model=None,
        reward_model=task.reward, train_dataset=task.train_dataset.select_columns(["input_ids"]),
        value_model=task.value_model, target_dataset=task.heldout_dataset.select_columns(["input_ids"]),
        peft_config=task.lora_config,
    )  # fmt: skip
    trainer.add_callback(clock)
    before = psutil.Process().memory_info().rss
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gpu_peak = torch.cuda.max_memory_allocated() if cuda else None
    rows = [r for r in trainer.state.log_history if "time/rollout_seconds" in r]
    result = {
        "round_seconds": [b - a for a, b in zip(clock.marks, clock.marks[1:], strict=False)],
        "phases": {p: [r.get(f"time/{p}_seconds", 0.0) for r in rows] for p in PHASES},
        "kept": [r.get("iif/kept_fraction", 1.0) for r in rows],
        "peak": peak,
        "gpu_peak": gpu_peak,
        "precision": "bf16" if settings["bf16"] else "float32",
        "before": before,
        "records_per_round": per_round,
        "store": store_bytes(Path(trainer.args.attribution_dir)) if trainer.store is not None else None,
    }
    out.write_text(json.dumps(result))
    shutil.rmtree(run_dir, ignore_errors=True)


def store_bytes(path: Path) -> dict:
    """Mean bytes per stored round, by file kind: projected gradients, adapter snapshot, the rest."""
    rounds = sorted(p for p in path.glob("round_*") if p.is_dir())
    kinds = {"gradients": 0, "adapter": 0, "other": 0}
    for round_dir in rounds:
        for f in round_dir.iterdir():
            kind = f.name.split(".")[0]
            kinds[kind if kind in kinds else "other"] += f.stat().st_size
    return {kind: size / max(1, len(rounds)) for kind, size in kinds.items()}


def mean_after_first(values: list[float]) -> float:
    """Mean, not median: a round's optimisation time is multimodal (kept records fill one or
    more mini-batches), and a median picks one mode."""
    return statistics.fmean(values[1:] if len(values) > 1 else values)


def summarise(results: dict, rounds: int, seed: int, task: str, device: str) -> tuple[dict, list[str]]:
    ppo = results["ppo"]
    ppo_round = mean_after_first(ppo["round_seconds"])
    summary = {"task": task, "rounds": rounds, "seed": seed, "device": device, "arms": {}}
    lines = [
        f"task {task}, {rounds} rounds of {ppo['records_per_round']} records, seed {seed}, {device}; mean per "
        "round after the first, seconds; ratios to plain PPO (iif_enabled=false)\n",
        "| arm | round | x PPO | rollout | held-out sampling | scoring | optimisation | other | scoring / PPO "
        "round | kept | peak RSS MiB | x PPO | peak GPU MiB | x PPO | stored KiB / record | of which snapshot |",
        "|---" * 16 + "|",
    ]
    for arm, r in results.items():
        round_s = mean_after_first(r["round_seconds"])
        split = {p: mean_after_first(r["phases"][p]) for p in PHASES}
        other = round_s - sum(split.values())
        store = r["store"]
        per_record = None if store is None else sum(store.values()) / r["records_per_round"] / 1024
        snapshot = None if store is None else store["adapter"] / r["records_per_round"] / 1024
        s = summary["arms"][arm] = {
            "round_seconds": round_s, "ratio": round_s / ppo_round, "split": {**split, "other": other},
            "scoring_share_of_ppo_round": split["scoring"] / ppo_round, "kept": mean_after_first(r["kept"]),
            "peak_mib": r["peak"] / 2**20, "peak_ratio": r["peak"] / ppo["peak"], "store_bytes_per_round": store,
            "stored_kib_per_record": per_record, "snapshot_kib_per_record": snapshot,
            "precision": r.get("precision"),
        }  # fmt: skip
        gpu = "- | -"
        if r.get("gpu_peak"):
            s["gpu_peak_mib"], s["gpu_peak_ratio"] = r["gpu_peak"] / 2**20, r["gpu_peak"] / ppo["gpu_peak"]
            gpu = f"{s['gpu_peak_mib']:.0f} | {s['gpu_peak_ratio']:.2f}"
        cells = [f"{split[p]:.2f}" if split[p] else "-" for p in PHASES]
        share = f"{s['scoring_share_of_ppo_round']:.0%}" if split["scoring"] else "-"
        stored = "-" if per_record is None else f"{per_record:.0f} | {snapshot:.0f}"
        lines.append(
            f"| {arm} | {round_s:.2f} | {s['ratio']:.2f} | "
            + " | ".join(cells)
            + f" | {other:.2f} | {share} "
            f"| {s['kept']:.2f} | {s['peak_mib']:.0f} | {s['peak_ratio']:.2f} | {gpu} | {stored if store else '- | -'} |"
        )
    return summary, lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--task", default="sentiment", help="an embedded task: sentiment (toy), keywords, reviews"
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="ppo is always run")
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="FIELD=VALUE",
        help="override the task's settings in every arm, e.g. num_ppo_epochs=4 (values read as JSON)",
    )  # fmt: skip
    parser.add_argument("--keep-gc", action="store_true", help="leave the loop's gc.collect() in (the toy's "
                        "rounds are so short that it dominates them: off by default)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/overhead_<task>")
    parser.add_argument("--worker", choices=list(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    if args.worker:
        worker(args.worker, args.task, args.rounds, args.seed, args.result, overrides, args.keep_gc)
        return
    out = args.out or ROOT / "benchmarks" / "results" / f"overhead_{args.task}"
    out.mkdir(parents=True, exist_ok=True)
    import torch

    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU {platform.processor() or ''}".strip()
    )
    device += f", {torch.get_num_threads()} threads, torch {torch.__version__}"
    results = {}
    for arm in ["ppo", *[a for a in args.arms if a != "ppo"]]:  # one at a time: timings need the machine
        result = out / f"{arm}.json"
        cmd = [sys.executable, __file__, "--worker", arm, "--task", args.task, "--rounds", str(args.rounds),
               "--seed", str(args.seed), "--result", str(result), *(["--set", *args.set] if args.set else []),
               *(["--keep-gc"] if args.keep_gc else [])]  # fmt: skip
        start = time.time()
        done = subprocess.run(
            cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
        if done.returncode != 0:
            raise RuntimeError(f"arm {arm} failed:\n{done.stderr[-3000:]}")
        results[arm] = json.loads(result.read_text())
        result.unlink()
        print(f"{arm}: {time.time() - start:.0f} s", flush=True)
    device += f", {results['ppo']['precision']}"  # as the arms trained: the recipe's default unless --set
    summary, lines = summarise(results, args.rounds, args.seed, args.task, device)
    summary["overrides"] = overrides
    (out / "summary.json").write_text(json.dumps({"summary": summary, "raw": results}, indent=2))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
