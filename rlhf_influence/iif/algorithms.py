"""The policy-update algorithms IIF runs under (PPO, GRPO, RLOO): one spec each, found by name.

What differs between them and matters outside their trainer is written here once: how a
record's loss is built from a run's training settings, how the model is given position ids,
whether records come in groups of one prompt's completions, and the replay's plan of optimizer
steps with each chunk's share of the loss. The audit's replay and re-scoring ask the spec; they
never test an algorithm's name. Adding an algorithm is its record loss (``losses.py``), its spec
here, and its trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .losses import RecordLoss, grpo_record_loss, ppo_record_loss, rloo_record_loss
from .records import ScoredRecords
from .training_settings import TrainingSettings

TRAINER_COLUMNS = ("reward", "advantage_mean", "advantage_last", "logprob")  # every algorithm's


@dataclass(frozen=True)
class AlgorithmSpec:
    """One algorithm as the IIF layer and the audit see it."""

    name: str  # as the manifest and checkpoints record it
    title: str  # as messages write it
    grouped: bool  # records are groups of one prompt's completions (GRPO, RLOO), not PPO's rollouts
    positions_from_mask: bool  # TRL's PPO takes position ids from the attention mask; GRPO and RLOO leave them to the model
    build_loss: Callable[[TrainingSettings, float, int], RecordLoss]

    @property
    def record_columns(self) -> tuple[str, ...]:
        """The per-record columns its trainer adds to the store's records table beside the
        attribution ones: the reward, the advantage (mean over the response and at its last token;
        a group's completion has one), the sampling log-prob, and the group where records come in groups."""
        return (*TRAINER_COLUMNS, "group") if self.grouped else TRAINER_COLUMNS

    def record_loss(self, training: TrainingSettings, temperature: float, num_processes: int = 1) -> RecordLoss:
        """A record's loss for a run with these settings (the trainer's, or a stored run's manifest).
        ``num_processes``: the run's, to score as the trainer did; 1 to re-run a round in one process."""
        return self.build_loss(training, temperature, num_processes)

    def replay_steps(
        self, training: TrainingSettings, keep: np.ndarray, rng: np.random.Generator
    ) -> Iterator[list[np.ndarray]]:
        """A round's optimizer steps on the ``keep`` records, each a list of record chunks whose
        losses are summed into it: PPO's epochs of shuffled mini-batches cut into micro-batches, or
        (GRPO, RLOO) TRL's one shuffle of the generation batch cut into ``steps_per_generation``
        slices, passed over ``num_iterations`` times, ``gradient_accumulation_steps`` slices a step."""
        if not self.grouped:
            micro = training.per_device_train_batch_size
            for _ in range(training.num_ppo_epochs):
                order = rng.permutation(keep)
                for start in range(0, len(order), training.mini_batch_size):
                    batch = order[start : start + training.mini_batch_size]
                    yield [batch[i : i + micro] for i in range(0, len(batch), micro)]
            return
        slices = [s for s in np.array_split(rng.permutation(keep), training.steps_per_generation) if len(s)]
        sequence = slices * training.num_iterations
        accumulation = training.gradient_accumulation_steps
        for start in range(0, len(sequence), accumulation):
            yield sequence[start : start + accumulation]

    def chunk_loss(
        self, loss: RecordLoss, policy: nn.Module, chunk: ScoredRecords, chunks_in_step: int, kept_tokens: float
    ) -> torch.Tensor:
        """The trainer's loss on one chunk of a replayed step: PPO's masked mean averaged over the
        step's chunks; GRPO's and RLOO's slice loss with its normaliser (``kept_tokens``: the
        response tokens of every kept record, which dapo divides by)."""
        tokens = float(chunk.num_tokens().sum())
        if not self.grouped:
            return loss(policy, chunk, max(tokens, 1.0)).sum() / chunks_in_step
        normaliser = loss.slice_normaliser(tokens, kept_tokens, len(chunk))
        return loss(policy, chunk, max(normaliser, 1e-9)).sum()


ALGORITHMS: dict[str, AlgorithmSpec] = {
    spec.name: spec
    for spec in (
        AlgorithmSpec("ppo", "PPO", grouped=False, positions_from_mask=True, build_loss=ppo_record_loss),
        AlgorithmSpec("grpo", "GRPO", grouped=True, positions_from_mask=False, build_loss=grpo_record_loss),
        AlgorithmSpec("rloo", "RLOO", grouped=True, positions_from_mask=False, build_loss=rloo_record_loss),
    )
}


def get_algorithm(name: str) -> AlgorithmSpec:
    """The spec of the algorithm ``name`` (ValueError naming the known ones)."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}") from None
