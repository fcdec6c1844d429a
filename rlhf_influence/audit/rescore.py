"""Score a behaviour chosen after training against a round's stored projected gradients.

The store keeps each round's records' gradients (randomly projected, seeded) and the LoRA
adapter at the round start. ``score_behaviour`` rebuilds the policy at that snapshot, takes
the gradient of the log-prob target log pi(response | prompt) there, projects it with the
same seed, and dots it with every stored record gradient: which records pushed the model
toward (positive) or away from (negative) saying ``response`` to ``prompt``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.gradients import target_gradients
from ..engine.lora import find_lora_layout
from ..engine.projection import store_projector
from ..engine.targets import LogProbTarget
from ..iif.algorithms import get_algorithm
from ..store import AttributionStore, StoreError, schema


@dataclass(frozen=True)
class ScoredRecord:
    record: int
    prompt: str
    response: str
    reward: float
    kept: bool
    influence: float


class SnapshotScorer:
    """Scores behaviours against the stored rounds of one run; the policy is rebuilt once and
    each round's round-start adapter is loaded into it on demand."""

    def __init__(self, path) -> None:
        self.store = AttributionStore.open(path)
        self.rounds = self.store.rounds()
        spec = self.store.manifest.stored_gradients
        if spec is None:
            raise StoreError(
                "the run stored no gradients (iif_store_projection_dim=0); only its own scores exist"
            )
        self.spec = spec
        self.policy, self.tokenizer = _rebuild_policy(self.store)
        self.layout = find_lora_layout(self.policy)
        self.projector = store_projector(spec.dim, spec.sketch_dim, spec.seed)  # as the trainer wrote them
        self.temperature = self.store.manifest.temperature
        self.positions_from_mask = get_algorithm(self.store.manifest.algorithm).positions_from_mask

    def load_round(self, round_index: int) -> None:
        """Put round ``round_index``'s round-start adapter into the policy."""
        if round_index not in self.rounds:
            span = f"{self.rounds[0]}..{self.rounds[-1]}" if self.rounds else "none"
            raise StoreError(f"round {round_index} is not in the store (complete rounds: {span})")
        adapter = self.store.read_tensors(round_index, schema.ADAPTER)
        params = dict(self.policy.named_parameters())
        missing = [name for name in adapter if name not in params]
        if missing:
            raise StoreError(
                f"round {round_index}: stored adapter weights {missing[:3]} do not fit the rebuilt policy"
            )
        with torch.no_grad():
            for name, value in adapter.items():
                params[name].copy_(value)  # a bfloat16 snapshot is widened to the policy's dtype

    def score(self, round_index: int, prompt: str, response: str) -> list[ScoredRecord]:
        """Influence of every record of the round on log pi(response | prompt) at the round start."""
        return self.score_pairs(round_index, [prompt], [response])

    def score_pairs(self, round_index: int, prompts: list[str], responses: list[str]) -> list[ScoredRecord]:
        """Influence of every record of the round on the summed log-probs of the (prompt, response)
        pairs at the round start: which records made these responses more likely."""
        self.load_round(round_index)
        gradients = self.store.read_tensors(round_index, schema.GRADIENTS)["projected"].float()
        table = self.store.read_records(round_index).to_pydict()
        if gradients.shape[0] != len(table["record"]):
            raise StoreError(
                f"round {round_index}: gradients.safetensors has {gradients.shape[0]} rows for "
                f"{len(table['record'])} records"
            )
        if self.projector.output_size(self.layout) != gradients.shape[1]:
            raise StoreError(
                f"round {round_index}: stored gradients have {gradients.shape[1]} entries per record, the "
                f"rebuilt policy projects to {self.projector.output_size(self.layout)}"
            )
        try:
            target = LogProbTarget.from_text(self.tokenizer, list(prompts), list(responses),
                                             temperature=self.temperature, positions_from_mask=self.positions_from_mask)  # fmt: skip
        except ValueError as exc:
            raise StoreError(f"cannot score this behaviour: {exc}") from None
        target_grad = target_gradients(self.policy, target, layout=self.layout).float()
        influence = -(gradients @ self.projector.project(self.layout, target_grad))
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


def score_behaviour(path, round_index: int, prompt: str, response: str) -> list[ScoredRecord]:
    """Influence of every record of round ``round_index`` on log pi(response | prompt), from the store."""
    return SnapshotScorer(path).score(round_index, prompt, response)


def _rebuild_policy(store: AttributionStore):
    """The run's LoRA policy (adapter weights still to be loaded) and tokenizer, eval mode, CPU."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = store.read_model_info()
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
    for module in policy.modules():  # as during training: no dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    policy.eval()
    return policy, tokenizer
