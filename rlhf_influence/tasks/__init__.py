"""The embedded tasks: runs that need no data, model or reward of the user's, picked by name.

Each task module provides a :class:`TaskSpec` (``SPEC``): a name, its run's settings and a
``build(seed=...)`` that returns an :class:`EmbeddedTask` (tokenizer, policy, value model,
reward, training and held-out prompt sets, LoRA config). Adding a task is one module and one
line in ``TASKS``.

- ``sentiment`` (the default): a tiny GPT-2 from random weights, VADER reward; about a minute.
- ``keywords``: a tiny GPT-2 briefly pre-trained here, rare rewarded colour words.
- ``reviews``: SmolLM2-135M-Instruct, a real pretrained LM, continuing movie-review openings.
"""

from __future__ import annotations

from . import keywords, reviews, sentiment
from .base import EmbeddedTask, TaskSpec, prompt_dataset

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (sentiment.SPEC, keywords.SPEC, reviews.SPEC)}
DEFAULT_TASK = "sentiment"


def get_task(name: str) -> TaskSpec:
    """The task called ``name``; a ValueError lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown embedded task {name!r}; choose one of {sorted(TASKS)}") from None


__all__ = ["DEFAULT_TASK", "TASKS", "EmbeddedTask", "TaskSpec", "get_task", "prompt_dataset"]
