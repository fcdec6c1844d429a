"""RecordScorer: each record's influence on a return target, from one forward and backward per micro-batch.

    records, target records -> target gradient -> each record's influence <grad f, -grad loss_i>

at the current weights, from the engine's layer factors, under one normaliser for all
processes' records (so scores compare across micro-batches and processes). The filter
(:class:`~rlhf_influence.iif.influence_filter.InfluenceFilter`) decides from its scores; the
audit's replay scores with it alone. It needs no TRL: processes talk through :class:`Collectives`
(an accelerate ``Accelerator`` or one local process).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..engine.capture import capture_factors
from ..engine.influence import scores_from_factors
from ..engine.lora import LoraLayout
from ..engine.projection import Projector
from ..engine.targets import ReturnTarget
from .losses import RecordLoss
from .records import ScoredRecords
from .target_kinds import TargetKind


class Collectives:
    """What scoring needs from a distributed run; alone (``accelerator=None``) it is one process."""

    def __init__(self, accelerator=None, device: torch.device | str = "cpu") -> None:
        self.accelerator = accelerator
        self.device = torch.device(accelerator.device if accelerator is not None else device)

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index if self.accelerator is not None else 0

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every process's rows, process-major, on this process's device."""
        local = local.to(self.device)
        return self.accelerator.gather(local) if self.accelerator is not None else local

    def sum(self, local: torch.Tensor) -> torch.Tensor:
        local = local.to(self.device)
        return self.accelerator.reduce(local, reduction="sum") if self.accelerator is not None else local


