"""PPO's value function as a scalar head on the policy's own LoRA backbone (``value_head='shared'``).

TRL 1.12's PPO trains a separate value model in full: a second network as large as the policy,
every weight with Adam's two moments. The paper's code (TRL 0.5's value head) shares the policy's
backbone instead: the value of a position is a linear head on the policy's last hidden state with
its LoRA adapter active, and PPO's loss (policy loss + ``vf_coef`` x value loss) trains the LoRA
weights and the head. One backbone is in memory; the reference stays the adapter-disabled base.

:class:`SharedValueHead` stands where TRL expects a value model (``base_model_prefix`` and
``score``, as :func:`trl.experimental.utils.get_reward` reads them) without registering the
policy a second time; :class:`SharedPolicyAndValue` replaces TRL's ``PolicyAndValueWrapper`` so
that a training micro-batch runs the backbone once for both the logits and the values.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

VALUE_HEADS = ("auto", "separate", "shared")
HEAD_FILE = "value_head.safetensors"


def policy_backbone(policy: nn.Module) -> nn.Module:
    """The transformer body of a (PEFT-wrapped) causal LM: its last hidden state, no LM head.

    Its LoRA layers are the policy's own modules, so the adapter is active exactly when it is in
    the policy (and disabled under ``disable_adapter()``)."""
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    prefix = getattr(base, "base_model_prefix", None)
    body = getattr(base, prefix, None) if prefix else None
    if not isinstance(body, nn.Module):
        raise TypeError(
            f"value_head='shared' needs a causal LM with a transformer body (base_model_prefix); "
            f"{type(base).__name__} has none"
        )
    return body


def hidden_size(policy: nn.Module) -> int:
    config = policy.config
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if size is None:
        raise TypeError(f"cannot read the hidden size from {type(config).__name__} (no hidden_size or n_embd)")
    return int(size)


class SharedValueHead(nn.Module):
    """V(position) = w . h + b on the policy's last hidden state ``h``; zero at the start.

    Stands for TRL's value model: ``getattr(head, head.base_model_prefix)`` is the policy's body
    (held by reference, not registered: its weights belong to the policy) and ``head.score`` the
    linear head, so TRL's ``get_reward`` computes the rollout's values unchanged.
    """

    base_model_prefix = "backbone"

    def __init__(self, policy: nn.Module, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if dtype is None:  # the adapter's dtype: one dtype per parameter group (ZeRO-3)
            dtype = next((p.dtype for p in policy.parameters() if p.requires_grad), torch.float32)
        self.score = nn.Linear(hidden_size(policy), 1, dtype=dtype)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)
        object.__setattr__(self, "_policy", policy)  # not a submodule

    @property
    def backbone(self) -> nn.Module:
        return policy_backbone(self._policy)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Values ``[..., 1]`` of last hidden states ``[..., hidden]``."""
        return self.score(hidden.to(self.score.weight.dtype))

    def save(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """``directory/value_head.safetensors`` (``score.weight``, ``score.bias``) and its config."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = state if state is not None else self.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, directory / HEAD_FILE)
        (directory / "value_head.json").write_text(
            json.dumps({"kind": "shared", "hidden_size": self.score.in_features, "input": "last hidden state"})
        )
        return directory / HEAD_FILE


class SharedPolicyAndValue(nn.Module):
    """TRL's ``PolicyAndValueWrapper`` for a shared head: one pass gives the policy's output and
    the values of every position (``forward`` is called with ``output_hidden_states=True``)."""

    def __init__(self, policy: nn.Module, value_model: SharedValueHead) -> None:
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.is_gradient_checkpointing = getattr(policy, "is_gradient_checkpointing", False)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.policy.gradient_checkpointing_enable(**kwargs)
        self.is_gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.policy.gradient_checkpointing_disable()
        self.is_gradient_checkpointing = False

    def forward(self, **kwargs):
        output = self.policy(**{**kwargs, "output_hidden_states": True})
        return output, self.value_model(output.hidden_states[-1])


@contextmanager
def policy_and_value_wrapper(value_head: str):
    """While TRL's PPOTrainer is built: its policy-and-value wrapper for ``value_head``.

    TRL 1.12 names ``PolicyAndValueWrapper`` inside ``PPOTrainer.__init__``, before the optimizer
    and ``accelerator.prepare``; with a shared head the one-pass wrapper takes its place there (and
    only there), so DDP and DeepSpeed wrap the module that training calls."""
    if value_head != "shared":
        yield
        return
    from trl.experimental.ppo import ppo_trainer

    original = ppo_trainer.PolicyAndValueWrapper
    ppo_trainer.PolicyAndValueWrapper = SharedPolicyAndValue
    try:
        yield
    finally:
        ppo_trainer.PolicyAndValueWrapper = original
