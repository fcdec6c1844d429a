"""Each record's training loss at a snapshot, as the trainer optimises it: PPO's, GRPO's and RLOO's.

Influence ranks records by the gradient of their own share of the training loss, so the loss is
written once here and used by the trainers' scoring and by the audit's replay of a round. A
record loss is called as ``loss(model, records, normaliser) -> Tensor[n]`` and names the
``normaliser`` that makes the records' losses sum to (the expectation of) the trainer's loss
over one micro-batch; one normaliser for all records keeps their scores comparable across
micro-batches and processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from torch import nn

from ..engine.targets import (
    clipped_policy_loss,
    clipped_value_loss,
    ppo_policy_loss,
    token_logprobs,
    token_logprobs_and_hidden,
)
from .records import ScoredRecords
from .training_settings import TrainingSettings

# GRPO loss types whose per-record loss is written here (TRL 1.12's names).
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


class RecordLoss(Protocol):
    """A trainer's per-record loss at the current weights."""

    def __call__(self, model: nn.Module, records: ScoredRecords, normaliser: float) -> torch.Tensor: ...

    def normaliser(self, num_tokens: float, num_records: int, micro_batch_size: int) -> float:
        """From all processes' records: ``num_tokens`` response tokens over ``num_records``."""
        ...

    @property
    def scales_like_token_advantages(self) -> bool:
        """Whether a record's loss gradient at ratio 1 is ``-sum_t A_t grad log pi / c`` with one
        constant c for all records: then the buffer target's gradient is the records' own, summed."""
        ...


class PolicyAndValueNormaliser(NamedTuple):
    """What PPO divides a micro-batch's summed policy and value losses by (each a masked mean)."""

    policy: float
    value: float


@dataclass(frozen=True)
class PPORecordLoss:
    """TRL PPO's clipped policy loss of each record, and with ``value_head`` (a value head on the
    policy's own backbone) plus ``value_coef`` x its clipped value loss, as PPO optimises them.

    TRL takes a masked mean over each micro-batch's response tokens (the value loss over the
    response and one position past it); the normaliser is its expectation, the mean number of
    such positions per record times the micro-batch size. With a separate value model the value
    loss does not reach the policy's weights: the policy loss is the record's whole loss there.
    """

    clip_range: float
    temperature: float
    value_coef: float = 0.0
    clip_range_value: float = 0.2
    value_head: nn.Module | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.value_head is None and self.value_coef:
            raise ValueError("a value term in the record loss needs the value head it reads")

    @property
    def with_value(self) -> bool:
        """Whether each record's loss includes its value loss."""
        return self.value_head is not None

    @property
    def scales_like_token_advantages(self) -> bool:
        return not self.with_value

    def __call__(
        self, model: nn.Module, records: ScoredRecords, normaliser: float | PolicyAndValueNormaliser
    ) -> torch.Tensor:
        if not self.with_value:
            return ppo_policy_loss(
                model,
                records.input_ids,
                records.attention_mask,
                records.response_mask,
                records.advantages,
                old_logprobs=records.old_logprobs,
                clip_range=self.clip_range,
                normaliser=normaliser,
                temperature=self.temperature,
            )
        if not isinstance(normaliser, PolicyAndValueNormaliser) or records.value_mask is None:
            raise ValueError("a record loss with its value term needs the records' value targets and both normalisers")
        logp, hidden = token_logprobs_and_hidden(model, records.input_ids, records.attention_mask, self.temperature)
        policy = clipped_policy_loss(
            logp, records.response_mask, records.advantages, records.old_logprobs, self.clip_range, normaliser.policy
        )
        values = self.value_head(hidden).squeeze(-1)
        value = clipped_value_loss(
            values, records.old_values, records.returns, records.value_mask, self.clip_range_value, normaliser.value
        )
        return policy + self.value_coef * value

    def normaliser(
        self, num_tokens: float, num_records: int, micro_batch_size: int, num_value_tokens: float | None = None
    ) -> float | PolicyAndValueNormaliser:
        """``num_value_tokens`` (all processes' value-loss positions) is needed with the value term."""
        policy = num_tokens / num_records * micro_batch_size
        if not self.with_value:
            return policy
        if num_value_tokens is None:
            raise ValueError("the value term's normaliser needs the records' value-loss positions")
        return PolicyAndValueNormaliser(policy, num_value_tokens / num_records * micro_batch_size)


