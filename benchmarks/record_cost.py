"""What does recording the attribution store cost? Plain PPO/GRPO against record-only runs.

Three arms per algorithm, each in its own process, one after the other, from the same seed, on an
embedded task with its own settings (`--task`, default the real LM `reviews`):

  plain             iif_enabled=false: TRL's PPO / GRPO, no store
  record_snapshot   iif_target=none: the store's per-record gradients from one forward and
                    backward over the round's records at the round start, nothing scored or dropped
  record_training   iif_target=none, iif_store_gradients=training: the gradients from hooks in the
                    optimisation's own backward, no pass of their own
  record_training_nokl  the same with iif_store_kl=false (GRPO: no KL curve; --arms to run it)

and, to compare IIF's own cost (GRPO and RLOO; --arms to run them):

  iif_round         IIF with the task's target (held-out on the embedded tasks), p=1, round schedule:
                    the records scored in a forward and backward of their own before the step
  iif_step          the same decision and update with iif_schedule='step': scored from the step's
                    own backward, no pass over the records
  iif_round_buffer, iif_step_buffer   the same two with the buffer target (the round's own
                    completions: no held-out samples)

A round's time is the wall time between the trainer's step callbacks (PPO: one a round; GRPO: one a
round with the task's settings, one optimizer step a generation batch), everything included. Mean
over the rounds after the first, as ratios to `plain`; peak resident memory of each process. The
goal (issue "attribution for free"): record_training <= 1.05x plain's round and memory.

Timings need the machine to themselves: run nothing else meanwhile.

    python benchmarks/record_cost.py --task reviews --rounds 7 --out benchmarks/results/record_cost_reviews
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import round_clock

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "plain": {"iif_enabled": False},
    "record_snapshot": {"iif_target": "none"},
    "record_training": {"iif_target": "none", "iif_store_gradients": "training"},
    # GRPO: without the store's KL curve, which costs a policy and a reference forward when beta=0
    "record_training_nokl": {"iif_target": "none", "iif_store_gradients": "training", "iif_store_kl": False},
    "iif_round": {"iif_drop_fraction": 1.0, "iif_schedule": "round"},
    "iif_step": {"iif_drop_fraction": 1.0, "iif_schedule": "step"},
    "iif_round_buffer": {"iif_drop_fraction": 1.0, "iif_schedule": "round", "iif_target": "buffer_return"},
    "iif_step_buffer": {"iif_drop_fraction": 1.0, "iif_schedule": "step", "iif_target": "buffer_return"},
}
DEFAULT_ARMS = ("plain", "record_snapshot", "record_training")
ALGORITHMS = ("ppo", "grpo")


def worker(algorithm: str, arm: str, task_name: str, rounds: int, seed: int, out: Path, precision: str) -> dict:
    """Run one arm in this process; its round times, memory and store size."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import numpy as np
    import torch

    from rlhf_influence import IIFGRPOConfig, IIFGRPOTrainer, IIFPPOConfig, IIFPPOTrainer
    from rlhf_influence.tasks import get_task

    spec = get_task(task_name)
    torch.manual_seed(seed)
    np.random.seed(seed)
    task = spec.build(seed=seed)
    run_dir = out / f"{algorithm}-{arm}-run"
    cuda = torch.cuda.is_available()
    # the recipes' precision: bf16 on a CUDA device that has it, float32 elsewhere; --precision overrides
    bf16 = precision == "bf16" or (precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    common = {"output_dir": str(run_dir), "report_to": "none", "save_strategy": "no", "seed": seed,
              "disable_tqdm": True, "use_cpu": not cuda, "bf16": bf16}  # fmt: skip

    clock = round_clock()
    if algorithm == "ppo":
        settings = {**spec.settings_for("ppo"), **common, **ARMS[arm]}
        settings["total_episodes"] = settings["per_device_train_batch_size"] * rounds
        trainer = IIFPPOTrainer(
            args=IIFPPOConfig(**settings), processing_class=task.tokenizer, model=task.policy, ref_model=None,
            reward_model=task.reward, train_dataset=task.train_dataset.select_columns(["input_ids"]),
            value_model=task.value_model, peft_config=task.lora_config,
        )  # fmt: skip
    else:

        def reward(prompts, completions, **kwargs):
            return task.reward(prompts, completions)

        settings = {**spec.settings_for("grpo"), **common, **ARMS[arm], "max_steps": rounds}
        trainer = IIFGRPOTrainer(
            model=task.policy, reward_funcs=[reward], args=IIFGRPOConfig(**settings),
            train_dataset=task.train_dataset.select_columns(["prompt"]), processing_class=task.tokenizer,
            peft_config=task.lora_config,
            target_dataset=task.heldout_dataset.select_columns(["prompt"]) if arm.startswith("iif_") else None,
        )  # fmt: skip
    trainer.add_callback(clock)
    trainer.train()
    store = run_dir / "attribution"
    size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) if store.exists() else 0
    rounds = [row for row in trainer.state.log_history if any(key.startswith("time/") for key in row)][1:]
    trained: list[dict] = []
    if store.exists():  # the store keeps every round's metrics, GRPO's phases included
        from rlhf_influence.store import AttributionStore

        stored = AttributionStore(store)
        every = [stored.read_metrics(index) for index in stored.rounds()]
        rounds = every[1:]
        # what each round trained on (IIF's decision) and its reward: equal decisions, equal training
        trained = [{key: row[key] for key in ("objective/scores", "iif/kept_fraction") if key in row} for row in every]
    shutil.rmtree(run_dir, ignore_errors=True)  # the figures are what is kept
    phases = {key: statistics.fmean(row[key] for row in rounds if key in row)
              for key in sorted({k for row in rounds for k in row if k.startswith("time/")})}  # fmt: skip
    return {
        "phases": phases,  # mean seconds of each timed phase of a round, after the first
        "round_seconds": [b - a for a, b in zip(clock.marks, clock.marks[1:], strict=False)],
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "gpu_peak": torch.cuda.max_memory_allocated() if cuda else None,
        "precision": "bf16" if bf16 else "float32",
        "store_bytes": size,
        "trained": trained,
    }


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def summarise(results: dict, args) -> str:
    first = next(iter(next(iter(results.values())).values()))
    gpu = first.get("gpu_peak") is not None
    lines = [f"Task {args.task}, {args.rounds} rounds, seed {args.seed}, {device_name()}, "
             f"{first.get('precision', 'float32')}, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}; mean round after the first.", "",
             "| algorithm | arm | round (s) | x plain | peak RSS (MiB) | x plain |"
             + (" peak GPU (MiB) | x plain |" if gpu else "") + " store per round (MiB) |",
             "|---|---|---|---|---|---|" + ("---|---|" if gpu else "") + "---|"]  # fmt: skip
    for algorithm, arms in results.items():
        base = arms["plain"]
        base_round = statistics.fmean(base["round_seconds"][1:])
        for arm, r in arms.items():
            mean = statistics.fmean(r["round_seconds"][1:])
            gpu_cells = f" {r['gpu_peak'] / 2**20:.0f} | {r['gpu_peak'] / base['gpu_peak']:.3f} |" if gpu else ""
            lines.append(
                f"| {algorithm} | {arm} | {mean:.2f} | {mean / base_round:.3f} | {r['peak'] / 2**20:.0f} | "
                f"{r['peak'] / base['peak']:.3f} |{gpu_cells} {r['store_bytes'] / 2**20 / args.rounds:.2f} |"
            )
    lines += ["", "Timed phases of a round (mean seconds after the first; what the trainer logs as time/*):", ""]
    for algorithm, arms in results.items():
        names = sorted({name for r in arms.values() for name in r.get("phases", {})})
        lines += [f"| {algorithm} | " + " | ".join(n.removeprefix("time/").removesuffix("_seconds") for n in names) + " |",
                  "|---" * (len(names) + 1) + "|"]  # fmt: skip
        for arm, r in arms.items():
            lines.append(f"| {arm} | " + " | ".join(f"{r.get('phases', {}).get(n, 0.0):.2f}" for n in names) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="reviews")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=list(ARMS),
                        help="plain first: the ratios are to it")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/record_cost_<task>")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bf16"),
                        help="auto: bf16 on a CUDA device that has it (the recipes' default), float32 elsewhere")
    parser.add_argument("--worker", nargs=2, metavar=("ALGORITHM", "ARM"), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = args.out or ROOT / "benchmarks" / "results" / f"record_cost_{args.task}"
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        result = worker(*args.worker, args.task, args.rounds, args.seed, out, args.precision)
        args.result.write_text(json.dumps(result))
        return
    results: dict = {}
    failed: list[str] = []
    for algorithm in args.algorithms:
        results[algorithm] = {}
        for arm in args.arms:
            path = out / f"{algorithm}-{arm}.json"
            cmd = [sys.executable, __file__, "--task", args.task, "--rounds", str(args.rounds), "--seed", str(args.seed),
                   "--out", str(out), "--precision", args.precision, "--worker", algorithm, arm,
                   "--result", str(path)]  # fmt: skip
            print(f"{algorithm} {arm} ...", flush=True)
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:  # say why, and go on with the other arms
                print(f"{algorithm} {arm} failed (exit {done.returncode}):\n" + "\n".join(done.stderr.splitlines()[-30:]))
                failed.append(f"{algorithm}/{arm}")
                continue
            results[algorithm][arm] = json.loads(path.read_text())
    results = {algorithm: arms for algorithm, arms in results.items() if "plain" in arms}
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    if results:
        text = summarise(results, args)
        (out / "table.md").write_text(text)
        print(text)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
