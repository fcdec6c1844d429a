"""Tiny models built from configs in seconds (nothing is downloaded) and batches of records."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

VOCAB = 64

ARCHS = {
    "gpt2": (
        lambda: GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4),
        ["c_attn", "c_proj", "c_fc"],  # GPT-2's Conv1D: attention and MLP
    ),
    "llama": (
        lambda: LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        ),
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "qwen2": (
        lambda: Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        ),
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
}


def tiny_lora_model(
    arch: str = "gpt2",
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    r: int = 4,
    lora_dropout: float = 0.0,
    lora_bias: bool = False,
    config=None,
    target_modules=None,
):
    """A tiny causal LM from a config with random (non-zero) LoRA adapters, in eval mode."""
    torch.manual_seed(seed)
    make_config, modules = ARCHS[arch]
    model = AutoModelForCausalLM.from_config(config or make_config(), dtype=dtype)
    lora = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=target_modules or modules,
        lora_dropout=lora_dropout,
        lora_bias=lora_bias,
        init_lora_weights=False,  # B != 0, so both A and B get gradients
        fan_in_fan_out=arch == "gpt2",
    )
    model = get_peft_model(model, lora)
    model.to(dtype)
    model.eval()
    return model


def record_batch(
    n: int = 5, prompt_lens=None, response_lens=None, *, padding_side: str = "right", seed: int = 0
):
    """Token ids, attention mask and response mask for records of mixed prompt/response lengths."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = prompt_lens or [int(x) for x in torch.randint(2, 6, (n,), generator=g)]
    response_lens = response_lens or [int(x) for x in torch.randint(2, 7, (n,), generator=g)]
    width = max(p + r for p, r in zip(prompt_lens, response_lens, strict=True))
    input_ids = torch.zeros(n, width, dtype=torch.long)
    attention_mask = torch.zeros(n, width, dtype=torch.long)
    response_mask = torch.zeros(n, width, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens, strict=True)):
        start = width - (p + r) if padding_side == "left" else 0
        input_ids[i, start : start + p + r] = torch.randint(1, VOCAB, (p + r,), generator=g)
        attention_mask[i, start : start + p + r] = 1
        response_mask[i, start + p : start + p + r] = True
    return input_ids, attention_mask, response_mask


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def brute_force_per_record(model, loss_fn, seed: int | None = None) -> torch.Tensor:
    """Reference: one autograd.grad per record, over the trainable parameters."""
    params = trainable(model)
    n = loss_fn(model).shape[0]
    rows = []
    for i in range(n):
        if seed is not None:
            torch.manual_seed(seed)
        loss = loss_fn(model)[i]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).flatten()
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(params=["gpt2", "llama", "qwen2"])
def arch(request):
    return request.param


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    for auto in (AutoModelForCausalLM, AutoModelForSequenceClassification):
        monkeypatch.setattr(auto, "from_config", refuse)
        monkeypatch.setattr(auto, "from_pretrained", refuse)