def records_token_logprobs(model: nn.Module, records: ScoredRecords, temperature: float) -> torch.Tensor:
    """``[n, T]`` log-probs of the records' tokens under ``model``, with their position convention."""
    return token_logprobs(
        model,
        records.input_ids,
        records.attention_mask,
        temperature,
        positions_from_mask=records.positions_from_mask,
        position_offset=records.position_offset,
    )


@dataclass(frozen=True)
class GRPORecordLoss:
    """TRL 1.12 GRPO's policy loss of each completion, for the loss types in ``GRPO_LOSS_TYPES``.

    Per token ``-min(r A, clip(r, 1-eps_low, 1+eps_high) A) + beta * KL_t`` with
    ``KL_t = exp(ref - logp) - (ref - logp) - 1`` (times r with the bias correction). A record's
    loss sums its tokens and divides as its loss type does: ``grpo`` by the completion's own
    length and the micro-batch's size, ``bnpo`` by the micro-batch's tokens, ``dr_grpo`` by the
    micro-batch's size times ``max_completion_length``, ``dapo`` by the generation batch's tokens
    per process times ``gradient_accumulation_steps / steps_per_generation`` (the others by the
    accumulation steps).
    """

    loss_type: str
    epsilon_low: float
    epsilon_high: float
    beta: float
    temperature: float
    gradient_accumulation_steps: int
    steps_per_generation: int
    num_processes: int
    max_completion_length: int
    delta: float | None = None
    bias_correction_kl: bool = True

    def __post_init__(self) -> None:
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"IIF scores GRPO loss types {GRPO_LOSS_TYPES}, not {self.loss_type!r}")

    @property
    def scales_like_token_advantages(self) -> bool:
        return self.loss_type != "grpo" and self.beta == 0.0

    def __call__(self, model: nn.Module, records: ScoredRecords, normaliser: float) -> torch.Tensor:
        logp = records_token_logprobs(model, records, self.temperature)
        old = logp.detach() if records.old_logprobs is None else records.old_logprobs.to(logp.dtype)
        mask = records.response_mask.to(logp.dtype)
        ratio = torch.exp((logp - old) * mask)
        clipped = ratio.clamp(1 - self.epsilon_low, 1 + self.epsilon_high)
        capped = ratio if self.delta is None else ratio.clamp(max=self.delta)  # TRL's two-sided clip
        advantages = records.advantages.to(logp.dtype)
        per_token = -torch.minimum(capped * advantages, clipped * advantages)
        if self.beta != 0.0:
            if records.ref_logprobs is None:
                raise ValueError("GRPO with beta > 0 needs the records' reference log-probs")
            gap = (records.ref_logprobs.to(logp.dtype) - logp) * mask
            kl = torch.exp(gap) - gap - 1
            if self.bias_correction_kl:  # by the ratio before delta's cap, as TRL
                kl = kl * ratio
            per_token = per_token + self.beta * kl
        summed = (per_token * mask).sum(dim=1)
        if self.loss_type == "grpo":
            summed = summed / mask.sum(dim=1).clamp(min=1.0)
        return summed / normaliser

    def slice_normaliser(self, slice_tokens: float, batch_tokens: float, rows: int) -> float:
        """What TRL divides one slice's summed loss by: ``dapo`` counts the tokens of the batch its
        step accumulates (``num_items_in_batch``), the others the slice's own; ``rows`` counts padding."""
        return self.normaliser(batch_tokens if self.loss_type == "dapo" else slice_tokens, rows, rows)

    def normaliser(self, num_tokens: float, num_records: int, micro_batch_size: int) -> float:
        accumulation = self.gradient_accumulation_steps
        if self.loss_type == "grpo":
            return float(micro_batch_size * accumulation)
        if self.loss_type == "bnpo":
            return num_tokens / num_records * micro_batch_size * accumulation
        if self.loss_type == "dr_grpo":
            return float(micro_batch_size * self.max_completion_length * accumulation)
        return num_tokens / self.num_processes * accumulation / self.steps_per_generation  # dapo


