"""The IIF drop rule, decided once over all processes' records, and the epoch's micro-batch plan."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class FilterDecision:
    """Which records of the round (all processes, in global order) take part in the next epoch."""

    keep: torch.Tensor  # bool [N]
    num_negative: int
    num_nonfinite: int

    @property
    def num_records(self) -> int:
        return int(self.keep.numel())

    @property
    def num_dropped(self) -> int:
        return self.num_records - int(self.keep.sum())

    @property
    def kept_fraction(self) -> float:
        return float(self.keep.float().mean())


def iif_keep_mask(scores: torch.Tensor, drop_fraction: float, min_keep_fraction: float) -> FilterDecision:
    """Drop the floor(p * N-) records with the most negative influence (N- = records scoring < 0).

    At least ceil(min_keep_fraction * N) records are kept. Non-finite scores take no part in the
    ranking: those records are kept and counted. Ties are broken by position, so every process
    given the same scores makes the same decision.
    """
    scores = scores.detach().double().cpu()
    n = scores.numel()
    finite = torch.isfinite(scores)
    negative = finite & (scores < 0)
    num_negative = int(negative.sum())
    num_drop = math.floor(drop_fraction * num_negative)
    num_drop = max(0, min(num_drop, n - math.ceil(min_keep_fraction * n)))
    keep = torch.ones(n, dtype=torch.bool)
    if num_drop:
        ranked = torch.where(negative, scores, torch.inf)
        order = torch.argsort(ranked, stable=True)  # most negative first, ties by position
        keep[order[:num_drop]] = False
    return FilterDecision(keep=keep, num_negative=num_negative, num_nonfinite=int((~finite).sum()))


def plan_epoch(
    kept_order: np.ndarray,
    max_kept_per_process: int,
    *,
    local_mini_batch_size: int,
    per_device_batch_size: int,
    gradient_accumulation_steps: int,
    num_mini_batches: int,
    keep_steps: bool = False,
) -> list[list[np.ndarray]]:
    """Split this process's kept records (already shuffled) into mini-batches of micro-batches.

    PPO's layout is kept: mini-batches of ``local_mini_batch_size`` records, each cut into
    micro-batches of at most ``per_device_batch_size``; with nothing filtered the split is
    exactly PPO's. Filtering shrinks the number of mini-batches to what the process with the
    most kept records needs, so every process runs the same number of micro-batches
    (collectives stay in step), and keeps that number a multiple of
    ``gradient_accumulation_steps`` where PPO's own is, so an epoch never leaves half an
    accumulated gradient for the next. Records are spread evenly over the micro-batches; a
    process with fewer kept records than micro-batches gets empty ones (run as zero-weight
    steps by the trainer).

    ``keep_steps``: keep PPO's number of mini-batches (optimizer steps) instead, so dropped
    records make the mini-batches smaller, not fewer; where fewer records are kept than PPO has
    mini-batches, one mini-batch per kept record (of the process with the most).
    """
    micro_per_mini = math.ceil(local_mini_batch_size / per_device_batch_size)
    if (
        keep_steps
    ):  # never a mini-batch with no record on every process: that step would move on momentum alone
        num_mini = min(num_mini_batches, max(1, max_kept_per_process))
    else:
        num_mini = min(num_mini_batches, max(1, math.ceil(max_kept_per_process / local_mini_batch_size)))
    while (num_mini * micro_per_mini) % gradient_accumulation_steps and num_mini < num_mini_batches:
        num_mini += 1
    plan = []
    for mini in np.array_split(np.asarray(kept_order, dtype=np.int64), num_mini):
        if len(mini) == local_mini_batch_size:  # a full mini-batch: PPO's own contiguous cut
            micro = [mini[s : s + per_device_batch_size] for s in range(0, len(mini), per_device_batch_size)]
        else:
            micro = np.array_split(mini, micro_per_mini)
        plan.append(micro)
    return plan


def random_keep_mask(decision: FilterDecision, generator: torch.Generator) -> FilterDecision:
    """A control: drop as many records as ``decision`` does, chosen uniformly at random.

    The same generator state on every process gives the same choice everywhere.
    """
    n = decision.num_records
    keep = torch.ones(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=generator)[: decision.num_dropped]] = False
    return FilterDecision(keep=keep, num_negative=decision.num_negative, num_nonfinite=decision.num_nonfinite)
