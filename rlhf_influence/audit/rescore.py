"""Score a behaviour chosen after training against a round's stored projected gradients.

The store keeps each round's records' gradients (randomly projected, seeded) and the LoRA
adapter at the round start. ``score_behaviour`` rebuilds the policy at that snapshot, takes
the gradient of the log-prob target log pi(response | prompt) there, projects it with the
same seed, and dots it with every stored record gradient: which records pushed the model
toward (positive) or away from (negative) saying ``response`` to ``prompt``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..gradients import target_gradients
from ..lora import find_lora_layout
from ..projection import RandomProjector
from ..store import AttributionStore, StoreError
from ..targets import LogProbTarget


@dataclass(frozen=True)
class ScoredRecord:
    record: int
    prompt: str
    response: str
    reward: float
    kept: bool
    influence: float


def load_round_policy(store: AttributionStore, round_index: int):
    """(policy with round ``round_index``'s start adapter, tokenizer), in eval mode on the CPU."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info_path = store.path / "model.json"
    if not info_path.is_file():
        raise StoreError(f"{store.path} keeps no model files (model.json); the run predates stored snapshots")
    info = json.loads(info_path.read_text())
    if info.get("base_model_saved"):
        source = str(store.path / "base_model")
    elif info.get("base_model_reference"):
        source = info["base_model_reference"]
    else:
        raise StoreError("the run's base model was neither saved nor named; its snapshots cannot be rebuilt")
    try:
        base = AutoModelForCausalLM.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(store.path / "tokenizer")
        lora = LoraConfig.from_pretrained(store.path / "adapter")
    except Exception as exc:
        raise StoreError(f"cannot rebuild the policy from {source!r}: {type(exc).__name__}: {exc}") from None
    lora.inference_mode = False
    policy = get_peft_model(base, lora)
    adapter = store.read_tensors(round_index, "adapter")
    params = dict(policy.named_parameters())
    missing = [name for name in adapter if name not in params]
    if missing:
        raise StoreError(
            f"round {round_index}: stored adapter weights {missing[:3]} do not fit the rebuilt policy"
        )
    with torch.no_grad():
        for name, value in adapter.items():
            params[name].copy_(value)
    for module in policy.modules():  # as during training: no dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    policy.eval()
    return policy, tokenizer


def score_behaviour(path, round_index: int, prompt: str, response: str) -> list[ScoredRecord]:
    """Influence of every record of round ``round_index`` on log pi(response | prompt), from the store."""
    store = AttributionStore.open(path)
    rounds = store.rounds()
    if round_index not in rounds:
        span = f"{rounds[0]}..{rounds[-1]}" if rounds else "none"
        raise StoreError(f"round {round_index} is not in the store (complete rounds: {span})")
    spec = store.manifest.get("stored_gradients")
    if not spec:
        raise StoreError(
            "the run stored no gradients (iif_store_projection_dim=0); only its own scores exist"
        )
    gradients = store.read_tensors(round_index, "gradients")["projected"].float()
    policy, tokenizer = load_round_policy(store, round_index)
    layout = find_lora_layout(policy)
    projector = RandomProjector(spec["dim"], seed=spec["seed"])
    if projector.output_size(layout) != gradients.shape[1]:
        raise StoreError(
            f"round {round_index}: stored gradients have {gradients.shape[1]} entries per record, the rebuilt "
            f"policy projects to {projector.output_size(layout)}"
        )
    try:
        target = LogProbTarget.from_text(tokenizer, [prompt], [response])
    except ValueError as exc:
        raise StoreError(f"cannot score this behaviour: {exc}") from None
    target.temperature = store.manifest.get("temperature", 1.0)
    target_grad = target_gradients(policy, target, layout=layout).float()
    influence = -(gradients @ projector.project(layout, target_grad))
    table = store.read_records(round_index).to_pydict()
    return [
        ScoredRecord(
            table["record"][i],
            table["prompt"][i],
            table["response"][i],
            table["reward"][i],
            table["kept"][i],
            float(influence[i]),
        )
        for i in range(len(table["record"]))
    ]
