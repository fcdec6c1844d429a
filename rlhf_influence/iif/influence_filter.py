"""InfluenceFilter: score a round's records against the return target and decide what to drop.

The one component every IIF trainer calls (PPO's, GRPO's and RLOO's):

    records, target records -> RecordScorer (each record's influence)
    -> one decision over all processes' records (the drop rule, or the random control)
    -> iif/* metrics

and, for a record-only run, the store's gradients without a score. The scores are the
:class:`~rlhf_influence.iif.scorer.RecordScorer`'s; the decision, the control and the metrics are here.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..engine.lora import LoraLayout
from ..engine.projection import RandomProjector, SketchedProjector, store_projector
from .filtering import FilterDecision, iif_keep_mask, random_keep_mask
from .losses import RecordLoss
from .records import ScoredRecords
from .scorer import Collectives, RecordScorer
from .settings import IIFSettings
from .target_kinds import target_kind


@dataclass
class Scoring:
    """One scoring of a round's records and the decision taken from it."""

    scores: torch.Tensor  # [N] every process's records, in global order (process-major), float64
    decision: FilterDecision  # over all processes' records
    keep_local: np.ndarray  # bool [n] this process's records
    keep_by_process: torch.Tensor  # bool [world, N]: the decision as each process made it
    seconds: float
    projected: torch.Tensor | None = None  # [n, D'] this process's records' gradients, for the store


class InfluenceFilter:
    """Scores records against a return target and drops the most harmful (PAPER.md's rule).

    ``target``: an ``iif_target`` kind (:mod:`~rlhf_influence.iif.target_kinds`).
    ``micro_batch_size`` records go through one forward and backward, and sets the loss's
    normaliser. ``seed`` seeds the random-filter control identically on every process.
    ``store_gradients``: keep each record's projected gradient for the store.
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
        self.target = target
        self.seed = seed
        self.store_projector: RandomProjector | SketchedProjector | None = (
            store_projector(settings.iif_store_projection_dim, settings.iif_store_sketch_dim, settings.iif_projection_seed)
            if store_gradients and settings.iif_store_projection_dim
            else None
        )
        self.store_dtype = getattr(torch, settings.iif_store_dtype)
        self.scorer = RecordScorer(
            layout,
            loss,
            target_kind(target),
            micro_batch_size=micro_batch_size,
            temperature=temperature,
            collectives=collectives,
            projector=(
                RandomProjector(settings.iif_projection_dim, seed=settings.iif_projection_seed)
                if settings.iif_projection_dim
                else None
            ),
            store_dtype=self.store_dtype,
        )
        self.collectives = self.scorer.collectives
        self._scorings = 0

    @property
    def layout(self) -> LoraLayout:
        return self.scorer.layout

    @property
    def loss(self) -> RecordLoss:
        return self.scorer.loss

    def normaliser(self, records: ScoredRecords) -> float:
        """The records' loss normaliser (all processes'), as the scores use it."""
        return self.scorer.normaliser(records)

    @property
    def store_folds(self) -> bool:
        """Whether the stored vectors are folded by the sketch (only when longer than it)."""
        projector = self.store_projector
        return isinstance(projector, SketchedProjector) and projector.output_size(
            self.layout
        ) < projector.per_side.output_size(self.layout)

    # ------------------------------------------------------------------ scores and the decision
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
        """Influence of this process's ``records`` on the target at the current weights
        (:meth:`RecordScorer.scores`), and the decision over all processes' records.
        ``keep_gradients``: also keep the records' projected gradients for the store."""
        start = time.perf_counter()
        local, projected = self.scorer.scores(
            policy, records, target_records, round_start=round_start,
            store_projector=self.store_projector if keep_gradients else None, preconditioner=preconditioner,
        )  # fmt: skip
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

    def record(self, policy: nn.Module, records: ScoredRecords) -> Scoring:
        """Record-only (``target='none'``): this process's records' projected gradients for the
        store, from one forward and backward per micro-batch; no score (NaN), nothing dropped."""
        if self.store_projector is None:
            raise ValueError("recording without a store projection (iif_store_projection_dim=0) records nothing")
        start = time.perf_counter()
        projected: list[torch.Tensor] = []
        for _ in self.scorer.record_factors(policy, records, self.store_projector, projected):
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
