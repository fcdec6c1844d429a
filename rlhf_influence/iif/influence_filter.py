"""InfluenceFilter: score a round's records against the return target and decide what to drop.

The one component every IIF trainer calls (PPO's and GRPO's) and the audit's re-scoring uses,
so the target, the per-record loss, the scores and the drop rule are defined once:

    records, target records -> target gradient -> each record's influence
    -> one decision over all processes' records -> iif/* metrics

Influence of record i is ``<grad f, -grad loss_i>`` at the current weights, from one forward and
one backward per micro-batch (the engine's layer factors). It needs no TRL: processes talk
through :class:`Collectives` (an accelerate ``Accelerator`` or one local process).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..engine.capture import capture_factors
from ..engine.influence import scores_from_factors
from ..engine.lora import LoraLayout
from ..engine.projection import RandomProjector, SketchedProjector
from ..engine.targets import ReturnTarget
from .filtering import FilterDecision, iif_keep_mask, random_keep_mask
from .losses import RecordLoss
from .records import ScoredRecords
from .settings import IIFSettings


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


@dataclass
class Scoring:
    """One scoring of a round's records and the decision taken from it."""

    scores: torch.Tensor  # [N] every process's records, in global order (process-major), float64
    decision: FilterDecision  # over all processes' records
    keep_local: np.ndarray  # bool [n] this process's records
    keep_by_process: torch.Tensor  # bool [world, N]: the decision as each process made it
    seconds: float
    projected: torch.Tensor | None = None  # [n, D'] this process's records' gradients, for the store


def scales_like_token_advantages(loss: RecordLoss) -> bool:
    """Whether a record's loss gradient at ratio 1 is ``-sum_t A_t grad log pi / c`` with one
    constant c for all records: then the buffer target's gradient is the records' own, summed."""
    return loss.scales_like_token_advantages


