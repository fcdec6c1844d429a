"""Targeted intervention: re-run one round's policy update without the records behind a target.

From the store: the policy at the round start (its stored adapter), the round's records (token
ids, sampling log-probs, advantages) and the run's PPO, GRPO or RLOO settings. The records are scored
exactly against a target at that snapshot (a behaviour, log pi(response | prompt), or the round's
own return target: the held-out samples it drew, or its buffer) with the loss the trainer scored
them with (rlhf_influence.iif.losses); then the round's policy update (PPO: clipped surrogate,
mini-batches, the run's epochs; GRPO: its loss type over steps_per_generation slices, the run's
iterations; RLOO: its sequence-level loss over the same slices; AdamW at the run's learning rate) is re-run three ways: on all records, without the k records that most raised the target, and without k random
records. If attribution is right, removing the top records moves the target least (or down) of
the three.

The value model takes no part (it is a separate network; advantages are fixed for the round).
The optimizer starts from the moments the run had at the round start where the store keeps them
(``iif_store_optimizer_state``), else from fresh moments; either way the same in every re-run, so
they are compared on equal terms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..engine.gradients import target_gradients
from ..engine.influence import scores_from_factors
from ..engine.projection import RandomProjector
from ..engine.targets import LogProbTarget, ReturnTarget, TokenWeightedLogProb
from ..iif.algorithms import get_algorithm
from ..iif.records import ScoredRecords
from ..iif.scorer import RecordScorer
from ..iif.target_kinds import target_kind
from ..store import StoreError, schema
from .rescore import SnapshotScorer, stored_optimizer_state


@dataclass
class InterventionResult:
    round: int
    target: str  # what was traced: "log p(response | prompt)" or the round's return target
    prompt: str  # the behaviour's prompt and response ("" for the return target)
    response: str
    removed: int
    target_before: float  # the target's value at the round start
    target_all: float  # after re-running the round's update on every record
    target_without_top: float  # ... without the `removed` records most raising the target
    target_without_random: float  # ... without `removed` random records (mean over draws)
    removed_records: list[int] = field(default_factory=list)
    moments: str = "fresh"  # Adam's state the re-runs started from: "stored" (the run's) or "fresh"


class RoundReplay:
    """The stored round's records and its policy update (PPO's or GRPO's), replayable on a subset."""

    def __init__(self, scorer: SnapshotScorer, round_index: int) -> None:
        self.scorer = scorer
        self.round = round_index
        manifest = scorer.store.manifest
        settings = manifest.training
        if settings is None:
            raise StoreError("the run's manifest has no training settings; it predates replayable rounds")
        if settings.value_head == "shared":
            raise StoreError(
                "the run trained PPO's value head on the policy's own backbone (value_head shared): its update "
                "moved the LoRA weights by the value loss too, and the store keeps neither the head nor the value "
                "targets, so its rounds cannot be re-run (scores from the stored gradients still work)"
            )
        self.settings = settings
        self.algorithm = get_algorithm(settings.algorithm)
        self.temperature = scorer.temperature
        self.records = self._stored_records(schema.BATCH)
        self.loss = self.algorithm.record_loss(settings, self.temperature)  # the re-run: one process, all records
        self.record_scorer = RecordScorer(  # scores as the trainer scored them
            scorer.layout,
            self.algorithm.record_loss(settings, self.temperature, manifest.num_processes),
            target_kind(manifest.target),
            micro_batch_size=settings.per_device_train_batch_size,
            temperature=self.temperature,
        )

    def _stored_records(self, name: str) -> ScoredRecords:
        return self.scorer.store.read_records_tensors(
            self.round, name, self.settings.pad_token_id, self.algorithm.positions_from_mask
        )

    def __len__(self) -> int:
        return len(self.records)

    def return_target(self) -> ReturnTarget:
        """The return target this round was filtered against, as the trainer built it: the held-out
        samples drawn that round with their own advantages (``heldout_return``), or the round's
        own records with their per-token advantages (``buffer_return``)."""
        kind = self.record_scorer.kind
        if not kind.scores:
            raise StoreError(
                f"the run recorded no return target (iif_target {kind.name}): trace a behaviour with --prompt and "
                "--response"
            )
        if not kind.needs_heldout:  # the round's own records
            return self.record_scorer.return_target(self.records)
        try:
            target_records = self._stored_records(schema.TARGET)
        except StoreError:
            raise StoreError(
                f"round {self.round} has no held-out target samples (target.safetensors): the run predates "
                "storing them"
            ) from None
        return self.record_scorer.return_target(target_records)

    def influence(self, target: TokenWeightedLogProb) -> torch.Tensor:
        """Exact influence of every record on ``target`` at the round start, ``[N]``."""
        return self.scores(target)[0]

    def scores(
        self, target: TokenWeightedLogProb, projectors: Sequence[RandomProjector] = ()
    ) -> list[torch.Tensor]:
        """``[exact, *projected]`` influence ``[N]`` on ``target`` at the round start: one
        forward+backward per micro-batch serves the exact score and every projector's estimate."""
        self.scorer.load_round(self.round)
        policy = self.scorer.policy
        v = target_gradients(policy, target, layout=self.scorer.layout)[None]
        parts: list[list[torch.Tensor]] = [[] for _ in range(1 + len(projectors))]
        for factors in self.record_scorer.record_factors(policy, self.records):
            for part, projector in zip(parts, (None, *projectors), strict=True):
                part.append(scores_from_factors(factors, v, projector)[:, 0])
        return [torch.cat(part) for part in parts]

    @property
    def has_optimizer_state(self) -> bool:
        """Whether the store kept Adam's moments at this round's start (``iif_store_optimizer_state``)."""
        return self.scorer.store.manifest.optimizer_state

    @property
    def default_moments(self) -> str:
        """Adam's state a re-run starts from unless told: ``'stored'`` where the store keeps it, else ``'fresh'``."""
        return "stored" if self.has_optimizer_state else "fresh"

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """Adam's stored round-start state: ``exp_avg/<name>``, ``exp_avg_sq/<name>``, ``step``,
        ``hyperparameters`` (lr, beta1, beta2, eps, weight_decay)."""
        return stored_optimizer_state(self.scorer.store, self.round)

    def adam_preconditioner(self) -> torch.Tensor | None:
        """Adam's preconditioner at the round start, ``[D]`` in the layout's order, from the stored
        moments (:func:`~rlhf_influence.engine.influence.adam_preconditioner`); None before the first step."""
        return self.scorer.adam_preconditioner(self.round)

    def optimizer(self, moments: str = "stored") -> torch.optim.AdamW:
        """AdamW over the policy's trainable weights: with ``moments='stored'`` in the state the run had at
        the round start, with ``'fresh'`` new moments; at the round's stored hyperparameters (learning
        rate as scheduled, betas, eps, weight decay) where the store keeps them, else the run's learning rate."""
        params = {name: p for name, p in self.scorer.policy.named_parameters() if p.requires_grad}
        if moments not in ("stored", "fresh"):
            raise ValueError(f"moments must be 'stored' or 'fresh', got {moments!r}")
        if not self.has_optimizer_state:
            if moments == "stored":
                self.optimizer_state()  # says what the run lacks
            return torch.optim.AdamW(params.values(), lr=self.settings.learning_rate, weight_decay=0.0)
        state = self.optimizer_state()  # the round's hyperparameters either way: only the moments differ
        lr, beta1, beta2, eps, weight_decay = state["hyperparameters"].tolist()
        optimizer = torch.optim.AdamW(
            params.values(), lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay
        )
        if moments == "fresh":
            return optimizer
        step = float(state["step"][0])
        for name, param in params.items():
            if f"exp_avg/{name}" not in state:
                raise StoreError(f"round {self.round}: the stored optimizer state lacks {name}")
            optimizer.state[param] = {
                "step": torch.tensor(step),
                "exp_avg": state[f"exp_avg/{name}"].to(param),
                "exp_avg_sq": state[f"exp_avg_sq/{name}"].to(param),
            }
        return optimizer

    def rerun(self, keep: np.ndarray, seed: int, moments: str | None = None) -> None:
        """Reset to the round start, then run the round's optimisation on the ``keep`` records:
        PPO's epochs of mini-batches, or GRPO's and RLOO's iterations of ``steps_per_generation`` slices.
        ``moments``: Adam's ``'stored'`` round-start state or ``'fresh'`` moments (default: the
        stored ones where the store keeps them)."""
        self.scorer.load_round(self.round)
        policy = self.scorer.policy
        if moments is None:
            moments = self.default_moments
        optimizer = self.optimizer(moments)
        rng = np.random.default_rng(seed)
        kept_tokens = float(self.records.num_tokens()[torch.as_tensor(keep)].sum())
        for steps in self.algorithm.replay_steps(self.settings, keep, rng):
            for chunk in steps:
                part = self.records.select(torch.as_tensor(chunk))
                self.algorithm.chunk_loss(self.loss, policy, part, len(steps), kept_tokens).backward()
            optimizer.step()
            optimizer.zero_grad()


