"""PPO's value function: a separate value model (TRL's) against a head on the policy's LoRA backbone.

Two parts:

  figures   what a LoRA PPO job's model state needs (rlhf_influence.launch.memory.ppo_job_memory: models
            built on the meta device from their configs, nothing downloaded) for Qwen2.5-shaped
            0.5B, 1.5B and 7B policies and a Llama-2-7B-shaped one, in float32 and bfloat16, with
            each value setting, and which of a 24 GB, 80 GB and 141 GB GPU it fits (model state
            only: activations and logits come on top)
  measure   a PPO run on an embedded task (default the real LM `reviews`) with each setting, each
            in its own process from the same seed, plain PPO (iif_enabled=false): mean round time
            after the first and peak resident memory, as ratios to the separate value model's.
            Timings need the machine to themselves: run nothing else meanwhile.

    python benchmarks/value_head.py figures --out benchmarks/results/value_head
    python benchmarks/value_head.py measure --task reviews --rounds 7 --out benchmarks/results/value_head
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
SETTINGS = ("separate", "shared")
GPUS_GB = (24, 80, 141)
HEADROOM = 0.85  # a job "fits" when its model state takes at most this share of the card (the rest:
# activations, logits, the CUDA context; a judgement, said with the table)

# Published shapes (config.json of each model), written out: nothing is downloaded.
SHAPES = {
    "Qwen2.5-0.5B": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
    "Qwen2.5-1.5B": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
    "Qwen2.5-7B": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                 num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)),
    "Llama-2-7B": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)),
}  # fmt: skip


def figures(out: Path, lora_r: int = 16) -> str:
    import torch
    from transformers import AutoConfig

    from rlhf_influence.launch.memory import GIB, ppo_job_memory

    lines = [
        f"Model state of a LoRA PPO job (r={lora_r} on q, k, v, o; Adam; reward model of the policy's shape; "
        "reference = policy without its adapter), weights and Adam's state in the dtype named (bfloat16: the "
        "models loaded with --dtype bfloat16; a mixed-precision run with float32 weights takes the float32 rows). "
        f"'fits' = at most {HEADROOM:.0%} of the card's memory (GB = 1e9 bytes), the rest left for activations, "
        "logits and the CUDA context.",
        "",
        "| policy | dtype | value | policy | LoRA+Adam | value | reward model | total (GiB) | fits "
        + " / ".join(f"{g} GB" for g in GPUS_GB) + " |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for name, (model_type, shape) in SHAPES.items():
        config = AutoConfig.for_model(model_type, **shape)
        for dtype in (torch.float32, torch.bfloat16):
            for setting in SETTINGS:
                job = ppo_job_memory(config, dtype, value_head=setting, lora_r=lora_r)
                fits = ["yes" if job.total <= HEADROOM * g * 1e9 else "no" for g in GPUS_GB]
                gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
                lines.append(f"| {name} | {str(dtype).removeprefix('torch.')} | {setting} | {gib(job.policy_weights)} | "
                             f"{gib(job.lora)} | {gib(job.value)} | {gib(job.reward_model)} | {gib(job.total)} | "
                             f"{' / '.join(fits)} |")  # fmt: skip
                rows.append({"policy": name, "dtype": str(dtype), "value_head": setting, "total_bytes": job.total,
                             "parts": job.__dict__, "fits_gb": dict(zip(GPUS_GB, fits, strict=True))})  # fmt: skip
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_figures.md").write_text(text)
    (out / "memory_figures.json").write_text(json.dumps(rows, indent=2))
    return text


def worker(setting: str, task_name: str, rounds: int, seed: int, out: Path) -> dict:
    """One plain-PPO run with ``setting`` in this process: its round times and peak memory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    from rlhf_influence import IIFPPOConfig, IIFPPOTrainer
    from rlhf_influence.tasks import get_task

    spec = get_task(task_name)
    torch.manual_seed(seed)
    np.random.seed(seed)
    task = spec.build(seed=seed, value_model=setting == "separate")
    run_dir = out / f"{setting}-run"
    settings = {**spec.settings_for("ppo"), "output_dir": str(run_dir), "report_to": "none", "save_strategy": "no", "seed": seed,
                "disable_tqdm": True, "use_cpu": not torch.cuda.is_available(), "bf16": False,
                "iif_enabled": False, "value_head": setting}  # fmt: skip
    settings["total_episodes"] = settings["per_device_train_batch_size"] * rounds
    clock = round_clock()
    trainer = IIFPPOTrainer(
        args=IIFPPOConfig(**settings), processing_class=task.tokenizer, model=task.policy, ref_model=None,
        reward_model=task.reward, train_dataset=task.train_dataset.select_columns(["input_ids"]),
        value_model=task.value_model, peft_config=task.lora_config,
    )  # fmt: skip
    trainer.add_callback(clock)
    trainer.train()
    rows = [row for row in trainer.state.log_history if "objective/scores" in row]
    shutil.rmtree(run_dir, ignore_errors=True)
    trained = sum(p.numel() for p in trainer.unwrapped.parameters() if p.requires_grad)
    return {
        "round_seconds": [b - a for a, b in zip(clock.marks, clock.marks[1:], strict=False)],
        "phases": {key: statistics.fmean(row[key] for row in rows[1:]) for key in rows[0] if key.startswith("time/")},
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "trained_parameters": trained,
        "scores": [row["objective/scores"] for row in rows],
    }


def measure(args) -> str:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for setting in SETTINGS:
        path = out / f"measure-{setting}.json"
        cmd = [sys.executable, __file__, "measure", "--task", args.task, "--rounds", str(args.rounds), "--seed",
               str(args.seed), "--out", str(out), "--worker", setting, "--result", str(path)]  # fmt: skip
        print(f"{setting} ...", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
        results[setting] = json.loads(path.read_text())
    base = results["separate"]
    base_round = statistics.fmean(base["round_seconds"][1:])
    lines = [f"Task {args.task}, plain PPO, {args.rounds} rounds, seed {args.seed}, "
             f"{platform.processor() or platform.machine()}; mean round after the first.", "",
             "| value | round (s) | x separate | peak RSS (MiB) | x separate | trained parameters | optimisation (s) | rollout (s) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for setting, r in results.items():
        mean = statistics.fmean(r["round_seconds"][1:])
        lines.append(
            f"| {setting} | {mean:.2f} | {mean / base_round:.3f} | {r['peak'] / 2**20:.0f} | {r['peak'] / base['peak']:.3f} | "
            f"{r['trained_parameters']:,} | {r['phases'].get('time/optimisation_seconds', 0):.2f} | "
            f"{r['phases'].get('time/rollout_seconds', 0):.2f} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "measure.json").write_text(json.dumps(results, indent=2))
    (out / "measure.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("figures", "measure"))
    parser.add_argument("--task", default="reviews")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "value_head")
    parser.add_argument("--worker", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.result.write_text(json.dumps(worker(args.worker, args.task, args.rounds, args.seed, args.out)))
        return
    print(figures(args.out) if args.part == "figures" else measure(args))


if __name__ == "__main__":
    main()
