"""Targeted intervention: re-run one round's policy update without the records behind a target.

From the store: the policy at the round start (its stored adapter), the round's records (token
ids, sampling log-probs, advantages) and the run's PPO settings. The records are scored exactly
against a target at that snapshot (a behaviour, log pi(response | prompt), or the round's own
return target: the held-out samples it drew, or its buffer); then the round's PPO policy update
(clipped surrogate, mini-batches, AdamW, the run's epochs and learning rate) is re-run three
ways: on all records, without the k records that most raised the target, and without k random
records. If attribution is right, removing the top records moves the target least (or down) of
the three.

The value model takes no part (it is a separate network; advantages are fixed for the round),
and the optimizer starts from fresh moments in all three re-runs, so they are compared on equal
terms rather than against the original run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..capture import capture_factors
from ..gradients import target_gradients
from ..influence import scores_from_factors
from ..projection import RandomProjector
from ..store import StoreError
from ..targets import LogProbTarget, ReturnTarget, TokenWeightedLogProb, ppo_policy_loss
from .rescore import SnapshotScorer


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


class RoundReplay:
    """The stored round as tensors, and its PPO policy update, replayable on a subset of records."""

    def __init__(self, scorer: SnapshotScorer, round_index: int) -> None:
        self.scorer = scorer
        self.round = round_index
        settings = scorer.store.manifest.training
        if settings is None:
            raise StoreError("the run's manifest has no training settings; it predates replayable rounds")
        if settings.algorithm != "ppo":
            raise StoreError(
                f"replaying a {settings.algorithm.upper()} round is not supported; only PPO rounds"
            )
        self.settings = settings
        tensors = scorer.store.read_tensors(round_index, "batch")
        self.pad_id = settings.pad_token_id
        queries, responses = tensors["queries"].long(), tensors["responses"].long()
        self.context = queries.shape[1]
        self.query_responses = torch.cat([queries, responses], dim=1)
        self.attention_mask = self.query_responses != self.pad_id
        valid = tensors["padding_mask"] == 0
        self.response_mask = torch.nn.functional.pad(valid, (self.context, 0), value=False)
        self.advantages = torch.nn.functional.pad(tensors["advantages"], (self.context, 0))
        self.old_logprobs = torch.nn.functional.pad(tensors["logprobs"], (self.context, 0))
        self.temperature = scorer.temperature

    def __len__(self) -> int:
        return self.query_responses.shape[0]

    def _loss(self, idx, normaliser: float | None = None):
        def loss_fn(model):
            return ppo_policy_loss(
                model,
                self.query_responses[idx],
                self.attention_mask[idx],
                self.response_mask[idx],
                self.advantages[idx],
                old_logprobs=self.old_logprobs[idx],
                clip_range=self.settings.cliprange,
                normaliser=normaliser,
                temperature=self.temperature,
            )

        return loss_fn

    def return_target(self) -> ReturnTarget:
        """The return target this round was filtered against, as the trainer built it: the held-out
        samples drawn that round with their last-token advantages (``heldout_return``), or the
        round's own records with their per-token advantages (``buffer_return``)."""
        kind = self.scorer.store.manifest.target
        if kind == "buffer_return":
            return ReturnTarget.from_buffer(
                self.query_responses,
                self.attention_mask,
                self.response_mask,
                self.advantages,
                self.temperature,
            )
        try:
            tensors = self.scorer.store.read_tensors(self.round, "target")
        except StoreError:
            raise StoreError(
                f"round {self.round} has no held-out target samples (target.safetensors): the run predates "
                "storing them"
            ) from None
        queries, responses = tensors["queries"].long(), tensors["responses"].long()
        query_responses = torch.cat([queries, responses], dim=1)
        valid = tensors["padding_mask"] == 0
        response_mask = torch.nn.functional.pad(valid, (queries.shape[1], 0), value=False)
        return ReturnTarget.from_heldout(
            query_responses,
            query_responses != self.pad_id,
            response_mask,
            tensors["last_token_advantages"].float(),
            self.temperature,
        )

    def influence(self, target: TokenWeightedLogProb) -> torch.Tensor:
        """Exact influence of every record on ``target`` at the round start, ``[N]``."""
        return self.scores(target)[0]

    def scores(
        self, target: TokenWeightedLogProb, projectors: Sequence[RandomProjector] = ()
    ) -> list[torch.Tensor]:
        """``[exact, *projected]`` influence ``[N]`` on ``target`` at the round start: one
        forward+backward per micro-batch serves the exact score and every projector's estimate."""
        self.scorer.load_round(self.round)
        policy, layout = self.scorer.policy, self.scorer.layout
        v = target_gradients(policy, target, layout=layout)[None]
        normaliser = float(self.response_mask.sum()) / len(self) * self.settings.per_device_train_batch_size
        step = self.settings.per_device_train_batch_size
        parts: list[list[torch.Tensor]] = [[] for _ in range(1 + len(projectors))]
        for start in range(0, len(self), step):
            idx = torch.arange(start, min(len(self), start + step))
            factors = capture_factors(policy, self._loss(idx, normaliser), layout=layout)
            for part, projector in zip(parts, (None, *projectors), strict=True):
                part.append(scores_from_factors(factors, v, projector)[:, 0])
        return [torch.cat(part) for part in parts]

    def rerun(self, keep: np.ndarray, seed: int) -> None:
        """Reset to the round start, then run the round's PPO epochs on the ``keep`` records."""
        self.scorer.load_round(self.round)
        policy = self.scorer.policy
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.settings.learning_rate, weight_decay=0.0)
        rng = np.random.default_rng(seed)
        mini = self.settings.mini_batch_size
        micro = self.settings.per_device_train_batch_size
        for _ in range(self.settings.num_ppo_epochs):
            order = rng.permutation(keep)
            for start in range(0, len(order), mini):
                batch = order[start : start + mini]
                chunks = [batch[i : i + micro] for i in range(0, len(batch), micro)]
                for chunk in chunks:  # TRL's loss: masked mean per micro-batch, averaged
                    loss = self._loss(torch.as_tensor(chunk))(policy).sum() / len(chunks)
                    loss.backward()
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
        target = LogProbTarget.from_text(scorer.tokenizer, [prompt], [response])
    except ValueError as exc:
        raise StoreError(f"cannot score this behaviour: {exc}") from None
    target.temperature = scorer.temperature
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