class InfluenceFilter:
    """Scores records against a return target and drops the most harmful (PAPER.md's rule).

    ``target``: ``heldout_return`` (held-out prompts with fresh samples; one advantage per
    response) or ``buffer_return`` (the round's own records, per-token advantages).
    ``micro_batch_size`` records go through one forward and backward, and sets the loss's
    normaliser. ``seed`` seeds the random-filter control identically on every process.
    """

    def __init__(
        self,
        settings: IIFSettings,
        layout: LoraLayout,
        loss: RecordLoss,
        *,
        target: str,
        micro_batch_size: int,
        temperature: float,
        collectives: Collectives | None = None,
        seed: int = 0,
        store_gradients: bool = False,
    ) -> None:
        self.settings = settings
        self.layout = layout
        self.loss = loss
        self.target = target
        self.micro_batch_size = micro_batch_size
        self.temperature = temperature
        self.collectives = collectives or Collectives()
        self.seed = seed
        self.projector = (
            RandomProjector(settings.iif_projection_dim, seed=settings.iif_projection_seed)
            if settings.iif_projection_dim
            else None
        )
        self.store_projector: RandomProjector | SketchedProjector | None = None
        if store_gradients and settings.iif_store_projection_dim:
            side_dim, projection_seed = settings.iif_store_projection_dim, settings.iif_projection_seed
            self.store_projector = (
                SketchedProjector(settings.iif_store_sketch_dim, side_dim=side_dim, seed=projection_seed)
                if settings.iif_store_sketch_dim
                else RandomProjector(side_dim, seed=projection_seed)
            )
        self.store_dtype = getattr(torch, settings.iif_store_dtype)
        self._scorings = 0

    @property
    def store_folds(self) -> bool:
        """Whether the stored vectors are folded by the sketch (only when longer than it)."""
        projector = self.store_projector
        return isinstance(projector, SketchedProjector) and projector.output_size(
            self.layout
        ) < projector.per_side.output_size(self.layout)

    # ------------------------------------------------------------------ scores
    def score(
        self,
        policy: nn.Module,
        records: ScoredRecords,
        target_records: ScoredRecords,
        *,
        round_start: bool = True,
        keep_gradients: bool = False,
        preconditioner: torch.Tensor | None = None,
    ) -> Scoring:
        """Influence of this process's ``records`` on the target at the current weights, and the
        decision over all processes' records.

        ``round_start``: the weights are those the records were sampled with, where the buffer
        target's gradient is the records' own (one pass, not two). ``keep_gradients``: also keep
        the records' projected gradients for the store. ``preconditioner`` ``[D]``: Adam-aware scores,
        ``<P * grad f, -grad loss_i>`` (:func:`~rlhf_influence.engine.influence.adam_preconditioner`).
        """
        start = time.perf_counter()
        store_projector = self.store_projector if keep_gradients else None
        shortcut = self.target == "buffer_return" and round_start and scales_like_token_advantages(self.loss)
        if shortcut and preconditioner is None:
            local, projected = self.buffer_scores_at_round_start(policy, records, store_projector)
        else:
            target_grad = self.target_gradient(policy, target_records)
            if preconditioner is not None:
                target_grad = target_grad * preconditioner.to(target_grad)
            local, projected = self.record_scores(policy, records, target_grad, store_projector)
        scores = self.collectives.gather(local).cpu().double()
        scoring = self.decide(scores, len(records))
        scoring.projected = projected
        scoring.seconds = time.perf_counter() - start
        return scoring

    def decide(self, scores: torch.Tensor, num_local: int) -> Scoring:
        """The drop decision over all processes' ``scores`` ``[N]`` (equal on every process),
        checked to be the same everywhere; this process's share of it."""
        settings = self.settings
        decision = iif_keep_mask(scores, settings.iif_drop_fraction, settings.iif_min_keep_fraction)
        if settings.iif_filter == "random":  # the control: as many records dropped, at random
            self._scorings += 1
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self._scorings)
            decision = random_keep_mask(decision, generator)
        rank = self.collectives.process_index
        keep_local = decision.keep[rank * num_local : (rank + 1) * num_local].numpy()
        keep_by_process = self.collectives.gather(decision.keep[None]).cpu().bool()
        if not bool((keep_by_process == keep_by_process[:1]).all()):  # same scores, same rule: cannot happen
            raise RuntimeError(
                "processes reached different filtering decisions from the same gathered scores"
            )
        if decision.num_nonfinite:
            warnings.warn(
                f"{decision.num_nonfinite} record(s) got a non-finite influence score; they were kept "
                "out of the ranking (not dropped) and counted in iif/nonfinite_scores",
                stacklevel=3,
            )
        return Scoring(
            scores=scores,
            decision=decision,
            keep_local=keep_local,
            keep_by_process=keep_by_process,
            seconds=0.0,
        )

    def chunks(self, n: int):
        """Micro-batches of record positions, one forward and backward each."""
        return micro_batches(n, self.micro_batch_size)

    def return_target(self, target_records: ScoredRecords, weight: float = 1.0) -> ReturnTarget:
        """The return surrogate on ``target_records``, times ``weight``: per-token advantages in the
        buffer form, each response's own (last-token) advantage in the held-out form."""
        if self.target == "buffer_return":
            advantages = target_records.advantages
        else:
            advantages = target_records.sequence_advantages()
        target = ReturnTarget(
            target_records.input_ids,
            target_records.attention_mask,
            target_records.response_mask,
            advantages * weight,
            temperature=self.temperature,
        )
        target.positions_from_mask = target_records.positions_from_mask
        target.position_offset = target_records.position_offset
        return target

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
        with_value = getattr(self.loss, "with_value", False)
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
        store_projector: RandomProjector | SketchedProjector | None = None,
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
        store_projector: RandomProjector | SketchedProjector | None = None,
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
        store_projector: RandomProjector | SketchedProjector | None = None,
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

    def record(self, policy: nn.Module, records: ScoredRecords) -> Scoring:
        """Record-only (``target='none'``): this process's records' projected gradients for the
        store, from one forward and backward per micro-batch; no score (NaN), nothing dropped."""
        if self.store_projector is None:
            raise ValueError("recording without a store projection (iif_store_projection_dim=0) records nothing")
        start = time.perf_counter()
        projected: list[torch.Tensor] = []
        for _ in self.record_factors(policy, records, self.store_projector, projected):
            pass
        return self.recorded(torch.cat(projected), time.perf_counter() - start)

    def recorded(self, projected: torch.Tensor, seconds: float = 0.0) -> Scoring:
        """The round of a record-only run: this process's records' stored gradients ``[n, D']``, no
        score (NaN), every record kept."""
        total = len(projected) * self.collectives.num_processes
        keep = torch.ones(total, dtype=torch.bool)
        return Scoring(
            scores=torch.full((total,), math.nan, dtype=torch.float64),
            decision=FilterDecision(keep=keep, num_negative=0, num_nonfinite=0),
            keep_local=np.ones(len(projected), dtype=bool),
            keep_by_process=keep[None].repeat(self.collectives.num_processes, 1),
            seconds=seconds,
            projected=projected,
        )

    # ------------------------------------------------------------------ metrics
    @staticmethod
    def metrics(scorings: list[Scoring]) -> dict[str, float]:
        """The round's iif/* metrics, averaged over its scorings (empty without any)."""
        if not scorings:
            return {}
        scores = torch.cat([s.scores for s in scorings])
        finite = scores[torch.isfinite(scores)]
        metrics = {
            "iif/kept_fraction": float(np.mean([s.decision.kept_fraction for s in scorings])),
            "iif/dropped": float(np.mean([s.decision.num_dropped for s in scorings])),
            "iif/score_mean": float(finite.mean()) if len(finite) else math.nan,
            "iif/score_std": float(finite.std()) if len(finite) > 1 else 0.0,
            "iif/fraction_negative": float((finite < 0).double().mean()) if len(finite) else math.nan,
            "iif/nonfinite_scores": float(sum(s.decision.num_nonfinite for s in scorings)),
            "iif/scoring_seconds": float(sum(s.seconds for s in scorings)),
            "iif/scorings": float(len(scorings)),
        }
        if scores.isnan().all() and not metrics["iif/nonfinite_scores"]:  # record only: nothing was scored
            for name in ("iif/score_mean", "iif/score_std", "iif/fraction_negative"):
                del metrics[name]
        return metrics


def micro_batches(n: int, size: int):
    """Positions 0..n-1 in consecutive micro-batches of ``size`` (the last one shorter)."""
    for start in range(0, n, size):
        yield np.arange(start, min(n, start + size))