def _target_value(scorer: SnapshotScorer, target: TokenWeightedLogProb) -> float:
    with torch.no_grad():
        return float(target(scorer.policy).sum())


def _open_round(path, round_index: int, remove: int | None) -> tuple[RoundReplay, int]:
    """The round's replay and the checked number of records to remove (default: 10%, rounded up)."""
    replay = RoundReplay(SnapshotScorer(path), round_index)
    n = len(replay)
    remove = max(1, math.ceil(0.1 * n)) if remove is None else remove
    if not 0 < remove < n:
        raise StoreError(f"--remove must be between 1 and {n - 1} (the round has {n} records), got {remove}")
    return replay, remove


def counterfactual(
    replay: RoundReplay,
    target: TokenWeightedLogProb,
    description: str,
    remove: int,
    seed: int = 0,
    random_draws: int = 3,
    prompt: str = "",
    response: str = "",
) -> InterventionResult:
    """``target`` at the round start, after the round's update on all records, without the top
    ``remove`` records for it, and without ``remove`` random records (mean over draws)."""
    scorer, n = replay.scorer, len(replay)
    scorer.load_round(replay.round)
    before = _target_value(scorer, target)
    influence = replay.influence(target)
    top = torch.argsort(influence, descending=True)[:remove].numpy()
    everyone = np.arange(n)

    replay.rerun(everyone, seed)
    after_all = _target_value(scorer, target)
    replay.rerun(np.setdiff1d(everyone, top), seed)
    after_top = _target_value(scorer, target)
    rng = np.random.default_rng(seed + 1)
    random_values = []
    for _ in range(random_draws):
        dropped = rng.choice(n, size=remove, replace=False)
        replay.rerun(np.setdiff1d(everyone, dropped), seed)
        random_values.append(_target_value(scorer, target))
    return InterventionResult(
        round=replay.round,
        target=description,
        prompt=prompt,
        response=response,
        removed=remove,
        target_before=before,
        target_all=after_all,
        target_without_top=after_top,
        target_without_random=float(np.mean(random_values)),
        removed_records=sorted(int(i) for i in top),
        moments=replay.default_moments,
    )


