"""The default task with known label noise: the sign of 20% of the records' rewards flipped.

The same tiny GPT-2, prompts and settings as ``sentiment``; the reward is VADER's with its
sign flipped for the records :func:`~rlhf_influence.tasks.rewards.is_flipped` picks (a hash
of prompt and completion, so the choice is the same in every round and can be recomputed from
the store). It asks whether influence-based filtering drops the corrupted records more often
than chance, and what that does to the clean reward (benchmarks/iif_vs_ppo.py).
"""

from __future__ import annotations

from . import sentiment
from .base import EmbeddedTask, TaskSpec, group_run_settings, run_settings
from .rewards import sentiment_reward, sign_flipped

FLIP_FRACTION = 0.2
SALT = "noisy_sentiment"


def noisy_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """VADER sentiment with the sign of FLIP_FRACTION of the records' rewards flipped."""
    return sign_flipped(sentiment_reward, FLIP_FRACTION, SALT)(prompts, completions)


def build(seed: int = 0, value_model: bool = True) -> EmbeddedTask:
    task = sentiment.build(seed=seed, value_model=value_model)
    task.reward = noisy_reward
    return task


SPEC = TaskSpec(
    name="noisy_sentiment",
    summary="the default task with the sign of 20% of the rewards flipped (known label noise)",
    settings={
        "ppo": run_settings(
            "runs/ppo_iif_noisy",
            sentiment.TRAINING,
            rounds=sentiment.ROUNDS,
            heldout_prompts=sentiment.HELDOUT_PROMPTS,
        ),
        **group_run_settings(
            "runs/{algorithm}_iif_noisy", sentiment.GRPO_TRAINING, sentiment.ROUNDS, sentiment.GRPO_HELDOUT_PROMPTS
        ),
    },
    build=build,
)
