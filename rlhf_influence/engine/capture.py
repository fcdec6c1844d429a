"""Capture the per-record factors of every LoRA adapter in one forward and one backward.

For a linear adapter y = W x (+ b) applied to a batch of records, the gradient of record i's
loss with respect to W is  sum_t  dL_i/dy_{i,t}  x_{i,t}^T.  Forward hooks on the ``lora_A`` /
``lora_B`` linears keep their inputs x and outputs y; one ``torch.autograd.grad`` of the summed
loss with respect to those outputs gives every dL_i/dy_{i,t} at once (record i's loss depends
only on row i). Asking autograd for the outputs' gradients, not the weights', skips the
weight-gradient GEMMs and leaves every ``param.grad`` untouched, so capture can run between
the steps of a training loop. Per-record gradients, projections and influence scores are all
contracted from these factors (see ``RecordFactors``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import LossShapeError, NonFiniteError, UnsupportedLoraError
from .lora import LoraLayout, LoraLinear, find_lora_layout
from .projection import RandomProjector, SketchedProjector

LossFn = Callable[[nn.Module], torch.Tensor]

# Transient per-adapter blocks are computed for at most this many elements at once.
_BLOCK_ELEMENTS = 1 << 25


@dataclass
class AdapterFactors:
    """Inputs and output-gradients of one LoRA linear, one entry per call in the forward."""

    linear: LoraLinear
    inputs: list[torch.Tensor] = field(default_factory=list)  # [n, T, in] each
    output_grads: list[torch.Tensor] = field(default_factory=list)  # [n, T, out] each


@dataclass
class RecordFactors:
    """What one forward+backward over a batch leaves behind: enough for any per-record quantity.

    ``num_records`` is n, ``losses`` the detached per-record losses. Methods compute in
    ``dtype`` (float32 unless the factors are float64).
    """

    layout: LoraLayout
    adapters: list[AdapterFactors]
    losses: torch.Tensor
    num_records: int
    dtype: torch.dtype

    def gradients(self, projector: RandomProjector | SketchedProjector | None = None) -> torch.Tensor:
        """Per-record gradients ``[n, D]`` (exact) or ``[n, D']`` (projected from the factors)."""
        if isinstance(projector, SketchedProjector):
            return projector.fold(self._projected_gradients(projector.per_side))
        if projector is not None:
            return self._projected_gradients(projector)
        n = self.num_records
        device = self.losses.device
        out = torch.zeros(n, self.layout.num_params, dtype=self.dtype, device=device)
        for adapter in self.adapters:
            linear = adapter.linear
            w = out[:, linear.weight_offset : linear.weight_offset + linear.weight_numel]
            w = w.view(n, linear.out_features, linear.in_features)
            for x, g in self._calls(adapter):
                w.add_(torch.bmm(g.transpose(1, 2), x))
                if linear.bias_offset is not None:
                    b = out[:, linear.bias_offset : linear.bias_offset + linear.out_features]
                    b.add_(g.sum(dim=1))
        return out

    def _projected_gradients(self, projector: RandomProjector) -> torch.Tensor:
        n = self.num_records
        blocks = []
        for adapter in self.adapters:
            linear = adapter.linear
            device = self.losses.device
            proj = projector.matrix(linear, device, self.dtype)
            k = projector.projected_size(linear)
            shape = (n, linear.out_features, k) if linear.side == "A" else (n, k, linear.in_features)
            weight = torch.zeros(shape, dtype=self.dtype, device=device)
            bias = (
                torch.zeros(n, k, dtype=self.dtype, device=device) if linear.bias_offset is not None else None
            )
            for x, g in self._calls(adapter):
                if linear.side == "A":  # G P^T = sum_t g_t (P x_t)^T  -> [n, r, k]
                    px = x if proj is None else x @ proj.T
                    weight.add_(torch.bmm(g.transpose(1, 2), px))
                else:  # P G = sum_t (P g_t) x_t^T  -> [n, k, r]
                    pg = g if proj is None else g @ proj.T
                    weight.add_(torch.bmm(pg.transpose(1, 2), x))
                    if bias is not None:
                        bias.add_(pg.sum(dim=1))
            blocks.append(weight.reshape(n, -1))
            if bias is not None:
                blocks.append(bias)
        return torch.cat(blocks, dim=1)

    def dot(self, vectors: torch.Tensor) -> torch.Tensor:
        """``<g_i, v_j>`` for every record i and every row v_j of ``vectors`` ``[m, D]``: ``[n, m]``.

        Never materialises the ``[n, D]`` matrix: each adapter's per-record block is built for
        a slice of records at a time, dotted with the matching slice of ``vectors`` and freed.
        """
        if vectors.dim() != 2 or vectors.shape[1] != self.layout.num_params:
            raise ValueError(
                f"vectors must have shape [m, {self.layout.num_params}], got {tuple(vectors.shape)}"
            )
        n, m = self.num_records, vectors.shape[0]
        vectors = vectors.to(device=self.losses.device, dtype=self.dtype)
        scores = torch.zeros(n, m, dtype=self.dtype, device=self.losses.device)
        for adapter in self.adapters:
            linear = adapter.linear
            v_w = vectors[:, linear.weight_offset : linear.weight_offset + linear.weight_numel]
            v_b = None
            if linear.bias_offset is not None:
                v_b = vectors[:, linear.bias_offset : linear.bias_offset + linear.out_features]
            chunk = max(1, _BLOCK_ELEMENTS // max(1, linear.weight_numel))
            for x, g in self._calls(adapter):
                for start in range(0, n, chunk):
                    rows = slice(start, start + chunk)
                    block = torch.bmm(g[rows].transpose(1, 2), x[rows])  # [c, out, in]
                    scores[rows] += block.flatten(1) @ v_w.T
                    if v_b is not None:
                        scores[rows] += g[rows].sum(dim=1) @ v_b.T
        return scores

    def total_gradient(self) -> torch.Tensor:
        """Gradient of the summed loss ``[D]`` (the sum of all per-record gradients)."""
        out = torch.zeros(self.layout.num_params, dtype=self.dtype, device=self.losses.device)
        for adapter in self.adapters:
            linear = adapter.linear
            w = out[linear.weight_offset : linear.weight_offset + linear.weight_numel]
            w = w.view(linear.out_features, linear.in_features)
            for x, g in self._calls(adapter):
                w.add_(g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1]))
                if linear.bias_offset is not None:
                    out[linear.bias_offset : linear.bias_offset + linear.out_features] += g.sum(dim=(0, 1))
        return out

    def _calls(self, adapter: AdapterFactors):
        for x, g in zip(adapter.inputs, adapter.output_grads, strict=True):
            yield x.to(self.dtype), g.to(self.dtype)


