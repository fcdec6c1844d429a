"""Influence of each record on one or many targets: I(z_i) = <grad f, -grad loss_i>.

Positive means helpful: a gradient step on record i's loss increases the target.
"""

from __future__ import annotations

import torch
from torch import nn

from .capture import LossFn, RecordFactors, capture_factors
from .lora import LoraLayout
from .projection import RandomProjector


def scores_from_factors(
    factors: RecordFactors,
    target_grads: torch.Tensor,
    projector: RandomProjector | None = None,
) -> torch.Tensor:
    """Influence scores ``[n, m]`` of the captured records on targets with gradients ``[m, D]``.

    Exact scoring contracts the factors with the target gradients adapter by adapter and never
    builds the ``[n, D]`` matrix. With a projector both sides are projected first (an unbiased
    estimate of the exact score).
    """
    if projector is None:
        return -factors.dot(target_grads)
    projected_targets = projector.project(factors.layout, target_grads.to(factors.dtype))
    return -(factors.gradients(projector) @ projected_targets.to(factors.losses.device).T)


def adam_preconditioner(exp_avg_sq: torch.Tensor, step: float, beta2: float, eps: float) -> torch.Tensor:
    """``1 / (sqrt(v_hat) + eps)``: what Adam divides a gradient by at its next step, with
    ``v_hat = exp_avg_sq / (1 - beta2**step)`` its bias-corrected second moment (``step`` >= 1 steps
    taken). A record's Adam-aware influence is ``<grad f, -P * grad loss_i>`` = ``<P * grad f, -grad
    loss_i>``: under Adam a record moves the weights along its preconditioned gradient (LESS, Bergson)."""
    if step < 1:
        raise ValueError("Adam's preconditioner needs at least one step taken (its second moment is still 0)")
    return 1.0 / ((exp_avg_sq / (1.0 - beta2**step)).sqrt() + eps)


def influence_scores(
    model: nn.Module,
    loss_fn: LossFn,
    target_grads: torch.Tensor,
    projector: RandomProjector | None = None,
    *,
    layout: LoraLayout | None = None,
) -> torch.Tensor:
    """Influence of each record of ``loss_fn`` on each target, ``[n, m]`` (``[n]`` for ``[D]``).

    ``target_grads`` comes from :func:`target_gradients` at the same weights. One forward and
    one backward over the batch.
    """
    single = target_grads.dim() == 1
    factors = capture_factors(model, loss_fn, layout=layout)
    scores = scores_from_factors(factors, target_grads.unsqueeze(0) if single else target_grads, projector)
    return scores[:, 0] if single else scores
