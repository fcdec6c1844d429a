"""Python reward functions in place of a reward model (TRL's PPO accepts only models)."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import PretrainedConfig

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


class RewardError(ValueError):
    """A reward function that cannot be found, is not callable, or returns what cannot be a reward."""


def import_reward(path: str) -> RewardFn:
    """The callable at ``path``, ``package.module:function`` (or ``package.module.function``); a
    :class:`RewardError` says in one line what is wrong. It is called as ``f(prompts, completions)``
    with two lists of strings (not TRL's keyword signature)."""
    module_name, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not name:
        raise RewardError(f"--reward_function {path!r} is neither a named reward nor an import path module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module failing as it runs
        raise RewardError(f"cannot import the reward function {path!r}: {type(exc).__name__}: {exc}") from None
    try:
        fn = getattr(module, name)
    except AttributeError:
        raise RewardError(f"cannot import the reward function {path!r}: {module_name} has no {name!r}") from None
    if not callable(fn):
        raise RewardError(f"the reward function {path!r} is a {type(fn).__name__}, not a callable")
    return fn


def checked_rewards(values, completions: Sequence[str]) -> list[float]:
    """A reward function's return value as one finite float per completion, or a :class:`RewardError`."""
    try:
        rewards = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise RewardError(f"the reward function must return a list of floats, got {type(values).__name__} ({exc})") from None
    if len(rewards) != len(completions):
        raise RewardError(
            f"the reward function returned {len(rewards)} values for {len(completions)} completions; it must "
            "return one float per completion"
        )
    bad = [i for i, r in enumerate(rewards) if not math.isfinite(r)]
    if bad:
        i = bad[0]
        raise RewardError(
            f"the reward function returned {rewards[i]} for completion {i} ({completions[i][:60]!r}) and "
            f"{len(bad) - 1} other(s): rewards must be finite numbers"
        )
    return rewards


def call_reward(fn: RewardFn, prompts: list[str], completions: list[str]) -> list[float]:
    """``fn(prompts, completions)``, checked (:func:`checked_rewards`); a call that does not fit that
    signature is a :class:`RewardError`."""
    try:
        values = fn(prompts, completions)
    except TypeError as exc:
        raise RewardError(f"the reward function cannot be called as f(prompts, completions): {exc}") from None
    return checked_rewards(values, completions)


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
        return torch.tensor(call_reward(self.fn, list(prompts), list(completions)), dtype=torch.float32)


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
