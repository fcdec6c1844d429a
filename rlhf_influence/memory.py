"""What an RLHF job's model state needs in memory, before anything is loaded.

Counted from the model's config on the meta device (no weights read): the frozen base weights,
the LoRA adapter with its gradient and Adam's two moments, PPO's value function (a separate
value model trained in full, or a scalar head on the policy's backbone), and a reward model. The
reference policy is the policy with its adapter disabled: no copy. Activations, logits and the
CUDA context come on top; they depend on the batch, the lengths and the vocabulary, and are not
in these figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GIB = 2**30

# Bytes per trainable parameter beside its weight: a gradient and Adam's two moments, each in the
# parameter's dtype (torch's AdamW keeps its state so).
TRAINING_COPIES = 3


@dataclass(frozen=True)
class JobMemory:
    """Model state of a PPO/GRPO job, in bytes, by part."""

    policy_weights: int  # the frozen base (also the reference, adapter disabled)
    lora: int  # adapter weights, gradients and Adam's moments
    value: int  # a separate value model trained in full, or the shared head
    reward_model: int  # frozen

    @property
    def total(self) -> int:
        return self.policy_weights + self.lora + self.value + self.reward_model

    def describe(self) -> str:
        parts = (("policy", self.policy_weights), ("LoRA+Adam", self.lora), ("value", self.value),
                 ("reward model", self.reward_model))  # fmt: skip
        return ", ".join(f"{name} {size / GIB:.1f} GiB" for name, size in parts if size) + f"; {self.total / GIB:.1f} GiB in all"


def meta_model(config, kind: str = "causal_lm") -> torch.nn.Module:
    """An empty model (meta device: no memory) built from ``config``: a causal LM or a
    sequence-classification model with one output."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with init_empty_weights():
        if kind == "causal_lm":
            model = AutoModelForCausalLM.from_config(config)
        else:
            model = AutoModelForSequenceClassification.from_config(config, num_labels=1)
    model.tie_weights()
    return model


def unique_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def lora_parameters(model: torch.nn.Module, target_modules, r: int) -> int:
    """Parameters LoRA of rank ``r`` adds on the linear layers named ``target_modules`` (last name part)."""
    targets = set(target_modules)
    total = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
            total += r * (module.in_features + module.out_features)
    return total


def ppo_job_memory(
    config,
    dtype: torch.dtype,
    *,
    value_head: str,
    lora_r: int = 16,
    lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
    reward_config=None,
    adapter_dtype: torch.dtype = torch.float32,
) -> JobMemory:
    """The model state of a LoRA PPO job on a policy with ``config`` loaded in ``dtype``.

    ``value_head='separate'``: a value model of the policy's shape (TRL's default starts it from the
    reward model) trained in full: weights, gradients and Adam's moments in ``dtype``.
    ``'shared'``: a head of ``hidden_size + 1`` parameters on the policy. ``reward_config``: the
    reward model's config (None: a model of the policy's shape; pass False for a reward function).
    ``adapter_dtype``: PEFT keeps LoRA weights in float32 unless told otherwise.
    """
    policy = meta_model(config)
    base = unique_parameters(policy)
    size = dtype.itemsize
    adapter = lora_parameters(policy, lora_target_modules, lora_r)
    lora = adapter * adapter_dtype.itemsize * (1 + TRAINING_COPIES)
    if value_head == "shared":
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        value = (hidden + 1) * adapter_dtype.itemsize * (1 + TRAINING_COPIES)
    elif value_head == "separate":
        value = unique_parameters(meta_model(config, "classification")) * size * (1 + TRAINING_COPIES)
    else:
        raise ValueError(f"value_head must be 'separate' or 'shared', got {value_head!r}")
    reward = 0
    if reward_config is not False:
        reward = unique_parameters(meta_model(reward_config or config, "classification")) * size
    return JobMemory(policy_weights=base * size, lora=lora, value=value, reward_model=reward)