class RecordScorer:
    """Scores records against a return target of kind ``kind``, built complete here.

    ``micro_batch_size`` records go through one forward and backward and set the loss's
    normaliser; ``projector`` projects the gradients the scores are taken from (None: exact);
    ``store_dtype`` is the precision of the projected gradients kept for the store.
    """

    def __init__(
        self,
        layout: LoraLayout,
        loss: RecordLoss,
        kind: TargetKind,
        *,
        micro_batch_size: int,
        temperature: float,
        collectives: Collectives | None = None,
        projector: Projector | None = None,
        store_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.layout = layout
        self.loss = loss
        self.kind = kind
        self.micro_batch_size = micro_batch_size
        self.temperature = temperature
        self.collectives = collectives or Collectives()
        self.projector = projector
        self.store_dtype = store_dtype

    def scores(
        self,
        policy: nn.Module,
        records: ScoredRecords,
        target_records: ScoredRecords,
        *,
        round_start: bool = True,
        store_projector: Projector | None = None,
        preconditioner: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This process's records' influence ``[n]`` on the target at the current weights, and with
        ``store_projector`` their projected gradients ``[n, D']`` for the store.

        ``round_start``: the weights are those the records were sampled with, where a target kind
        with the round-start shortcut has the records' own gradients as its own (one pass, not two).
        ``preconditioner`` ``[D]``: Adam-aware scores, ``<P * grad f, -grad loss_i>``
        (:func:`~rlhf_influence.engine.influence.adam_preconditioner`).
        """
        shortcut = self.kind.round_start_shortcut and self.loss.scales_like_token_advantages
        if shortcut and round_start and preconditioner is None:
            return self.buffer_scores_at_round_start(policy, records, store_projector)
        target_grad = self.target_gradient(policy, target_records)
        if preconditioner is not None:
            target_grad = target_grad * preconditioner.to(target_grad)
        return self.record_scores(policy, records, target_grad, store_projector)

    def chunks(self, n: int):
        """Micro-batches of record positions, one forward and backward each."""
        return micro_batches(n, self.micro_batch_size)

    def return_target(self, target_records: ScoredRecords, weight: float = 1.0) -> ReturnTarget:
        """The return surrogate on ``target_records``, times ``weight``: per-token advantages in the
        buffer form, each response's own (last-token) advantage in the held-out form."""
        if self.kind.per_token_advantages:
            advantages = target_records.advantages
        else:
            advantages = target_records.sequence_advantages()
        return ReturnTarget(
            target_records.input_ids,
            target_records.attention_mask,
            target_records.response_mask,
            advantages * weight,
            temperature=self.temperature,
            positions_from_mask=target_records.positions_from_mask,
            position_offset=target_records.position_offset,
        )

    def target_gradient(self, policy: nn.Module, target_records: ScoredRecords) -> torch.Tensor:
        """Gradient of the mean return surrogate over all processes' target records, ``[D]``."""
        total = len(target_records) * self.collectives.num_processes
        grad = torch.zeros(self.layout.num_params, device=self.collectives.device)
        for idx in self.chunks(len(target_records)):
            part = target_records.select(idx)
            target = self.return_target(part, weight=len(idx) / total)  # ReturnTarget averages its records
            factors = capture_factors(policy, target, layout=self.layout, per_record=False)
            grad += factors.total_gradient().to(grad)
        return self.collectives.sum(grad)

    def normaliser(self, records: ScoredRecords) -> float:
        """One normaliser for every record (all processes'), so scores compare across micro-batches."""
        with_value = getattr(self.loss, "with_value", False)  # PPO's loss with its value term
        counts = [records.num_tokens().sum()] + ([records.num_value_tokens().sum()] if with_value else [])
        totals = self.collectives.gather(torch.stack(counts).float()[None]).sum(dim=0)
        value_tokens = {"num_value_tokens": float(totals[1])} if with_value else {}
        return self.loss.normaliser(
            float(totals[0]), len(records) * self.collectives.num_processes, self.micro_batch_size, **value_tokens
        )

    def record_factors(
        self,
        policy: nn.Module,
        records: ScoredRecords,
        store_projector: Projector | None = None,
        projected: list[torch.Tensor] | None = None,
        normaliser: float | None = None,
    ):
        """The records' layer factors, one micro-batch at a time, their losses under one
        normaliser (``self.normaliser(records)`` unless given); with ``store_projector`` each
        micro-batch's projected gradients for the store are appended to ``projected``."""
        if normaliser is None:
            normaliser = self.normaliser(records)
        for idx in self.chunks(len(records)):
            part = records.select(idx)
            factors = capture_factors(policy, lambda model, part=part: self.loss(model, part, normaliser),
                                      layout=self.layout)  # fmt: skip
            if store_projector is not None:
                projected.append(factors.gradients(store_projector).to(self.store_dtype).cpu())
            yield factors

    def record_scores(
        self,
        policy: nn.Module,
        records: ScoredRecords,
        target_grad: torch.Tensor,
        store_projector: Projector | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each record's influence ``<grad f, -grad loss_i>`` on the target, ``[n]``; with
        ``store_projector`` also their projected gradients ``[n, D']`` from the same factors."""
        projected: list[torch.Tensor] = []
        scores = [
            scores_from_factors(factors, target_grad[None], self.projector)[:, 0]
            for factors in self.record_factors(policy, records, store_projector, projected)
        ]
        return torch.cat(scores), (torch.cat(projected) if projected else None)

    def buffer_scores_at_round_start(
        self,
        policy: nn.Module,
        records: ScoredRecords,
        store_projector: Projector | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Influence on the buffer target at the round start, from one forward and backward.

        There the ratio is 1 and record i's loss gradient is ``g_i = -sum_t A_t grad log pi / c``,
        while the buffer target is ``f = (1/M) sum_i sum_t A_t log pi``: so ``grad f = -(c/M)
        sum_i g_i`` over all M records of all processes, and the records' own gradients give the
        target's (tested against two passes).
        """
        projected: list[torch.Tensor] = []
        normaliser = self.normaliser(records)  # one gather, shared by the losses and the target
        record_grads = torch.cat(
            [
                factors.gradients(self.projector)
                for factors in self.record_factors(policy, records, store_projector, projected, normaliser)
            ]
        )
        total = self.collectives.sum(record_grads.sum(dim=0))
        target_grad = -(normaliser / (len(records) * self.collectives.num_processes)) * total
        scores = -(record_grads @ target_grad)
        return scores, (torch.cat(projected) if projected else None)


def micro_batches(n: int, size: int):
    """Positions 0..n-1 in consecutive micro-batches of ``size`` (the last one shorter)."""
    for start in range(0, n, size):
        yield np.arange(start, min(n, start + size))