def intervene(
    path,
    round_index: int,
    prompt: str,
    response: str,
    remove: int | None = None,
    seed: int = 0,
    random_draws: int = 3,
) -> InterventionResult:
    """Re-run round ``round_index`` without the records that most raised log pi(response | prompt)."""
    replay, remove = _open_round(path, round_index, remove)
    scorer = replay.scorer
    try:
        target = LogProbTarget.from_text(scorer.tokenizer, [prompt], [response], temperature=scorer.temperature,
                                         positions_from_mask=scorer.positions_from_mask)  # fmt: skip
    except ValueError as exc:
        raise StoreError(f"cannot score this behaviour: {exc}") from None
    description = f"log p({response!r} | {prompt!r})"
    return counterfactual(replay, target, description, remove, seed, random_draws, prompt, response)


def intervene_return(
    path, round_index: int, remove: int | None = None, seed: int = 0, random_draws: int = 3
) -> InterventionResult:
    """Re-run round ``round_index`` without the records that most raised its own return target
    (the records IIF keeps first), against as many random ones."""
    replay, remove = _open_round(path, round_index, remove)
    target = replay.return_target()
    kind = replay.scorer.store.manifest.target
    description = f"{kind} (mean advantage-weighted log-prob over {target.input_ids.shape[0]} samples)"
    return counterfactual(replay, target, description, remove, seed, random_draws)
