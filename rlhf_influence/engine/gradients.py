"""Per-record and target gradients over a model's trainable LoRA weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .capture import LossFn, capture_factors
from .lora import LoraLayout, find_lora_layout
from .projection import RandomProjector

TargetFn = Callable[[nn.Module], torch.Tensor]


def per_record_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    projector: RandomProjector | None = None,
    *,
    layout: LoraLayout | None = None,
) -> torch.Tensor:
    """Per-record gradients of ``loss_fn(model)`` over the trainable LoRA weights.

    One forward and one backward over the whole batch. Exact mode returns ``[n, D]``: row i is
    the flattened gradient of ``loss_fn(model)[i]`` over the trainable LoRA parameters in
    ``model.named_parameters()`` order. With a ``projector`` it returns ``[n, D']``, built from
    projected factors without forming the exact gradient. ``param.grad`` is left untouched.
    """
    factors = capture_factors(model, loss_fn, layout=layout)
    return factors.gradients(projector)


def target_gradients(
    model: nn.Module,
    targets: TargetFn | Sequence[TargetFn],
    *,
    layout: LoraLayout | None = None,
) -> torch.Tensor:
    """Gradients ``[m, D]`` of m targets (one forward+backward each; ``[D]`` for a single one).

    A target is ``f(model) -> Tensor``; its value is the sum of that tensor (e.g. one term per
    held-out sample), and the sum's gradient over the trainable LoRA weights is returned.
    """
    single = callable(targets)
    target_list = [targets] if single else list(targets)
    if not target_list:
        raise ValueError("target_gradients needs at least one target")
    layout = layout if layout is not None else find_lora_layout(model)
    grads = [
        capture_factors(model, target, layout=layout, per_record=False).total_gradient()
        for target in target_list
    ]
    return grads[0] if single else torch.stack(grads)
