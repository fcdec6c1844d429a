"""Tiny PPO set-ups (offline, seconds) shared by the trainer tests."""

from __future__ import annotations

import copy

import numpy as np
import torch
from datasets import Dataset
from peft import get_peft_model

from rlhf_influence.tasks.toy import (
    TOY_WORDS,
    tiny_causal_lm,
    tiny_scalar_head_model,
    toy_lora_config,
    word_tokenizer,
)

PROMPTS = [
    "the movie was", "i thought the film", "this story is", "we watched the show and", "the ending felt",
    "it was", "the music is", "they found the plot", "the actor seemed", "a book that",
    "i liked the scene", "we saw it and", "the show felt", "this film was", "the story seemed", "that was",
]  # fmt: skip
POSITIVE = {"great", "good", "fun", "lovely", "wonderful", "brilliant", "funny", "bright", "liked", "loved"}


def count_positive(prompts: list[str], completions: list[str]) -> list[float]:
    return [float(sum(w in POSITIVE for w in c.split())) for c in completions]


def prompt_dataset(tokenizer, prompts=PROMPTS) -> Dataset:
    return Dataset.from_dict(
        {"input_ids": [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]}
    )


class Setup:
    """Fresh, identical models for one run (same seeds give the same weights)."""

    def __init__(self, seed: int = 0, hidden: int = 32):
        self.tokenizer = word_tokenizer(TOY_WORDS)
        vocab = len(self.tokenizer)
        self.policy = tiny_causal_lm(vocab, hidden=hidden, layers=2, seed=seed)
        self.value = tiny_scalar_head_model(vocab, hidden=hidden, layers=1, seed=seed + 1)
        self.reward = tiny_scalar_head_model(vocab, hidden=hidden, layers=1, seed=seed + 2)
        self.lora = toy_lora_config("gpt2", r=4)
        self.train = prompt_dataset(self.tokenizer)
        self.heldout = prompt_dataset(self.tokenizer, PROMPTS[::-1])

    def peft_policy(self):
        return get_peft_model(copy.deepcopy(self.policy), self.lora)


def ppo_kwargs(tmp_path, **overrides) -> dict:
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_mini_batches=2,
        total_episodes=16,  # 2 rounds of 8 records
        num_ppo_epochs=2,
        response_length=6,
        local_rollout_forward_batch_size=8,
        stop_token="eos",
        missing_eos_penalty=1.0,
        num_sample_generations=0,
        learning_rate=3e-3,
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=7,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )
    kwargs.update(overrides)
    return kwargs


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def train_ppo(out, trainer_class=None, heldout: bool = True, **overrides):
    """A tiny IIF-PPO run (``trainer_class``: a subclass of IIFPPOTrainer) trained to the end, from seed 0."""
    from rlhf_influence import IIFPPOConfig, IIFPPOTrainer

    setup = Setup()
    trainer = (trainer_class or IIFPPOTrainer)(
        args=IIFPPOConfig(**ppo_kwargs(out, **overrides)), processing_class=setup.tokenizer, model=setup.peft_policy(),
        ref_model=None, reward_model=setup.reward, train_dataset=setup.train, value_model=setup.value,
        target_dataset=setup.heldout if heldout else None,
    )  # fmt: skip
    seed_everything(0)
    trainer.train()
    return trainer
