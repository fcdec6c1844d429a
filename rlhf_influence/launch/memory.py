"""What an RLHF job's model state needs in memory, before anything is loaded.

Counted from the model's config on the meta device (no weights read): the frozen base weights,
the LoRA adapter with its gradient and Adam's two moments, PPO's value function (a separate
value model trained in full, or a scalar head on the policy's backbone), and a reward model. The
reference policy is the policy with its adapter disabled: no copy. Activations, logits and the
CUDA context come on top; they depend on the batch, the lengths and the vocabulary, and are not
in these figures.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

GIB = 2**30


def in_gib(size: int) -> str:
    """``size`` bytes in words: GiB, or MiB below a tenth of one."""
    return f"{size / GIB:.1f} GiB" if size >= GIB / 10 else f"{size / 2**20:.1f} MiB"

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
        return ", ".join(f"{name} {in_gib(size)}" for name, size in parts if size) + f"; {in_gib(self.total)} in all"


def meta_model(config, kind: str = "causal_lm") -> torch.nn.Module:
    """An empty model (meta device: no memory) built from ``config``: a causal LM or a
    sequence-classification model with one output."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with init_empty_weights():
        if kind == "causal_lm":
            model = AutoModelForCausalLM.from_config(config)
        else:
            config = copy.deepcopy(config)
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config)
    model.tie_weights()
    return model


def unique_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# PEFT's targets where none are named, for the model types this estimate is used with
DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")
HEADS = ("lm_head", "score")  # output layers "all-linear" leaves out


def lora_parameters(model: torch.nn.Module, target_modules, r: int) -> int:
    """Parameters LoRA of rank ``r`` adds on the linear layers named ``target_modules`` (last name
    part; ``"all-linear"``: every linear layer but the output head; None: PEFT's q_proj, v_proj)."""
    if target_modules is None:
        target_modules = DEFAULT_LORA_TARGETS
    every = target_modules == "all-linear"
    targets = set() if every else {target_modules} if isinstance(target_modules, str) else set(target_modules)
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    total = 0
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear | Conv1D) and ((every and last not in HEADS) or last in targets):
            total += r * sum(module.weight.shape)  # in + out features, either layout
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
        value = shared_head_bytes(config, adapter_dtype)
    elif value_head == "separate":
        value = unique_parameters(meta_model(config, "classification")) * size * (1 + TRAINING_COPIES)
    else:
        raise ValueError(f"value_head must be 'separate' or 'shared', got {value_head!r}")
    reward = 0
    if reward_config is not False:
        reward = unique_parameters(meta_model(reward_config or config, "classification")) * size
    return JobMemory(policy_weights=base * size, lora=lora, value=value, reward_model=reward)


def shared_head_bytes(config, adapter_dtype: torch.dtype = torch.float32) -> int:
    """The shared value head's weights (``hidden_size + 1``) with its gradient and Adam's moments."""
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return (hidden + 1) * adapter_dtype.itemsize * (1 + TRAINING_COPIES)


def free_device_memory(device: torch.device) -> tuple[int | None, str]:
    """Memory free now on ``device`` (a CUDA device's, else the system's MemAvailable) and its name."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"GPU {device.index or 0} ({torch.cuda.get_device_name(device)})"
    from .models import available_memory_bytes

    return available_memory_bytes(), "this machine"


def ppo_memory_problem(
    config, dtype: torch.dtype, value_head: str, available: int | None, where: str, **job
) -> str | None:
    """Why a PPO job's model state would not fit in ``available`` bytes (None if it fits or the
    memory is unknown), with the figure of each value setting, so the message says what to change."""
    if available is None:
        return None
    separate = ppo_job_memory(config, dtype, value_head="separate", **job)  # the models built once, on meta
    adapter_dtype = job.get("adapter_dtype", torch.float32)
    need = {"separate": separate, "shared": dataclasses.replace(separate, value=shared_head_bytes(config, adapter_dtype))}
    if need[value_head].total <= available:
        return None
    other = "shared" if value_head == "separate" else "separate"
    return (
        f"this PPO job's model state needs about {in_gib(need[value_head].total)} with --value_head {value_head} "
        f"({need[value_head].describe()}), but {where} has {in_gib(available)} free; with --value_head {other} "
        f"it needs about {in_gib(need[other].total)}. Activations come on top. Use --value_head shared, "
        "--dtype bfloat16, DeepSpeed ZeRO (accelerate_configs/), or a smaller model"
    )
