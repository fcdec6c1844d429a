"""The embedded default task: sentiment RLHF on a tiny LoRA model, offline, in a few minutes on a CPU.

A word-level tokenizer, a tiny GPT-2 policy and value model built from configs, prompts made
from templates shipped here, and a real reward: the VADER sentiment lexicon
(``vaderSentiment``, which carries its lexicon) scoring each completion in [-1, 1]. The policy
starts from random weights, so its completions are word salad; PPO teaches it to pick the
positive words. Nothing is downloaded.
"""

from __future__ import annotations

from .base import EmbeddedTask, TaskSpec, group_run_settings, prompt_dataset, run_settings
from .rewards import sentiment_reward
from .toy import TOY_WORDS, tiny_causal_lm, tiny_scalar_head_model, toy_lora_config, word_tokenizer

_SUBJECTS = ["the movie", "the film", "this story", "the show", "the ending", "the music", "the plot", "the actor",
             "the actress", "this book", "the scene", "that film", "it", "this show", "the story", "the book"]  # fmt: skip
_FRAMES = ["{s} was", "i thought {s} was", "we watched {s} and it", "{s} felt", "they found {s}", "{s} is",
           "i liked {s} but it", "{s} seemed"]  # fmt: skip
_HELDOUT_FRAMES = ["we saw {s} and it was", "{s} really", "i found {s}"]


def default_prompts() -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): disjoint sentence frames over the same subjects."""
    train = [f.format(s=s) for f in _FRAMES for s in _SUBJECTS]
    heldout = [f.format(s=s) for f in _HELDOUT_FRAMES for s in _SUBJECTS]
    return train, heldout


# The run's PPO settings (PPOConfig fields): what a laptop CPU finishes in about a minute with the
# reward clearly up. The recipe and the benchmarks start from these.
TRAINING = {
    "per_device_train_batch_size": 32,
    "gradient_accumulation_steps": 1,
    "num_mini_batches": 4,
    "num_ppo_epochs": 4,
    "response_length": 8,
    "local_rollout_forward_batch_size": 32,
    "learning_rate": 5e-3,
    "lr_scheduler_type": "constant",
    "temperature": 1.0,
    "kl_coef": 0.02,
    # with --kl_control adaptive: the response KL to hold (PPO's reaches about 0.35 here), and a horizon
    # of 5 rounds' records so that the controller acts within a run (the paper's 10,000 is ~40 of its rounds)
    "kl_target": 0.3,
    "kl_horizon": 160,
    "num_sample_generations": 0,
}
HELDOUT_PROMPTS = 16  # held-out prompts sampled per round for the return target
ROUNDS = 120

# The same task under GRPO (GRPOConfig fields): 8 prompts x 4 completions a step, as many records
# as a PPO round; the held-out target takes 8 prompts x 4 completions.
GRPO_TRAINING = {
    "per_device_train_batch_size": 32,
    "num_generations": 4,
    "max_completion_length": 8,
    "learning_rate": 5e-3,
    "lr_scheduler_type": "constant",
    "temperature": 1.0,
    "beta": 0.0,
    "kl_target": 0.3,  # with --kl_control adaptive (and --beta > 0)
    "kl_horizon": 160,
}
GRPO_HELDOUT_PROMPTS = 8


def build(seed: int = 0, hidden: int = 64, layers: int = 2, value_model: bool = True) -> EmbeddedTask:
    """The default task's models (random weights, seeded), reward and prompt sets; without
    ``value_model`` no separate value model (PPO's shared value head needs none)."""
    tokenizer = word_tokenizer(TOY_WORDS)
    vocab = len(tokenizer)
    train, heldout = default_prompts()
    return EmbeddedTask(
        tokenizer=tokenizer,
        policy=tiny_causal_lm(vocab, hidden=hidden, layers=layers, seed=seed),
        value_model=tiny_scalar_head_model(vocab, hidden=hidden, layers=1, seed=seed + 1) if value_model else None,
        reward=sentiment_reward,
        train_dataset=prompt_dataset(tokenizer, train),
        heldout_dataset=prompt_dataset(tokenizer, heldout),
        lora_config=toy_lora_config("gpt2", r=8),
    )


SPEC = TaskSpec(
    name="sentiment",
    summary="a tiny GPT-2 from random weights, word tokenizer, VADER sentiment reward (about a minute on a CPU)",
    settings={
        "ppo": run_settings("runs/ppo_iif", TRAINING, rounds=ROUNDS, heldout_prompts=HELDOUT_PROMPTS),
        **group_run_settings("runs/{algorithm}_iif", GRPO_TRAINING, ROUNDS, GRPO_HELDOUT_PROMPTS),
    },
    build=build,
)
