"""Every bad input gets a clear error naming the problem, before any work is wasted."""

from __future__ import annotations

import pytest
import torch
from conftest import record_batch, tiny_lora_model
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config

from rlhf_influence import (
    LossShapeError,
    NoLoraError,
    NonFiniteError,
    RandomProjector,
    UnsupportedLoraError,
    per_record_gradients,
    ppo_policy_loss,
    target_gradients,
)


def loss_of(batch, scale=1.0):
    advantages = torch.ones(batch[0].shape, dtype=torch.float64) * scale
    return lambda m: ppo_policy_loss(m, *batch, advantages)


def test_model_without_lora():
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4))
    called = []
    with pytest.raises(NoLoraError, match="no PEFT LoRA layer"):
        per_record_gradients(model, lambda m: called.append(1))
    assert not called  # raised before the forward


def test_frozen_lora():
    model = tiny_lora_model("gpt2")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(NoLoraError, match="none of their weights requires grad"):
        per_record_gradients(model, loss_of(record_batch(2)))


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda losses: losses.sum(), "one loss per record"),
        (lambda losses: losses[:, None].expand(-1, 2), "one loss per record"),
        (lambda losses: losses.tolist(), "must return a torch.Tensor"),
        (lambda losses: losses.detach(), "do not depend on any trainable LoRA weight"),
    ],
)
def test_loss_fn_output_not_per_record(bad, match):
    model = tiny_lora_model("gpt2")
    base = loss_of(record_batch(3))
    with pytest.raises(LossShapeError, match=match):
        per_record_gradients(model, lambda m: bad(base(m)))


def test_loss_fn_running_records_in_chunks_is_rejected():
    model = tiny_lora_model("gpt2")
    batch = record_batch(4)
    first, second = (tuple(t[:2] for t in batch), tuple(t[2:] for t in batch))
    with pytest.raises(LossShapeError, match="does not start with the 4 records"):
        per_record_gradients(model, lambda m: torch.cat([loss_of(first)(m), loss_of(second)(m)[:2]]))


def test_non_finite_losses():
    model = tiny_lora_model("gpt2")
    base = loss_of(record_batch(3))

    def nan_loss(m):
        losses = base(m)
        return losses * torch.tensor([1.0, float("nan"), 1.0], dtype=losses.dtype)

    with pytest.raises(NonFiniteError, match=r"non-finite losses \(records \[1\]"):
        per_record_gradients(model, nan_loss)


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_non_finite_gradients():
    model = tiny_lora_model("gpt2")
    base = loss_of(record_batch(3))
    with pytest.raises(NonFiniteError, match="non-finite gradient reaching LoRA adapter"):
        per_record_gradients(model, lambda m: _InfGrad.apply(base(m)))


@pytest.mark.parametrize("dim", [0, -3, 2.5, True])
def test_bad_projection_dim(dim):
    with pytest.raises(ValueError, match="projection dim must be a positive integer"):
        RandomProjector(dim=dim)


def test_dora_is_rejected_by_name():
    base = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4))
    model = get_peft_model(
        base, LoraConfig(r=2, target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True)
    )
    with pytest.raises(UnsupportedLoraError, match="DoRA"):
        per_record_gradients(model, loss_of(record_batch(2)))


def test_embedding_lora_is_rejected_by_name():
    base = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["wte", "c_attn"], fan_in_fan_out=True))
    with pytest.raises(UnsupportedLoraError, match="embedding"):
        per_record_gradients(model, loss_of(record_batch(2)))


def test_target_list_empty():
    with pytest.raises(ValueError, match="at least one target"):
        target_gradients(tiny_lora_model("gpt2"), [])


def test_projecting_a_wrong_size_gradient():
    from rlhf_influence import find_lora_layout

    layout = find_lora_layout(tiny_lora_model("gpt2"))
    with pytest.raises(ValueError, match="entries but the model's LoRA layout has"):
        RandomProjector(8).project(layout, torch.zeros(layout.num_params + 1))
