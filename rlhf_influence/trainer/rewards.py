"""Python reward functions in place of a reward model (TRL's PPO accepts only models)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import PretrainedConfig

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


class RewardFunction(nn.Module):
    """Wraps ``f(prompts, completions) -> list[float]`` so it stands where a reward model goes.

    It carries a config and one frozen placeholder parameter only so that the trainer's
    set-up (device placement, DeepSpeed preparation) treats it like a model; the rollout calls
    the function on decoded text.
    """

    def __init__(self, fn: RewardFn) -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(f"reward function must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.config = PretrainedConfig()
        self.placeholder = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        values = self.fn(list(prompts), list(completions))
        scores = torch.as_tensor(list(values), dtype=torch.float32)
        if scores.shape != (len(completions),):
            raise ValueError(
                f"the reward function returned {tuple(scores.shape)} values for {len(completions)} completions; "
                "it must return one float per completion"
            )
        return scores


def as_reward_module(reward: nn.Module | RewardFn) -> nn.Module:
    """A reward model is used as is; a plain callable is wrapped in :class:`RewardFunction`."""
    if isinstance(reward, nn.Module):
        return reward
    if callable(reward):
        return RewardFunction(reward)
    raise TypeError(
        "reward_model must be a sequence-classification model (as in TRL) or a callable "
        f"f(prompts, completions) -> list[float]; got {type(reward).__name__}"
    )
