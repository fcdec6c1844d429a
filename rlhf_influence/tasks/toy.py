"""Tiny, offline building blocks: a word-level tokenizer and small LoRA language models.

Nothing here touches a model hub. They make the demo, the tests and the benchmarks run in
seconds on a laptop CPU; real jobs load real models with transformers.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

TOY_WORDS = (
    "the a movie film story plot actor actress music scene ending book show it this that was is "
    "felt seemed and but so very really quite too not great good fun lovely wonderful brilliant "
    "bad boring awful dull terrible slow long short loud quiet funny sad dark bright i we they "
    "liked hated watched saw loved found thought of in on with at for to"
).split()

SPECIAL_TOKENS = ("<pad>", "<unk>", "<eos>")


def word_tokenizer(words=TOY_WORDS, padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer built locally (ids: <pad>=0, <unk>=1, <eos>=2)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<eos>",
        padding_side=padding_side,
    )


def _toy_config(vocab_size: int, arch: str, hidden: int, layers: int, heads: int, max_positions: int):
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_positions,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=2,
            eos_token_id=2,
            pad_token_id=0,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max_positions,
            bos_token_id=2,
            eos_token_id=2,
            pad_token_id=0,
        )
    raise ValueError(f"unknown toy architecture {arch!r}; use 'gpt2' or 'llama'")


def _from_config(
    auto_class, vocab_size, arch, hidden, layers, heads, max_positions, seed, dtype, **config_overrides
):
    torch.manual_seed(seed)
    config = _toy_config(vocab_size, arch, hidden, layers, heads, max_positions)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    return auto_class.from_config(config, dtype=dtype)


def tiny_causal_lm(
    vocab_size: int,
    arch: str = "gpt2",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A small randomly initialised causal LM built from a config (GPT-2 or Llama)."""
    return _from_config(
        AutoModelForCausalLM, vocab_size, arch, hidden, layers, heads, max_positions, seed, dtype
    )


def tiny_scalar_head_model(
    vocab_size: int,
    arch: str = "gpt2",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A small sequence-classification model with one output: a value or reward model."""
    return _from_config(
        AutoModelForSequenceClassification,
        vocab_size,
        arch,
        hidden,
        layers,
        heads,
        max_positions,
        seed,
        dtype,
        num_labels=1,
    )


def toy_lora_config(arch: str = "gpt2", r: int = 8, init_lora_weights: bool = True) -> LoraConfig:
    """LoRA on attention and MLP of the toy models."""
    modules = (
        ["c_attn", "c_proj", "c_fc"]
        if arch == "gpt2"
        else ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    )
    return LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=modules,
        lora_dropout=0.0,
        fan_in_fan_out=arch == "gpt2",
        init_lora_weights=init_lora_weights,
        task_type="CAUSAL_LM",
    )


def tiny_lora_policy(vocab_size: int, arch: str = "gpt2", seed: int = 0, **kwargs):
    """A toy causal LM wrapped with random (non-zero) LoRA adapters, ready for attribution."""
    model = tiny_causal_lm(vocab_size, arch=arch, seed=seed, **kwargs)
    return get_peft_model(model, toy_lora_config(arch, init_lora_weights=False))