@dataclass(frozen=True)
class RLOORecordLoss:
    """TRL 1.12 RLOO's policy loss of each completion: the sequence's clipped ratio,
    ``-min(r A, clip(r, 1-eps_low, 1+eps_high) A)`` with ``r = exp(log pi(y|x) - log pi_old(y|x))``
    (log-probs summed over the completion's tokens), divided by the micro-batch's size times
    ``gradient_accumulation_steps`` (TRL averages over the slice; the Trainer divides by the
    accumulation). The KL penalty is in the reward, so in the advantage: no KL term here.
    A completion's old log-prob is a sequence total: :class:`ScoredRecords` keeps it on its
    first response token (``old_logprobs`` summed over the response is the total).
    """

    epsilon_low: float
    epsilon_high: float
    temperature: float
    gradient_accumulation_steps: int

    scales_like_token_advantages = True  # at ratio 1 the gradient is -A sum_t grad log pi_t / c

    def __call__(self, model: nn.Module, records: ScoredRecords, normaliser: float) -> torch.Tensor:
        logp = records_token_logprobs(model, records, self.temperature)
        mask = records.response_mask.to(logp.dtype)
        sequence = (logp * mask).sum(dim=1)
        old = sequence.detach() if records.old_logprobs is None else (records.old_logprobs.to(logp.dtype) * mask).sum(1)
        ratio = torch.exp(sequence - old)
        advantage = records.sequence_advantages().to(logp.dtype)
        clipped = ratio.clamp(1 - self.epsilon_low, 1 + self.epsilon_high)
        return -torch.minimum(ratio * advantage, clipped * advantage) / normaliser

    def slice_normaliser(self, slice_tokens: float, batch_tokens: float, rows: int) -> float:
        """What one slice's summed loss is divided by: its rows (padding included) times the accumulation."""
        return self.normaliser(slice_tokens, rows, rows)

    def normaliser(self, num_tokens: float, num_records: int, micro_batch_size: int) -> float:
        return float(micro_batch_size * self.gradient_accumulation_steps)


def ppo_record_loss(training: TrainingSettings, temperature: float, num_processes: int = 1) -> PPORecordLoss:
    """PPO's per-record loss from a run's training settings (the value term is added by the trainer,
    which holds the value head)."""
    return PPORecordLoss(clip_range=training.cliprange, temperature=temperature)


def rloo_record_loss(training: TrainingSettings, temperature: float, num_processes: int = 1) -> RLOORecordLoss:
    """RLOO's per-record loss from a run's training settings."""
    return RLOORecordLoss(
        epsilon_low=training.epsilon_low,
        epsilon_high=training.epsilon_high,
        temperature=temperature,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
    )


def grpo_record_loss(training: TrainingSettings, temperature: float, num_processes: int = 1) -> GRPORecordLoss:
    """GRPO's per-record loss from a run's training settings. ``num_processes``: the run's, to score
    as the trainer does (dapo's normaliser is per process); 1 to re-run a stored round in one process."""
    return GRPORecordLoss(
        loss_type=training.loss_type,
        epsilon_low=training.epsilon_low,
        epsilon_high=training.epsilon_high,
        beta=training.beta,
        temperature=temperature,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        steps_per_generation=training.steps_per_generation,
        num_processes=num_processes,
        max_completion_length=training.max_completion_length,
        delta=training.delta,
        bias_correction_kl=True if training.bias_correction_kl is None else training.bias_correction_kl,
    )
