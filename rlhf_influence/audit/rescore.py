"""Score a behaviour chosen after training against a round's stored projected gradients.

The store keeps each round's records' gradients (randomly projected, seeded) and the LoRA
adapter at the round start. ``score_behaviour`` rebuilds the policy at that snapshot, takes
the gradient of the log-prob target log pi(response | prompt) there, projects it with the
same seed, and dots it with every stored record gradient: which records pushed the model
toward (positive) or away from (negative) saying ``response`` to ``prompt``.

With ``adam=True`` the scores are Adam-aware: a run that kept Adam's round-start moments
(``--iif_store_optimizer_state true``) has the behaviour's gradient multiplied by Adam's
preconditioner at the round start before it is projected, ``<P(S * grad f), P grad loss_i>``
estimating ``<S * grad f, grad loss_i>``: the direction Adam actually moved the weights along for
each record (LESS, Bergson), from the same stored vectors, nothing re-computed per record.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.gradients import target_gradients
from ..engine.influence import adam_preconditioner
from ..engine.lora import find_lora_layout
from ..engine.projection import store_projector
from ..engine.targets import LogProbTarget
from ..iif.algorithms import get_algorithm
from ..store import AttributionStore, StoreError, schema


class BeforeAdamStepError(StoreError):
    """An Adam-aware score asked of a round that starts before Adam's first step (no second moment yet)."""


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

    def score(self, round_index: int, prompt: str, response: str, adam: bool = False) -> list[ScoredRecord]:
        """Influence of every record of the round on log pi(response | prompt) at the round start
        (``adam``: Adam-aware, from the stored moments)."""
        return self.score_pairs(round_index, [prompt], [response], adam=adam)

    def adam_preconditioner(self, round_index: int) -> torch.Tensor | None:
        """Adam's preconditioner at round ``round_index``'s start, ``[D]`` in the layout's order, from
        the stored moments; None before Adam's first step (StoreError if the run kept no moments)."""
        return stored_adam_preconditioner(self.store, round_index, self.layout.param_names)

    def score_pairs(
        self, round_index: int, prompts: list[str], responses: list[str], adam: bool = False
    ) -> list[ScoredRecord]:
        """Influence of every record of the round on the summed log-probs of the (prompt, response)
        pairs at the round start: which records made these responses more likely. ``adam``: the
        behaviour's gradient preconditioned as Adam's next step would (StoreError before Adam's
        first step, where there is no second moment yet, and on a run that kept no moments)."""
        preconditioner = None
        if adam:
            preconditioner = self.adam_preconditioner(round_index)
            if preconditioner is None:
                raise BeforeAdamStepError(
                    f"round {round_index} starts before Adam's first step: there is no second moment to "
                    "precondition by yet, so its scores can only be raw (leave out --adam for it)"
                )
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
        if preconditioner is not None:
            target_grad = target_grad * preconditioner.to(target_grad)
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


def score_behaviour(path, round_index: int, prompt: str, response: str, adam: bool = False) -> list[ScoredRecord]:
    """Influence of every record of round ``round_index`` on log pi(response | prompt), from the store
    (``adam``: Adam-aware, see the module's note)."""
    return SnapshotScorer(path).score(round_index, prompt, response, adam=adam)


def stored_optimizer_state(store: AttributionStore, round_index: int) -> dict[str, torch.Tensor]:
    """Adam's stored state at a round's start: ``exp_avg/<name>``, ``exp_avg_sq/<name>``, ``step``,
    ``hyperparameters`` (lr, beta1, beta2, eps, weight_decay). StoreError if the run kept none."""
    if not store.manifest.optimizer_state:
        raise StoreError("the run stored no optimizer state (train with --iif_store_optimizer_state true)")
    return store.read_tensors(round_index, schema.OPTIMIZER)


def stored_adam_preconditioner(
    store: AttributionStore, round_index: int, param_names: list[str]
) -> torch.Tensor | None:
    """Adam's preconditioner at a round's start from its stored moments, ``[D]`` in the order of
    ``param_names`` (:func:`~rlhf_influence.engine.influence.adam_preconditioner`); None before
    Adam's first step. StoreError if the run kept no moments."""
    state = stored_optimizer_state(store, round_index)
    step = float(state["step"][0])
    if step < 1:
        return None
    _, _, beta2, eps, _ = state["hyperparameters"].tolist()
    missing = [name for name in param_names if f"exp_avg_sq/{name}" not in state]
    if missing:
        raise StoreError(f"round {round_index}: the stored optimizer state lacks {missing[0]}")
    v = torch.cat([state[f"exp_avg_sq/{name}"].flatten().float() for name in param_names])
    return adam_preconditioner(v, step, beta2, eps)


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