class _Recorder:
    """Forward hooks that keep each LoRA linear's input and output during ``loss_fn``.

    Calls made after the forward (recomputation by activation checkpointing inside the
    backward) are not new uses of the weights and are not recorded; they are noted so that
    reentrant checkpointing, whose first forward runs without grad, can be refused.
    """

    def __init__(self, layout: LoraLayout) -> None:
        self.layout = layout
        self.phase = "idle"  # "forward" while loss_fn runs, "backward" during autograd.grad
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (adapter idx, x, y)
        self.no_grad_forward: set[int] = set()
        self.recomputed: set[int] = set()
        self._handles = []

    @contextmanager
    def hooked(self):
        for idx, linear in enumerate(self.layout.linears):
            self._handles.append(linear.module.register_forward_hook(self._hook(idx)))
        try:
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

    @contextmanager
    def in_phase(self, phase: str):
        self.phase = phase
        try:
            yield
        finally:
            self.phase = "idle"

    def _hook(self, idx: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self.phase == "forward":
                if torch.is_grad_enabled() and output.requires_grad:
                    self.calls.append((idx, args[0].detach(), output))
                else:
                    self.no_grad_forward.add(idx)
            elif self.phase == "backward":
                self.recomputed.add(idx)

        return hook


def _uses_reentrant_checkpointing(model: nn.Module) -> bool:
    """True when a transformers module checkpoints its layers with ``use_reentrant=True``."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            func = getattr(module, "_gradient_checkpointing_func", None)
            if (getattr(func, "keywords", None) or {}).get("use_reentrant", True):
                return True
    return False


def _reentrant_error() -> UnsupportedLoraError:
    return UnsupportedLoraError(
        "the model uses reentrant activation checkpointing, which runs the forward without "
        "grad and hides the adapters' activations from the hooks. Enable it with "
        "gradient_checkpointing_kwargs={'use_reentrant': False}."
    )


def _check_losses(losses: torch.Tensor, per_record: bool) -> None:
    if not isinstance(losses, torch.Tensor):
        raise LossShapeError(f"loss_fn must return a torch.Tensor, got {type(losses).__name__}")
    if per_record and losses.dim() != 1:
        raise LossShapeError(
            f"loss_fn must return one loss per record, a 1-D tensor [n]; got shape {tuple(losses.shape)}"
        )
    if not losses.requires_grad:
        raise LossShapeError(
            "loss_fn returned losses that do not depend on any trainable LoRA weight "
            "(computed under torch.no_grad, or with the adapters disabled?)"
        )
    finite = torch.isfinite(losses.detach())
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()[:10].tolist()
        raise NonFiniteError(f"loss_fn returned non-finite losses (records {bad} ...)")


def _check_output_grads(layout: LoraLayout, calls, grads) -> None:
    """Raise on a NaN/inf output-gradient, naming the adapter; one host sync for all of them
    (max-abs propagates NaN and inf), not one per adapter."""
    present = [(idx, g) for (idx, _, _), g in zip(calls, grads, strict=True) if g is not None]
    if not present:
        return
    peaks = torch.stack([g.detach().abs().amax().float() for _, g in present])
    if bool(torch.isfinite(peaks).all()):
        return
    first = int((~torch.isfinite(peaks)).nonzero()[0, 0])
    raise NonFiniteError(
        f"non-finite gradient reaching LoRA adapter '{layout.linears[present[first][0]].name}'"
    )


def _as_record_major(t: torch.Tensor, n: int, name: str, what: str) -> torch.Tensor:
    """Reshape an activation to [n, T, features]; reject layouts that are not record-first."""
    if t.dim() >= 2 and t.shape[0] == n:
        return t.reshape(n, -1, t.shape[-1])
    if t.dim() == 2 and n > 0 and t.shape[0] % n == 0:  # [n*T, features], batch-major
        return t.reshape(n, -1, t.shape[-1])
    raise LossShapeError(
        f"the {what} of LoRA adapter '{name}' has shape {tuple(t.shape)}, which does not start "
        f"with the {n} records that loss_fn returned losses for. loss_fn must run the whole "
        "batch through the model at once, records along the first dimension."
    )


def capture_factors(
    model: nn.Module,
    loss_fn: LossFn,
    *,
    layout: LoraLayout | None = None,
    per_record: bool = True,
) -> RecordFactors:
    """Run ``loss_fn(model)`` once forward and once backward, keeping the LoRA factors.

    Args:
        model: a module holding PEFT LoRA layers.
        loss_fn: ``loss_fn(model) -> Tensor[n]``, record i's loss depending only on record i.
            With ``per_record=False`` it may return any shape; its sum is differentiated (this
            is how a target's gradient is taken).
        layout: the model's LoRA layout, when the caller already has it.

    Raises:
        LossShapeError: the losses are not ``[n]`` or activations are not record-first.
        NonFiniteError: a loss or an output-gradient is NaN or infinite.
    """
    layout = layout if layout is not None else find_lora_layout(model)
    recorder = _Recorder(layout)
    with recorder.hooked():
        with recorder.in_phase("forward"):
            losses = loss_fn(model)
        _check_losses(losses, per_record)
        if recorder.no_grad_forward and _uses_reentrant_checkpointing(model):
            raise _reentrant_error()
        outputs = [y for _, _, y in recorder.calls]
        with recorder.in_phase("backward"):
            grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True) if outputs else ()
    if recorder.no_grad_forward & recorder.recomputed:
        raise _reentrant_error()

    n = losses.shape[0] if per_record else 1
    dtype = torch.float64 if losses.dtype == torch.float64 else torch.float32
    adapters = [AdapterFactors(linear) for linear in layout.linears]
    _check_output_grads(layout, recorder.calls, grads)
    for (idx, x, _), g in zip(recorder.calls, grads, strict=True):
        if g is None:  # this call does not reach the loss
            continue
        name = layout.linears[idx].name
        if per_record:
            x = _as_record_major(x, n, name, "input")
            g = _as_record_major(g, n, name, "output")
        else:
            x = x.reshape(1, -1, x.shape[-1])
            g = g.reshape(1, -1, g.shape[-1])
        adapters[idx].inputs.append(x)
        adapters[idx].output_grads.append(g)
    return RecordFactors(
        layout=layout,
        adapters=adapters,
        losses=losses.detach(),
        num_records=n,
        dtype=dtype,
    )


class TrainingCapture:
    """Per-record factors from a training step's own forward and backward: no extra pass.

    Around one micro-batch's forward and backward (``with capture.recording(n): loss = ...;
    loss.backward()``), forward hooks keep each LoRA linear's input and hook its output, whose
    gradient autograd then computes anyway for the weights'. ``factors()`` gives the micro-batch's
    :class:`RecordFactors`: record i's gradient of the backward's loss, provided the loss adds up
    terms each of which depends on one record (a masked mean with one denominator does). Nothing
    is computed that the training does not compute, except the hooks' copies.
    """

    def __init__(self, layout: LoraLayout) -> None:
        self.layout = layout
        self._calls: list[tuple[int, torch.Tensor]] = []  # (adapter idx, input)
        self._grads: dict[int, torch.Tensor] = {}  # call position -> output gradient
        self._num_records = 0
        self._backward_started = False

    @contextmanager
    def recording(self, num_records: int):
        """Hook the LoRA linears while one micro-batch of ``num_records`` records runs forward and
        backward (inside the ``with``)."""
        self._calls, self._grads, self._num_records = [], {}, num_records
        self._backward_started = False
        handles = [linear.module.register_forward_hook(self._hook(idx)) for idx, linear in enumerate(self.layout.linears)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, idx: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._backward_started or not (torch.is_grad_enabled() and output.requires_grad):
                return  # a recomputation inside the backward (activation checkpointing), or no grad
            position = len(self._calls)
            self._calls.append((idx, args[0].detach()))

            def keep(grad: torch.Tensor, position: int = position) -> None:
                self._backward_started = True
                self._grads[position] = grad.detach()

            output.register_hook(keep)

        return hook

    def clear(self) -> None:
        """Let go of the recorded inputs and output gradients (they hold a micro-batch's activations)."""
        self._calls, self._grads = [], {}

    def factors(self, scale: float = 1.0) -> RecordFactors:
        """The recorded micro-batch's factors, each output gradient times ``scale`` (e.g. to undo
        the gradient-accumulation division or to put the loss on another normaliser)."""
        if not self._calls:
            raise UnsupportedLoraError(
                "no LoRA adapter ran with grad during the recorded forward (reentrant activation "
                "checkpointing hides them: use gradient_checkpointing_kwargs={'use_reentrant': False})"
            )
        n = self._num_records
        adapters = [AdapterFactors(linear) for linear in self.layout.linears]
        dtype = torch.float32
        device = self._calls[0][1].device
        for position, (idx, x) in enumerate(self._calls):
            g = self._grads.get(position)
            if g is None:  # this call does not reach the loss
                continue
            name = self.layout.linears[idx].name
            adapters[idx].inputs.append(_as_record_major(x, n, name, "input"))
            adapters[idx].output_grads.append(_as_record_major(g, n, name, "output") * scale)
            if x.dtype == torch.float64:
                dtype = torch.float64
        return RecordFactors(self.layout, adapters, torch.zeros(n, device=device), n, dtype)
