"""The embedded tasks: runs that need no data, model or reward of the user's, picked by name.

Each module of this package that defines ``SPEC`` (a :class:`TaskSpec`: a name, its run's
settings and ``build(seed=..., value_model=True)`` returning an :class:`EmbeddedTask`: tokenizer,
policy, value model (None with ``value_model=False``), reward, training and held-out prompt sets,
LoRA config) is a task; adding a task is
adding one module. The recipe's ``--embedded_task``, the benchmarks and the tests pick them by name.

- ``sentiment`` (the default): a tiny GPT-2 from random weights, VADER reward; about a minute.
- ``keywords``: a tiny GPT-2 briefly pre-trained here, rare rewarded colour words.
- ``reviews``: SmolLM2-135M-Instruct, a real pretrained LM, continuing movie-review openings.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import EmbeddedTask, TaskSpec, prompt_dataset

DEFAULT_TASK = "sentiment"


def _discover() -> dict[str, TaskSpec]:
    found: dict[str, TaskSpec] = {}
    for info in pkgutil.iter_modules(__path__):
        spec = getattr(importlib.import_module(f"{__name__}.{info.name}"), "SPEC", None)
        if isinstance(spec, TaskSpec):
            if spec.name in found:
                raise RuntimeError(f"two embedded tasks are called {spec.name!r}")
            found[spec.name] = spec
    return dict(sorted(found.items(), key=lambda item: (item[0] != DEFAULT_TASK, item[0])))


TASKS: dict[str, TaskSpec] = _discover()


def get_task(name: str) -> TaskSpec:
    """The task called ``name``; a ValueError lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown embedded task {name!r}; choose one of {sorted(TASKS)}") from None


__all__ = ["DEFAULT_TASK", "TASKS", "EmbeddedTask", "TaskSpec", "get_task", "prompt_dataset"]
