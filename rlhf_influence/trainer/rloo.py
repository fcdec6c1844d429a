"""IIFRLOOTrainer: TRL's RLOOTrainer that scores every completion and filters the harmful ones.

The round is :class:`~rlhf_influence.trainer.group.GroupIIFTrainer`'s; RLOO adds its config and
its sequence-level sampling log-prob. A completion's advantage is its reward minus the mean of
its group's other completions' (the leave-one-out baseline), the KL penalty ``beta`` x the
sequence's log-ratio to the reference already in the reward; its loss is the sequence's clipped
ratio (:class:`~rlhf_influence.iif.losses.RLOORecordLoss`). With ``iif_drop_fraction=0`` the weights
after training equal TRL's RLOOTrainer's (tested).
"""

from __future__ import annotations

import torch
from trl import RLOOTrainer

from ..store import TrainingSettings
from .group import GroupIIFTrainer
from .rloo_config import IIFRLOOConfig


class IIFRLOOTrainer(GroupIIFTrainer, RLOOTrainer):
    """RLOO with Iterative Influence-based Filtering, a drop-in for TRL's ``RLOOTrainer``: its
    arguments plus ``target_dataset`` (held-out prompts), as :class:`GroupIIFTrainer` says."""

    algorithm = "rloo"
    config_class = IIFRLOOConfig

    def old_token_logprobs(self, batch: dict, prompt_width: int) -> torch.Tensor:
        """TRL's RLOO keeps a completion's sampling log-prob as its sequence total (``old_logps``):
        it sits on the completion's first token, zeros after, so the response's sum is the total."""
        old = torch.zeros(batch["completion_ids"].shape, dtype=batch["old_logps"].dtype, device=batch["old_logps"].device)
        old[:, 0] = batch["old_logps"]
        return torch.nn.functional.pad(old, (prompt_width, 0))

    def training_settings(self) -> TrainingSettings:
        return self.group_training_settings()
