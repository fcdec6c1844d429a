"""What both IIF trainers hand the attribution store, written once: the round-start adapter, the
files that rebuild the policy, and the records table's attribution columns."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from ..influence_filter import Scoring
from ..lora import canonical_name

# Base models up to this size are copied into the store (tiny and test models); larger ones are
# referenced by name, as loaded.
BASE_MODEL_STORE_LIMIT = 64 * 2**20


def adapter_snapshot(policy: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The policy's trainable LoRA weights now (gathered under ZeRO-3), on the CPU, in ``dtype``."""
    named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad and "lora_" in n]
    gather = nullcontext()
    if any(hasattr(p, "ds_id") for _, p in named):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    with gather:
        return {canonical_name(n): p.detach().to("cpu", dtype, copy=True).contiguous() for n, p in named}


def model_files(policy: nn.Module, tokenizer, adapter_name: str | None) -> dict:
    """What the store keeps so that a round's snapshot can be rebuilt after training."""
    base = policy.get_base_model()
    reference = getattr(base.config, "_name_or_path", "") or None
    sharded = any(hasattr(p, "ds_id") for p in base.parameters())
    size = sum(p.numel() * p.element_size() for p in base.parameters())
    small = not sharded and size <= BASE_MODEL_STORE_LIMIT
    return {
        "tokenizer": tokenizer,
        "peft_config": policy.peft_config[adapter_name or "default"],
        "base_model": base if small else None,
        "base_model_reference": reference,
    }


def attribution_columns(scorings: list[Scoring], records_per_process: int) -> dict[str, list]:
    """The records table's attribution columns over all processes' records (global order): the
    first scoring's influence, rank and kept flag, every scoring's, and the decision per process."""
    influence = [s.scores.tolist() for s in scorings]
    kept = [s.decision.keep.tolist() for s in scorings]
    n = len(influence[0])
    first = torch.tensor(influence[0])
    rank = torch.empty(n, dtype=torch.long)
    rank[torch.argsort(-torch.nan_to_num(first, nan=-math.inf), stable=True)] = torch.arange(1, n + 1)
    return {
        "record": list(range(n)),
        "process": [i // records_per_process for i in range(n)],
        "influence": influence[0],
        "rank": rank.tolist(),
        "kept": kept[0],
        "influence_by_scoring": [list(x) for x in zip(*influence, strict=True)],
        "kept_by_scoring": [list(x) for x in zip(*kept, strict=True)],
        "kept_on_each_process": scorings[0].keep_by_process.T.tolist(),
    }
