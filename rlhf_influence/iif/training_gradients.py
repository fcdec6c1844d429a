"""TrainingGradients: each record's stored gradient, taken from the optimisation's own backward.

No pass of its own: hooks on the LoRA layers (:class:`~rlhf_influence.engine.capture.TrainingCapture`)
keep each micro-batch's factors, and after its backward each record's gradient is projected for the
store on the scorer's normaliser, so it compares with a round-start scoring pass's. Used by record-only
runs (``iif_store_gradients='training'``) and by the in-step filter (:mod:`~rlhf_influence.iif.in_step`).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager

import numpy as np
import torch

from ..engine.capture import RecordFactors, TrainingCapture
from .influence_filter import InfluenceFilter


class TrainingGradients:
    """A round's per-record stored gradients collected from the optimisation's own backward: each
    record's, the first time it is trained on, on the scoring's normaliser (so they compare with the
    round-start pass's)."""

    def __init__(self, filter_: InfluenceFilter, num_records: int, normaliser: float) -> None:
        self.capture = TrainingCapture(filter_.layout)
        self.projector = filter_.store_projector
        self.dtype = filter_.store_dtype
        self.normaliser = normaliser
        self.rows: list[torch.Tensor | None] = [None] * num_records
        self.seconds = 0.0

    def recording(self, records: np.ndarray) -> AbstractContextManager:
        """Around one micro-batch's forward and backward over the local ``records``."""
        return self.capture.recording(len(records))

    def collect(self, records: np.ndarray, loss_divisor: float, accumulation_divisor: float = 1.0) -> None:
        """After the micro-batch's backward over the local ``records`` (``-1`` marks a padding row),
        whose loss was divided by ``loss_divisor`` (e.g. PPO's masked mean: the micro-batch's tokens)
        and by ``accumulation_divisor`` (accelerate's gradient accumulation)."""
        start = time.perf_counter()
        factors = self.capture.factors()  # each record's gradient of the loss as it was backpropagated
        self.capture.clear()
        self.keep(records, factors, loss_divisor * accumulation_divisor)
        self.seconds += time.perf_counter() - start

    def keep(self, records: np.ndarray, factors: RecordFactors, divisor: float) -> None:
        """Keep the projected gradients of the records not yet kept, put back on the scorer's
        normaliser (their loss was divided by ``divisor``)."""
        projected = (factors.gradients(self.projector) * (divisor / self.normaliser)).to(self.dtype).cpu()
        for row, record in zip(projected, records, strict=True):
            if record >= 0 and self.rows[int(record)] is None:  # -1: a padding row
                self.rows[int(record)] = row

    @property
    def complete(self) -> bool:
        """Whether every record has been trained on (and its gradient kept)."""
        return all(row is not None for row in self.rows)

    def projected(self) -> torch.Tensor:
        """``[n, D']`` in the records' order; every record must have been trained on."""
        missing = [i for i, row in enumerate(self.rows) if row is None]
        if missing:
            raise RuntimeError(f"records {missing[:5]} were not trained on in the round's first epoch")
        return torch.stack(self.rows)
