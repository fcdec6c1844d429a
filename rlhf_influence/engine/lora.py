"""Find the trainable LoRA weights of a model and lay them out as one flat gradient vector.

The attribution engine works on PEFT LoRA adapters of any architecture. Each ``lora_A`` and
``lora_B`` adapter is an ``nn.Linear``; a per-record gradient of a linear layer is a
contraction of its inputs with its output-gradients, so every LoRA weight is handled the same
way whichever base layer (``nn.Linear``, GPT-2's ``Conv1D``, a quantised linear) it adapts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from .errors import NoLoraError, UnsupportedLoraError

Side = Literal["A", "B"]

# Wrappers (DDP, DeepSpeed, torch.compile) prefix parameter names; the layout keys strip them
# so that a seeded projection is the same whether or not the model is wrapped.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """``name`` without the prefixes that DDP, DeepSpeed or ``torch.compile`` wrappers add."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                stripped = True
    return name


@dataclass(frozen=True)
class LoraLinear:
    """One ``lora_A`` or ``lora_B`` linear adapter whose weights are trainable.

    ``weight_offset`` / ``bias_offset`` locate its parameters in the flat gradient vector
    (``bias_offset`` is ``None`` unless the adapter was built with ``lora_bias=True``).
    """

    name: str  # canonical module name, e.g. "base_model.model.h.0.attn.c_attn.lora_A.default"
    module: nn.Linear
    side: Side
    in_features: int
    out_features: int
    weight_offset: int
    bias_offset: int | None

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features

    @property
    def large_dim(self) -> int:
        """The side a projection compresses: d_in for ``lora_A`` (r x d_in), d_out for ``lora_B``."""
        return self.in_features if self.side == "A" else self.out_features


@dataclass(frozen=True)
class LoraLayout:
    """The trainable LoRA parameters of a model, in ``model.named_parameters()`` order.

    Row ``i`` of an exact per-record gradient matrix is the concatenation of the flattened
    gradients of ``param_names`` (each weight flattened row-major, as ``param.flatten()``).
    """

    linears: tuple[LoraLinear, ...]
    param_names: tuple[str, ...]
    num_params: int  # D, the length of one flat gradient
    excluded_trainable: tuple[str, ...]  # trainable parameters that are not LoRA weights

    def __len__(self) -> int:
        return len(self.linears)


def _is_lora_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a hard dependency
        return False
    return isinstance(module, LoraLayer)


def _check_supported(layer_name: str, layer: nn.Module) -> None:
    variants = getattr(layer, "lora_variant", {}) or {}
    trainable_variant = [a for a in variants if _adapter_has_trainable(layer, a)]
    if trainable_variant:
        kind = type(variants[trainable_variant[0]]).__name__
        raise UnsupportedLoraError(
            f"LoRA layer '{layer_name}' uses the LoRA variant {kind} (e.g. DoRA) for adapter "
            f"'{trainable_variant[0]}'; only plain LoRA (lora_B(lora_A(x)) * scaling) is supported."
        )
    for attr in ("lora_embedding_A", "lora_embedding_B"):
        params = getattr(layer, attr, {})
        if any(p.requires_grad for p in params.values()):
            raise UnsupportedLoraError(
                f"LoRA layer '{layer_name}' adapts an embedding; per-record gradients support "
                "LoRA on linear layers (attention and MLP projections) only."
            )
    for attr in ("lora_A", "lora_B"):
        for adapter, sub in getattr(layer, attr, {}).items():
            if any(p.requires_grad for p in sub.parameters()) and not isinstance(sub, nn.Linear):
                raise UnsupportedLoraError(
                    f"LoRA layer '{layer_name}' has a {type(sub).__name__} {attr}['{adapter}'] "
                    "(e.g. a convolution); per-record gradients support LoRA adapters that are "
                    "nn.Linear, which covers LoRA on Linear, Conv1D and quantised linear layers."
                )


def _adapter_has_trainable(layer: nn.Module, adapter: str) -> bool:
    for attr in ("lora_A", "lora_B", "lora_magnitude_vector"):
        container = getattr(layer, attr, None)
        if container is None or adapter not in container:
            continue
        if any(p.requires_grad for p in container[adapter].parameters()):
            return True
    return False


def find_lora_layout(model: nn.Module) -> LoraLayout:
    """Discover the trainable LoRA adapters of ``model`` and their place in the flat gradient.

    Raises:
        NoLoraError: the model holds no PEFT LoRA layer, or none of its LoRA weights is trainable.
        UnsupportedLoraError: a trainable adapter is not a plain linear LoRA (DoRA, embedding, conv).
    """
    lora_layers = [(n, m) for n, m in model.named_modules() if _is_lora_layer(m)]
    if not lora_layers:
        raise NoLoraError(
            f"{type(model).__name__} holds no PEFT LoRA layer. Wrap it with "
            "peft.get_peft_model(model, LoraConfig(...)) before computing per-record gradients."
        )
    for name, layer in lora_layers:
        _check_supported(canonical_name(name), layer)

    # Map each parameter of a lora_A / lora_B Linear to (module name, side, kind).
    owner: dict[int, tuple[str, nn.Linear, Side, str]] = {}
    for layer_name, layer in lora_layers:
        for side in ("A", "B"):
            for adapter, sub in getattr(layer, f"lora_{side}").items():
                sub_name = canonical_name(f"{layer_name}.lora_{side}.{adapter}")
                owner[id(sub.weight)] = (sub_name, sub, side, "weight")
                if sub.bias is not None:
                    owner[id(sub.bias)] = (sub_name, sub, side, "bias")

    offsets: dict[str, dict[str, int]] = {}
    modules: dict[str, tuple[nn.Linear, Side]] = {}
    param_names: list[str] = []
    excluded: list[str] = []
    offset = 0
    for pname, param in model.named_parameters():
        if not param.requires_grad:
            continue
        hit = owner.get(id(param))
        if hit is None:
            excluded.append(canonical_name(pname))
            continue
        sub_name, sub, side, kind = hit
        offsets.setdefault(sub_name, {})[kind] = offset
        modules[sub_name] = (sub, side)
        param_names.append(canonical_name(pname))
        # Sizes come from the module, not param.numel(): ZeRO-3 leaves partitioned params empty.
        offset += sub.in_features * sub.out_features if kind == "weight" else sub.out_features

    if not param_names:
        raise NoLoraError(
            "The model has LoRA layers but none of their weights requires grad: nothing to "
            "attribute. Is the adapter frozen or merged (call model.train() / set_adapter)?"
        )
    linears = []
    for sub_name, (sub, side) in modules.items():
        if "weight" not in offsets[sub_name]:
            raise UnsupportedLoraError(
                f"Only the bias of '{sub_name}' is trainable; train its weight too or freeze both."
            )
        linears.append(
            LoraLinear(
                name=sub_name,
                module=sub,
                side=side,
                in_features=sub.in_features,
                out_features=sub.out_features,
                weight_offset=offsets[sub_name]["weight"],
                bias_offset=offsets[sub_name].get("bias"),
            )
        )
    return LoraLayout(
        linears=tuple(linears),
        param_names=tuple(param_names),
        num_params=offset,
        excluded_trainable=tuple(excluded),
    )
