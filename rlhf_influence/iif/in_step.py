"""IIF inside the optimizer step (``iif_schedule='step'``): the round's filter without its scoring pass.

The round schedule scores every record in a forward and backward of its own before the update,
then trains on the kept ones. Where a round is one optimizer step at the weights that sampled it
(GRPO and RLOO with ``steps_per_generation == gradient_accumulation_steps``), the training's own
backward over all records already holds what that pass computes:

    train on every record, hooks keep each one's exact gradient (its share of ``.grad``)
    -> each record's influence on the target -> the drop decision over all processes' records
    -> before clipping and the optimizer step: the dropped records' shares taken out of ``.grad``,
       the kept ones' put on the normaliser their own slices would have had

which is the round schedule's gradient (so its update), one pass cheaper. Under bf16 autocast the
shares are recomputed in float32 from the layers' bf16 inputs and output gradients while autograd's
weight gradients come from bf16 products: the subtraction is then exact to bf16 rounding. Each record's share
costs ``D`` floats (the LoRA weights' count) on the device until the step. No TRL here: the
trainer says which records a micro-step held and what its loss was divided by.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..engine.capture import RecordFactors
from ..engine.lora import LoraLayout
from .influence_filter import InfluenceFilter, Scoring
from .training_gradients import TrainingGradients


class InStepRound(TrainingGradients):
    """One round of the in-step filter: the records' shares of the step's gradient, their scores,
    the decision and the correction that turns the step's gradient into the kept records' one; the
    store's vectors as any gradients taken in training (:class:`TrainingGradients`).

    ``normaliser``: the scorer's (all processes' records, :meth:`InfluenceFilter.normaliser`), so
    the scores equal the round schedule's. ``target_gradient`` ``[D]``: the target's gradient at the
    round start (preconditioned for Adam-aware scores), or None for a target whose gradient the
    records' own give there (the buffer target: ``grad f = -(c/M) sum_i g_i``).
    ``preconditioner`` ``[D]`` applies to that derived target only.
    """

    def __init__(
        self,
        filter_: InfluenceFilter,
        num_records: int,
        normaliser: float,
        target_gradient: torch.Tensor | None,
        preconditioner: torch.Tensor | None = None,
    ) -> None:
        super().__init__(filter_, num_records, normaliser)
        self.filter = filter_
        self.target_gradient = target_gradient
        self.preconditioner = preconditioner
        self.shares = torch.zeros(num_records, filter_.layout.num_params, device=filter_.collectives.device)
        self.collected = np.zeros(num_records, dtype=bool)  # [n] whose share is in ``shares`` (each record's .grad part)
        self.divisors = np.zeros(num_records)  # what each record's slice loss was divided by

    def keep(self, records: np.ndarray, factors: RecordFactors, divisor: float) -> None:
        """Each record's share of the gradient (its slice loss divided by ``divisor``) and, where the
        run stores gradients, its projected one."""
        real = np.flatnonzero(records >= 0)
        rows = records[real]
        if self.collected[rows].any():
            raise RuntimeError(f"records {rows[self.collected[rows]][:5]} were trained on twice before the in-step decision")
        shares = factors.gradients(None)
        self.shares[torch.as_tensor(rows, device=self.shares.device)] = shares[torch.as_tensor(real, device=shares.device)].to(self.shares)
        self.collected[rows], self.divisors[rows] = True, divisor
        if self.projector is not None:
            super().keep(records, factors, divisor)

    @property
    def complete(self) -> bool:
        """Whether every local record has been trained on (the step's gradient is whole)."""
        return bool(self.collected.all())

    def scoring(self) -> Scoring:
        """Every record's influence on the target, from its share of the gradient, and the decision
        over all processes' records (the filter's rule, random control included)."""
        start = time.perf_counter()
        filter_ = self.filter
        collectives = filter_.collectives
        shares = self.shares
        # record i's loss gradient on the scorer's normaliser is its share times scale_i
        scale = torch.as_tensor(self.divisors / self.normaliser, dtype=shares.dtype, device=shares.device)
        target = self.target_gradient
        if target is None:  # the buffer target at the round start: from the records' own gradients
            total = len(shares) * collectives.num_processes
            target = -(self.normaliser / total) * collectives.sum(scale @ shares).to(shares)
            if self.preconditioner is not None:
                target = target * self.preconditioner.to(target)
        target = target.to(shares)
        projector = filter_.scorer.projector
        if projector is not None:  # the scoring projection, as the round schedule scores
            layout = filter_.layout
            projected_target = projector.project(layout, target[None])[0]
            local = -(projector.project(layout, shares) @ projected_target) * scale
        else:
            local = -(shares @ target) * scale
        scoring = filter_.decide(collectives.gather(local).cpu().double(), len(shares))
        if self.projector is not None:
            scoring.projected = self.projected()
        scoring.seconds = self.seconds + time.perf_counter() - start
        return scoring

    def correction(self, keep_local: np.ndarray, kept_divisors: np.ndarray) -> torch.Tensor:
        """This process's change to its gradient ``[D]``: minus each dropped record's share, and each
        kept record's share rescaled from its slice's divisor to ``kept_divisors`` (the divisor of
        the slice it lands in once the dropped records are gone)."""
        keep = torch.as_tensor(keep_local, dtype=torch.bool)
        ratio = torch.as_tensor(self.divisors / np.where(keep_local, kept_divisors, 1.0))
        coefficients = torch.where(keep, ratio - 1.0, torch.full_like(ratio, -1.0))
        return coefficients.to(self.shares) @ self.shares


def check_room(num_records: int, num_params: int, device: torch.device | str) -> None:
    """On a CUDA device: a round's shares (``num_records`` x ``num_params`` floats, the records one
    process holds) must fit in the memory free or cached by torch and unused (ValueError, in one
    line, if not). The training's own activations come on top: this only catches the hopeless."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    needed = num_records * num_params * 4
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if needed > free:
        raise ValueError(
            f"iif_schedule='step' keeps each of this process's {num_records} completions' gradient share "
            f"({num_params:,} LoRA weights each, {needed / 2**30:.1f} GiB) until the step, and {free / 2**30:.1f} GiB "
            "is free: use iif_schedule='round', or fewer completions a generation batch per process"
        )


def add_to_gradients(layout: LoraLayout, delta: torch.Tensor) -> None:
    """Add ``delta`` ``[D]`` (in the layout's order) to the LoRA weights' ``.grad``."""
    for linear in layout.linears:
        weight = linear.module.weight
        part = delta[linear.weight_offset : linear.weight_offset + linear.weight_numel].view_as(weight)
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.add_(part.to(weight.grad))
        if linear.bias_offset is not None:
            bias = linear.module.bias
            part = delta[linear.bias_offset : linear.bias_offset + linear.out_features]
            if bias.grad is None:
                bias.grad = torch.zeros_like(bias)
            bias.grad.add_(part.to(bias.grad))
