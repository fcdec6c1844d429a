"""IIFPPOTrainer: TRL's PPOTrainer that scores every rollout record and filters harmful ones.

A round reads as the steps of :meth:`IIFPPOTrainer.train`:

    rollout -> rewards and advantages -> target -> [score -> filter -> PPO epoch] x epochs
    -> log -> store

Everything PPO does (generation, KL-penalised rewards, GAE, whitening, clipped policy and value
losses, the missing-EOS penalty) keeps TRL 1.12's semantics; with ``iif_drop_fraction=0`` the
weights after training equal TRL's own PPOTrainer's. Influence is the attribution engine's:
each record's policy-loss gradient over the policy's LoRA weights, dotted with a target's
gradient, from one forward and one backward per micro-batch.
"""

from __future__ import annotations

import gc
import math
import os
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from accelerate.utils import gather_object
from torch import nn
from transformers import GenerationConfig

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl.experimental.ppo import PPOTrainer
from trl.experimental.ppo.ppo_trainer import (
    INVALID_LOGPROB,
    batch_generation,
    forward,
    masked_mean,
    masked_whiten,
    truncate_response,
)
from trl.experimental.utils import first_true_indices, get_reward
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import selective_log_softmax

from ..capture import capture_factors
from ..errors import NoLoraError
from ..filtering import FilterDecision, iif_keep_mask, plan_epoch, random_keep_mask
from ..influence import scores_from_factors
from ..lora import canonical_name, find_lora_layout
from ..projection import RandomProjector, SketchedProjector
from ..records import RolloutBatch
from ..store import AttributionStore
from ..targets import ReturnTarget, ppo_policy_loss
from .config import IIFPPOConfig
from .rewards import RewardFunction, as_reward_module

# Base models up to this size are copied into the store (tiny and test models); larger ones are
# referenced by name, as loaded.
BASE_MODEL_STORE_LIMIT = 64 * 2**20

PPO_STATS = ("approxkl", "pg_clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio")


@dataclass
class Samples:
    """Prompts, prompt+response token ids and the sampling logits of one generation."""

    queries: torch.Tensor  # [n, context]
    query_responses: torch.Tensor  # [n, context + response]
    logits: torch.Tensor  # [n, response, vocab], temperature applied


@dataclass
class EpochScores:
    """Influence of this process's records before one epoch, and the global decision."""

    scores: torch.Tensor  # [N] every process's records, in global order (process-major)
    decision: FilterDecision  # over all processes' records
    keep_local: np.ndarray  # bool [n]
    keep_by_process: torch.Tensor  # bool [world, N]: the decision as each process made it
    seconds: float
    projected: torch.Tensor | None = None  # [n, D'] this process's records, for the store


class PhaseTimer:
    """Wall time per named phase of a round, logged as time/<phase>_seconds."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[phase] += time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{phase}_seconds": value for phase, value in self.seconds.items()}


class IIFPPOTrainer(PPOTrainer):
    """PPO with Iterative Influence-based Filtering, a drop-in for TRL's ``PPOTrainer``.

    Takes TRL's arguments plus ``target_dataset`` (held-out prompts, tokenised like
    ``train_dataset``) for the held-out return target. ``reward_model`` may be a
    sequence-classification model or a callable ``f(prompts, completions) -> list[float]``.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "ppo", "iif", "rlhf-influence"]
    _name = "IIF-PPO"

    def __init__(
        self,
        args: IIFPPOConfig,
        processing_class,
        model: nn.Module,
        ref_model: nn.Module | None,
        reward_model,
        train_dataset,
        value_model: nn.Module,
        target_dataset=None,
        data_collator=None,
        eval_dataset=None,
        optimizers=(None, None),
        callbacks=None,
        peft_config=None,
    ) -> None:
        if not isinstance(args, IIFPPOConfig):
            raise TypeError(f"args must be an IIFPPOConfig, got {type(args).__name__}")
        self.iif_target = args.iif_target or (
            "heldout_return" if target_dataset is not None else "buffer_return"
        )
        if self.iif_target == "heldout_return" and target_dataset is None:
            raise ValueError("iif_target='heldout_return' needs a target_dataset of held-out prompts")
        if target_dataset is not None and "input_ids" not in target_dataset.column_names:
            raise ValueError("target_dataset must be tokenised like train_dataset (an 'input_ids' column)")
        _check_policy_has_lora(model, peft_config)
        if peft_config is not None:  # wrapped here, as TRL would, but in the dtype ZeRO-3 needs
            model, peft_config = _with_lora(model, peft_config, args), None
        reward_model = as_reward_module(reward_model)
        _check_reward_model(reward_model)
        with _mixed_precision_from(args):  # TRL's PPOTrainer builds its Accelerator without it
            super().__init__(
                args=args,
                processing_class=processing_class,
                model=model,
                ref_model=ref_model,
                reward_model=reward_model,
                train_dataset=train_dataset,
                value_model=value_model,
                data_collator=data_collator,
                eval_dataset=eval_dataset,
                optimizers=optimizers,
                callbacks=callbacks,
                peft_config=peft_config,
            )
        if len(self.dataloader) == 0:  # PPOTrainer would loop forever looking for a first batch
            raise ValueError(
                f"train_dataset has {len(train_dataset)} prompts per process, fewer than one round's "
                f"{args.local_batch_size} (per_device_train_batch_size x gradient_accumulation_steps)"
            )
        self.target_dataset = target_dataset
        self.layout = find_lora_layout(self.policy_model)
        self.projector = (
            RandomProjector(args.iif_projection_dim, seed=args.iif_projection_seed)
            if args.iif_projection_dim
            else None
        )
        self.store = AttributionStore(args.attribution_dir) if args.iif_store and args.iif_enabled else None
        if self.store is not None and self.accelerator.is_main_process:
            removed = self.store.remove_stale_temporaries()
            if removed:
                warnings.warn(
                    f"removed {len(removed)} half-written round(s) that a killed run left in {self.store.path}: "
                    + ", ".join(removed),
                    stacklevel=2,
                )
        self.store_projector: RandomProjector | SketchedProjector | None = None
        if self.store is not None and args.iif_store_projection_dim:
            side_dim, seed = args.iif_store_projection_dim, args.iif_projection_seed
            self.store_projector = (
                SketchedProjector(args.iif_store_sketch_dim, side_dim=side_dim, seed=seed)
                if args.iif_store_sketch_dim
                else RandomProjector(side_dim, seed=seed)
            )
        self._store_dtype = getattr(torch, args.iif_store_dtype)
        self.iif_history: list[dict] = []  # per-round summaries, also written to the store
        self._scorings = 0  # seeds the random-filter control identically on every process

    # ------------------------------------------------------------------ helpers around TRL's wrapper
    @property
    def unwrapped(self) -> nn.Module:
        """The policy-and-value wrapper without DDP / DeepSpeed around it.

        Cached per wrapped object: accelerate's unwrap walks the module tree (about 5 ms on the toy
        model, called a dozen times a round)."""
        model = self.model
        if getattr(self, "_unwrapped_of", None) is not model:
            self._unwrapped = self.accelerator.unwrap_model(model)
            self._unwrapped_of = model
        return self._unwrapped

    @contextmanager
    def null_ref_context(self):
        """The reference policy: the LoRA policy with its adapter disabled (or the ref adapter).

        TRL 1.12 reaches ``self.model.policy`` on the DDP wrapper, which has no ``policy``; this
        unwraps first.
        """
        policy = self.unwrapped.policy
        use_disable = self.is_peft_model and not self.ref_adapter_name
        with policy.disable_adapter() if use_disable else nullcontext():
            if self.ref_adapter_name:
                policy.set_adapter(self.ref_adapter_name)
            yield
            if self.ref_adapter_name:
                policy.set_adapter(self.model_adapter_name or "default")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        wrapped = self.model
        self.model = self.unwrapped  # so that TRL finds .policy under DDP too
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self.model = wrapped

    # ------------------------------------------------------------------ the training loop
    def train(self) -> None:
        args = self.args
        self._begin_training()
        batches = self._repeat(self.dataloader)
        start = time.time()
        for round_index in range(1, args.num_total_batches + 1):
            self.state.episode += args.batch_size
            queries = next(batches)["input_ids"].to(self.accelerator.device)
            timer = PhaseTimer(self.accelerator.device)

            heldout_samples = None
            with timer("rollout"):
                if self._heldout_sampled_with_rollout:
                    heldout = self._heldout_queries(round_index).to(queries.device)
                    samples, heldout_samples = self.sample_with_heldout(queries, heldout)
                else:
                    samples = self.sample(queries)
                batch = self.evaluate_samples(samples)
                self.compute_rewards_and_advantages(batch)
            target_batch = None
            if args.iif_enabled:
                with timer("target_sampling"):
                    target_batch = self.build_target_batch(batch, round_index, heldout_samples)
            del samples, heldout_samples  # the sampling logits: [n, response, vocab]

            stats: dict[str, list[float]] = defaultdict(list)
            epochs: list[EpochScores] = []
            snapshot = self.adapter_snapshot() if self.store is not None else None
            for epoch in range(args.num_ppo_epochs):
                if args.iif_enabled and (epoch == 0 or args.iif_schedule == "epoch"):
                    keep_gradients = epoch == 0 and self.store_projector is not None
                    with timer("scoring"):
                        epochs.append(
                            self.score_and_filter(batch, target_batch, keep_gradients, round_start=epoch == 0)
                        )
                keep_local = epochs[-1].keep_local if epochs else None  # None: plain PPO keeps all
                with timer("optimisation"):
                    self.ppo_epoch(batch, keep_local, stats)

            metrics = {**self.round_metrics(batch, stats, epochs, start), **timer.metrics()}
            self.store_round(round_index, batch, epochs, metrics, snapshot, target_batch)
            self._end_round(metrics)
        self._end_training()

    # ------------------------------------------------------------------ step 1: rollout
    @torch.no_grad()
    def rollout(self, queries: torch.Tensor) -> RolloutBatch:
        """Sample responses and compute log-probs, reference log-probs, values and rewards."""
        return self.evaluate_samples(self.sample(queries))

    @torch.no_grad()
    def sample(self, queries: torch.Tensor, chunk_size: int | None = None) -> Samples:
        """Responses to ``queries`` from the current policy, with the sampling logits, generated in
        chunks of ``local_rollout_forward_batch_size`` prompts (or ``chunk_size``)."""
        args = self.args
        with unwrap_model_for_generation(
            self.model,
            self.accelerator,
            gather_deepspeed3_params=args.ds3_gather_for_generation,
            generation_kwargs=self._generation_kwargs(),
        ) as unwrapped:
            query_responses, logits = batch_generation(
                unwrapped.policy,
                queries,
                chunk_size or args.local_rollout_forward_batch_size,
                self.processing_class.pad_token_id,
                self._generation_config(),
            )
        return Samples(queries, query_responses, logits)

    @torch.no_grad()
    def sample_with_heldout(
        self, queries: torch.Tensor, heldout_queries: torch.Tensor
    ) -> tuple[Samples, Samples]:
        """The round's prompts and the held-out target's prompts sampled in one batched generation.

        Token by token generation costs little more for more prompts at once (on a GPU almost
        nothing; 5.2 s instead of 2 x 3.7 s for 16 + 16 SmolLM2 prompts on a 2-core CPU), so the
        held-out prompts join the round's generation chunks: each chunk takes its share of them.
        Both sets are left-padded to one width for the call and cut back after it.
        """
        pad_id = self.processing_class.pad_token_id
        width = max(queries.shape[1], heldout_queries.shape[1])
        step = self.args.local_rollout_forward_batch_size
        share = math.ceil(len(heldout_queries) / math.ceil(len(queries) / step))
        both = torch.cat(
            [
                torch.nn.functional.pad(q, (width - q.shape[1], 0), value=pad_id)
                for q in (queries, heldout_queries)
            ]
        )
        together = self.sample(both, chunk_size=step + share)
        n = len(queries)
        train_columns = slice(width - queries.shape[1], None)
        heldout_columns = slice(width - heldout_queries.shape[1], None)
        return (
            Samples(queries, together.query_responses[:n, train_columns], together.logits[:n]),
            Samples(heldout_queries, together.query_responses[n:, heldout_columns], together.logits[n:]),
        )

    @torch.no_grad()
    def evaluate_samples(self, samples: Samples) -> RolloutBatch:
        """Log-probs, reference log-probs, values and rewards of sampled responses: a rollout batch."""
        args = self.args
        pad_id = self.processing_class.pad_token_id
        queries, query_responses, sampling_logits = samples.queries, samples.query_responses, samples.logits
        context_length = queries.shape[1]
        parts = defaultdict(list)
        step = args.local_rollout_forward_batch_size
        for start in range(0, queries.shape[0], step):
            query = queries[start : start + step]
            query_response = query_responses[start : start + step]
            response = query_response[:, context_length:]
            parts["logprobs"].append(selective_log_softmax(sampling_logits[start : start + step], response))
            parts["ref_logprobs"].append(self._reference_logprobs(query_response, response, context_length))

            postprocessed = response
            if self.stop_token_id is not None:
                postprocessed = truncate_response(self.stop_token_id, pad_id, response)
            parts["postprocessed_responses"].append(postprocessed)
            parts["sequence_lengths"].append(first_true_indices(postprocessed == pad_id) - 1)

            value_model = self.unwrapped.value_model
            full_value, _, _ = get_reward(value_model, query_response, pad_id, context_length)
            parts["values"].append(full_value[:, context_length - 1 : -1].squeeze(-1))
            parts["scores"].append(self._reward(query, postprocessed))
        del sampling_logits
        merged = {k: torch.cat(v, 0) for k, v in parts.items()}

        if args.missing_eos_penalty is not None:
            has_eos = torch.any(
                merged["postprocessed_responses"] == self.processing_class.eos_token_id, dim=-1
            )
            merged["scores"][~has_eos] -= args.missing_eos_penalty

        response_length = query_responses.shape[1] - context_length
        positions = torch.arange(response_length, device=queries.device).repeat(queries.shape[0], 1)
        padding_mask = positions > merged["sequence_lengths"].unsqueeze(1)
        padding_mask_p1 = positions > (merged["sequence_lengths"] + 1).unsqueeze(1)
        return RolloutBatch(
            queries=queries,
            query_responses=query_responses,
            responses=query_responses[:, context_length:],
            postprocessed_responses=merged["postprocessed_responses"],
            logprobs=torch.masked_fill(merged["logprobs"], padding_mask, INVALID_LOGPROB),
            ref_logprobs=torch.masked_fill(merged["ref_logprobs"], padding_mask, INVALID_LOGPROB),
            values=torch.masked_fill(merged["values"], padding_mask_p1, 0),
            scores=merged["scores"],
            sequence_lengths=merged["sequence_lengths"],
            padding_mask=padding_mask,
            padding_mask_p1=padding_mask_p1,
        )

    def _reference_logprobs(self, query_response, response, context_length) -> torch.Tensor:
        pad_id = self.processing_class.pad_token_id
        if self.ref_model is None:
            with self.null_ref_context():
                ref_output = forward(self.unwrapped.policy, query_response, pad_id)
        else:
            ref_output = forward(self.ref_model, query_response, pad_id)
        ref_logits = ref_output.logits[:, context_length - 1 : -1]
        ref_logits /= self.args.temperature + 1e-7
        return selective_log_softmax(ref_logits, response)

    def _reward(self, query: torch.Tensor, postprocessed: torch.Tensor) -> torch.Tensor:
        if isinstance(self._reward_module, RewardFunction):
            prompts = self.processing_class.batch_decode(query, skip_special_tokens=True)
            completions = self.processing_class.batch_decode(postprocessed, skip_special_tokens=True)
            return self._reward_module(prompts, completions).to(query.device)
        pad_id = self.processing_class.pad_token_id
        _, score, _ = get_reward(
            self.reward_model, torch.cat((query, postprocessed), 1), pad_id, query.shape[1]
        )
        return score

    @property
    def _reward_module(self) -> nn.Module:
        return getattr(self.reward_model, "module", self.reward_model)

    # ------------------------------------------------------------------ step 2: rewards and advantages
    @torch.no_grad()
    def compute_rewards_and_advantages(self, batch: RolloutBatch) -> None:
        """KL-penalised per-token rewards, GAE advantages and returns; advantages whitened."""
        args = self.args
        log_ratio = batch.ref_logprobs - batch.logprobs
        kl = -log_ratio if args.kl_estimator == "k1" else (log_ratio.exp() - 1) - log_ratio
        batch.kl = kl
        batch.non_score_reward = -args.kl_coef * kl
        rewards = batch.non_score_reward.clone()
        rows = torch.arange(rewards.size(0), device=rewards.device)
        last = batch.sequence_lengths + 1
        last = torch.where(last < rewards.size(1), last, batch.sequence_lengths)
        rewards[rows, last] += batch.scores
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask=~batch.padding_mask_p1, shift_mean=False)
            rewards = torch.masked_fill(rewards, batch.padding_mask_p1, 0)

        gae = 0
        reversed_advantages = []
        length = rewards.shape[1]
        for t in reversed(range(length)):
            next_value = batch.values[:, t + 1] if t < length - 1 else 0.0
            delta = rewards[:, t] + args.gamma * next_value - batch.values[:, t]
            gae = delta + args.gamma * args.lam * gae
            reversed_advantages.append(gae)
        advantages = torch.stack(reversed_advantages[::-1], axis=1)
        batch.returns = advantages + batch.values
        advantages = masked_whiten(advantages, ~batch.padding_mask)
        batch.advantages = torch.masked_fill(advantages, batch.padding_mask, 0)

    # ------------------------------------------------------------------ step 3: the target
    @property
    def _heldout_sampled_with_rollout(self) -> bool:
        args = self.args
        return (
            args.iif_enabled
            and self.iif_target == "heldout_return"
            and args.iif_heldout_sampling == "with_rollout"
        )

    def build_target_batch(
        self, batch: RolloutBatch, round_index: int, heldout_samples: Samples | None = None
    ) -> RolloutBatch:
        """The records the return target is measured on this round.

        buffer_return: the round's own records. heldout_return: held-out prompts with responses
        sampled now from the current policy: ``heldout_samples`` when they were generated with the
        rollout, else generated here under their own seed so that training's random stream is
        untouched (``iif_heldout_sampling='separate'``).
        """
        if self.iif_target == "buffer_return":
            return batch
        if heldout_samples is not None:
            heldout = self.evaluate_samples(heldout_samples)
            self.compute_rewards_and_advantages(heldout)
            return heldout
        queries = self._heldout_queries(round_index)
        device = self.accelerator.device
        devices = [device.index if device.index is not None else 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            seed = (self.args.seed * 1_000_003 + round_index * 7919 + self.accelerator.process_index) % (
                2**63
            )
            torch.manual_seed(seed)
            heldout = self.rollout(queries.to(device))
        self.compute_rewards_and_advantages(heldout)
        return heldout

    def _heldout_queries(self, round_index: int) -> torch.Tensor:
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_process = max(1, self.args.iif_num_heldout_prompts // world)
        total = per_process * world
        n = len(self.target_dataset)
        first = (round_index - 1) * total + rank * per_process
        rows = [self.target_dataset[(first + j) % n] for j in range(per_process)]
        features = [{"input_ids": row["input_ids"]} for row in rows]
        return self.data_collator(features)["input_ids"]

    # ------------------------------------------------------------------ step 4: score and filter
    def score_and_filter(
        self,
        batch: RolloutBatch,
        target_batch: RolloutBatch,
        keep_gradients: bool = False,
        round_start: bool = True,
    ) -> EpochScores:
        """Influence of every record on the return target at the current weights; the IIF decision.

        ``keep_gradients``: also keep the records' projected gradients for the store.
        ``round_start``: the weights are those the records were sampled with (the first scoring
        of a round), where the buffer target's gradient is the records' own (one pass, not two).
        """
        args = self.args
        start = time.perf_counter()
        policy = self.unwrapped.policy  # dropout is disabled in it, as PPOTrainer does
        store_projector = self.store_projector if keep_gradients else None
        if self.iif_target == "buffer_return" and round_start:
            local, projected = self._buffer_scores_at_round_start(policy, batch, store_projector)
        else:
            target_grad = self._target_gradient(policy, target_batch)
            local, projected = self._record_scores(policy, batch, target_grad, store_projector)
        global_scores = self.accelerator.gather(local.to(self.accelerator.device)).cpu().double()
        decision = iif_keep_mask(global_scores, args.iif_drop_fraction, args.iif_min_keep_fraction)
        if args.iif_filter == "random":  # the control: as many records dropped, at random
            self._scorings += 1
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + self._scorings)
            decision = random_keep_mask(decision, generator)
        rank, n = self.accelerator.process_index, len(batch)
        keep_local = decision.keep[rank * n : (rank + 1) * n].numpy()
        keep_by_process = (
            self.accelerator.gather(decision.keep[None].to(self.accelerator.device)).cpu().bool()
        )
        if not bool((keep_by_process == keep_by_process[:1]).all()):  # same scores, same rule: cannot happen
            raise RuntimeError(
                "processes reached different filtering decisions from the same gathered scores"
            )
        if decision.num_nonfinite:
            warnings.warn(
                f"{decision.num_nonfinite} record(s) got a non-finite influence score; they were kept "
                "out of the ranking (not dropped) and counted in iif/nonfinite_scores",
                stacklevel=2,
            )
        return EpochScores(
            scores=global_scores,
            decision=decision,
            keep_local=keep_local,
            keep_by_process=keep_by_process,
            projected=projected,
            seconds=time.perf_counter() - start,
        )

    def _chunks(self, n: int):
        step = self.args.per_device_train_batch_size
        for start in range(0, n, step):
            yield np.arange(start, min(n, start + step))

    def _target_gradient(self, policy: nn.Module, target_batch: RolloutBatch) -> torch.Tensor:
        """Gradient of the mean return surrogate over all processes' target records, ``[D]``."""
        pad_id = self.processing_class.pad_token_id
        buffer_form = self.iif_target == "buffer_return"
        total = len(target_batch) * self.accelerator.num_processes
        grad = torch.zeros(self.layout.num_params, device=self.accelerator.device)
        for idx in self._chunks(len(target_batch)):
            part = target_batch.select(idx)
            mask = part.query_responses != pad_id
            if buffer_form:  # per-token advantages of the records themselves
                advantages = torch.nn.functional.pad(part.advantages, (part.context_length, 0))
            else:  # one advantage per response: its last token's
                advantages = part.last_token_advantages()
            target = ReturnTarget(
                part.query_responses,
                mask,
                part.response_mask(),
                advantages * (len(idx) / total),  # ReturnTarget averages over its own records
                temperature=self.args.temperature + 1e-7,
            )
            factors = capture_factors(policy, target, layout=self.layout, per_record=False)
            grad += factors.total_gradient().to(grad)
        return self.accelerator.reduce(grad, reduction="sum")

    def _record_scores(
        self,
        policy: nn.Module,
        batch: RolloutBatch,
        target_grad: torch.Tensor,
        store_projector: RandomProjector | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each record's influence ``<grad f, -grad loss_i>`` on the target, ``[n]``.

        With ``store_projector`` also the records' projected gradients ``[n, D']`` for the
        store, contracted from the same factors (no extra forward or backward).
        """
        projected: list[torch.Tensor] = []
        scores = [
            scores_from_factors(factors, target_grad[None], self.projector)[:, 0]
            for factors in self._record_factors(policy, batch, store_projector, projected)
        ]
        return torch.cat(scores), (torch.cat(projected) if projected else None)

    def _record_factors(
        self,
        policy: nn.Module,
        batch: RolloutBatch,
        store_projector: RandomProjector | SketchedProjector | None,
        projected: list[torch.Tensor],
    ):
        """The records' factors, one micro-batch at a time (one forward and backward each), their
        training losses under one normaliser; with ``store_projector`` each micro-batch's projected
        gradients for the store are appended to ``projected``."""
        normaliser = self._loss_normaliser(batch)
        for idx in self._chunks(len(batch)):
            factors = capture_factors(
                policy, self._record_loss(batch.select(idx), normaliser), layout=self.layout
            )
            if store_projector is not None:
                projected.append(factors.gradients(store_projector).to(self._store_dtype).cpu())
            yield factors

    def _buffer_scores_at_round_start(
        self,
        policy: nn.Module,
        batch: RolloutBatch,
        store_projector: RandomProjector | SketchedProjector | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Influence on the buffer target at the round start, from one forward and backward.

        There the ratio is 1 and record i's loss gradient is ``g_i = -sum_t A_t grad log pi / N``,
        while the buffer target is ``f = (1/M) sum_i sum_t A_t log pi``: so ``grad f = -(N/M)
        sum_i g_i`` over all M records of all processes, and the records' own gradients give the
        target's. The local records' gradients (``[n, D]``, or ``[n, D']`` with a scoring
        projection) are held until the sum is known; the ratio differs from 1 only by the float
        difference between sampling and re-computing log-probs (tested against two passes).
        """
        projected: list[torch.Tensor] = []
        record_grads = torch.cat(
            [
                factors.gradients(self.projector)
                for factors in self._record_factors(policy, batch, store_projector, projected)
            ]
        )
        total = self.accelerator.reduce(record_grads.sum(dim=0), reduction="sum")
        normaliser = self._loss_normaliser(batch)
        target_grad = -(normaliser / (len(batch) * self.accelerator.num_processes)) * total
        scores = -(record_grads @ target_grad)
        return scores, (torch.cat(projected) if projected else None)

    def _loss_normaliser(self, batch: RolloutBatch) -> float:
        """One normaliser for every record, so scores compare across micro-batches and processes:
        the expected number of response tokens in a training micro-batch."""
        tokens = self.accelerator.gather((~batch.padding_mask).sum().float().reshape(1)).sum()
        return (
            float(tokens)
            / (len(batch) * self.accelerator.num_processes)
            * self.args.per_device_train_batch_size
        )

    def _record_loss(self, part: RolloutBatch, normaliser: float):
        """The records' PPO policy losses at the current weights, as a ``loss_fn`` for capture."""
        args = self.args
        pad_id = self.processing_class.pad_token_id
        context = part.context_length

        def loss_fn(model: nn.Module) -> torch.Tensor:
            return ppo_policy_loss(
                model,
                part.query_responses,
                part.query_responses != pad_id,
                part.response_mask(),
                torch.nn.functional.pad(part.advantages, (context, 0)),
                old_logprobs=torch.nn.functional.pad(part.logprobs, (context, 0)),
                clip_range=args.cliprange,
                normaliser=normaliser,
                temperature=args.temperature + 1e-7,
            )

        return loss_fn

    # ------------------------------------------------------------------ step 5: one PPO epoch
    def ppo_epoch(
        self, batch: RolloutBatch, keep_local: np.ndarray | None, stats: dict[str, list[float]]
    ) -> None:
        """Mini-batch PPO over the kept records (all when ``keep_local`` is None), the same number
        of micro-batches on every process."""
        args = self.args
        if keep_local is None:
            keep_local = np.ones(args.local_batch_size, dtype=bool)
        with self._advantages_whitened_over(batch, keep_local if args.iif_whiten_after_filter else None):
            self._run_epoch_plan(batch, keep_local, stats)

    @contextmanager
    def _advantages_whitened_over(self, batch: RolloutBatch, keep_local: np.ndarray | None):
        """With ``keep_local``: the kept records' advantages whitened anew over the kept records
        alone, for this epoch's optimisation only (scoring keeps the round's whitening)."""
        if keep_local is None or keep_local.all() or not keep_local.any():
            yield
            return
        original = batch.advantages
        rows = torch.as_tensor(np.flatnonzero(keep_local), device=original.device)
        rewhitened = original.clone()
        kept = masked_whiten(original[rows], ~batch.padding_mask[rows])
        rewhitened[rows] = torch.masked_fill(kept, batch.padding_mask[rows], 0)
        batch.advantages = rewhitened
        try:
            yield
        finally:
            batch.advantages = original

    def _run_epoch_plan(
        self, batch: RolloutBatch, keep_local: np.ndarray, stats: dict[str, list[float]]
    ) -> None:
        args = self.args
        order = np.random.permutation(args.local_batch_size)
        kept_order = order[keep_local[order]]
        kept = torch.tensor([len(kept_order)], device=self.accelerator.device)
        max_kept = int(self.accelerator.gather(kept).max())
        plan = plan_epoch(
            kept_order,
            max_kept,
            local_mini_batch_size=args.local_mini_batch_size,
            per_device_batch_size=args.per_device_train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            num_mini_batches=args.num_mini_batches,
            keep_steps=args.iif_keep_steps,
        )
        for mini_batch in plan:
            for micro in mini_batch:
                with self.accelerator.accumulate(self.model):
                    real = len(micro) > 0
                    loss, micro_stats = self._ppo_loss(batch, micro if real else np.array([0]))
                    if not real:  # keeps collectives in step on a process with no record left
                        loss = loss * 0.0
                    self.accelerator.backward(loss)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                if real:
                    for key, value in micro_stats.items():
                        stats[key].append(value)

    def _ppo_loss(self, batch: RolloutBatch, idx: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        """TRL's PPO loss on the micro-batch ``idx``: clipped policy loss + vf_coef * clipped value loss."""
        args = self.args
        pad_id = self.processing_class.pad_token_id
        context = batch.context_length
        advantage = batch.advantages[idx]
        padding = batch.padding_mask[idx]
        padding_p1 = batch.padding_mask_p1[idx]
        old_values = batch.values[idx]
        returns = batch.returns[idx]

        output, value_logits = forward(self.model, batch.query_responses[idx], pad_id)
        logits = output.logits[:, context - 1 : -1]
        logits /= args.temperature + 1e-7
        new_logprobs = selective_log_softmax(logits, batch.responses[idx])
        new_logprobs = torch.masked_fill(new_logprobs, padding, INVALID_LOGPROB)
        values = value_logits[:, context - 1 : -1].squeeze(-1)
        values = torch.masked_fill(values, padding_p1, 0)
        values_clipped = torch.clamp(
            values, old_values - args.cliprange_value, old_values + args.cliprange_value
        )
        vf_losses = torch.max(torch.square(values - returns), torch.square(values_clipped - returns))
        vf_loss = 0.5 * masked_mean(vf_losses, ~padding_p1)
        vf_clipfrac = masked_mean(
            (torch.square(values_clipped - returns) > torch.square(values - returns)).float(), ~padding_p1
        )

        log_ratio = new_logprobs - batch.logprobs[idx]
        ratio = torch.exp(log_ratio)
        pg_losses = -advantage * ratio
        pg_losses_clipped = -advantage * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
        pg_loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), ~padding)
        loss = pg_loss + args.vf_coef * vf_loss
        with torch.no_grad():
            probs = torch.nn.functional.softmax(logits, dim=-1)
            entropy = torch.logsumexp(logits, dim=-1) - torch.sum(probs * logits, dim=-1)
            stats = {
                "approxkl": float(0.5 * (log_ratio**2).mean()),
                "pg_clipfrac": float(masked_mean((pg_losses_clipped > pg_losses).float(), ~padding)),
                "pg_loss": float(pg_loss),
                "vf_loss": float(vf_loss),
                "vf_clipfrac": float(vf_clipfrac),
                "entropy": float(entropy.mean()),
                "ratio": float(ratio.mean()),
            }
        return loss, stats

    # ------------------------------------------------------------------ step 6: log and store
    @torch.no_grad()
    def round_metrics(
        self, batch: RolloutBatch, stats, epochs: list[EpochScores], start: float
    ) -> dict[str, float]:
        """TRL's PPO metrics plus iif/* (averaged over the round's scorings)."""
        gather_mean = lambda t: float(self.accelerator.gather_for_metrics(t.reshape(-1)).float().mean())  # noqa: E731
        mean_kl = batch.kl.sum(1).mean()
        mean_entropy = ((-batch.logprobs) * (~batch.padding_mask).float()).sum(1).mean()
        mean_non_score_reward = batch.non_score_reward.sum(1).mean()
        metrics = {
            "eps": int(self.state.episode / max(time.time() - start, 1e-9)),
            "objective/kl": gather_mean(mean_kl),
            "objective/entropy": gather_mean(mean_entropy),
            "objective/non_score_reward": gather_mean(mean_non_score_reward),
            "objective/rlhf_reward": gather_mean(mean_non_score_reward + batch.scores.mean()),
            "objective/scores": gather_mean(batch.scores.mean()),
        }
        names = {
            "approxkl": "policy/approxkl_avg",
            "pg_clipfrac": "policy/clipfrac_avg",
            "pg_loss": "loss/policy_avg",
            "vf_loss": "loss/value_avg",
            "vf_clipfrac": "val/clipfrac_avg",
            "entropy": "policy/entropy_avg",
            "ratio": "val/ratio",
        }
        for key, name in names.items():
            values = torch.tensor(stats.get(key) or [float("nan")], device=self.accelerator.device)
            metrics[name] = gather_mean(values.mean())
        ratios = torch.tensor(stats.get("ratio") or [float("nan")], device=self.accelerator.device)
        metrics["val/ratio_var"] = (
            float(self.accelerator.gather_for_metrics(ratios).var()) if len(ratios) > 1 else 0.0
        )
        eos = torch.tensor(
            [(batch.responses == self.processing_class.eos_token_id).sum()], device=self.accelerator.device
        )
        metrics["val/num_eos_tokens"] = int(eos.sum())
        metrics["lr"] = self.lr_scheduler.get_last_lr()[0]
        metrics["episode"] = self.state.episode

        if not epochs:  # IIF switched off: plain PPO's metrics only
            return metrics
        scores = torch.cat([e.scores for e in epochs])
        finite = scores[torch.isfinite(scores)]
        metrics["iif/kept_fraction"] = float(np.mean([e.decision.kept_fraction for e in epochs]))
        metrics["iif/dropped"] = float(np.mean([e.decision.num_dropped for e in epochs]))
        metrics["iif/score_mean"] = float(finite.mean()) if len(finite) else float("nan")
        metrics["iif/score_std"] = float(finite.std()) if len(finite) > 1 else 0.0
        metrics["iif/fraction_negative"] = (
            float((finite < 0).double().mean()) if len(finite) else float("nan")
        )
        metrics["iif/nonfinite_scores"] = float(sum(e.decision.num_nonfinite for e in epochs))
        metrics["iif/scoring_seconds"] = float(sum(e.seconds for e in epochs))
        metrics["iif/scorings"] = float(len(epochs))
        return metrics

    def _global(self, local: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(local.to(self.accelerator.device)).cpu().double()

    def adapter_snapshot(self) -> dict[str, torch.Tensor]:
        """The policy's trainable LoRA weights now (gathered under ZeRO-3), on the CPU, in
        ``iif_store_snapshot_dtype``."""
        policy = self.unwrapped.policy
        named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad and "lora_" in n]
        gather = nullcontext()
        if self.is_deepspeed_enabled and any(hasattr(p, "ds_id") for _, p in named):
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
        dtype = getattr(torch, self.args.iif_store_snapshot_dtype)
        with gather:
            return {canonical_name(n): p.detach().to("cpu", dtype, copy=True).contiguous() for n, p in named}

    def store_round(
        self,
        round_index: int,
        batch: RolloutBatch,
        epochs: list[EpochScores],
        metrics: dict,
        snapshot: dict[str, torch.Tensor] | None,
        target_batch: RolloutBatch | None = None,
    ) -> None:
        """Hand the round's records, scores, kept flags, projected gradients, round-start adapter
        and held-out target samples to the attribution store (the main process writes)."""
        if self.store is None:
            return
        decode = self.processing_class.batch_decode
        prompts = gather_object(decode(batch.queries, skip_special_tokens=True))
        responses = gather_object(decode(batch.postprocessed_responses, skip_special_tokens=True))
        columns = {
            "reward": batch.scores.float(),
            "advantage_mean": batch.mean_advantages().float(),
            "advantage_last": batch.last_token_advantages().float(),
            "logprob": batch.sequence_logprobs().float(),
        }
        gathered = {k: self._global(v).tolist() for k, v in columns.items()}
        projected = epochs[0].projected
        if projected is not None:
            projected = self.accelerator.gather(projected.to(self.accelerator.device)).cpu()
        round_batch = self._gathered_batch(batch)
        heldout = None
        if target_batch is not None and target_batch is not batch:  # the held-out return target's samples
            heldout = {
                **self._gathered_batch(target_batch),
                "last_token_advantages": self._global(target_batch.last_token_advantages()).float(),
                "scores": self._global(target_batch.scores).float(),
            }
        influence = [e.scores.tolist() for e in epochs]
        kept = [e.decision.keep.tolist() for e in epochs]
        if not self.accelerator.is_main_process:
            return
        n = len(prompts)
        first = torch.tensor(influence[0])
        rank_by_influence = torch.empty(n, dtype=torch.long)
        rank_by_influence[torch.argsort(-torch.nan_to_num(first, nan=-math.inf), stable=True)] = torch.arange(
            1, n + 1
        )
        local_n = len(batch)
        records = {
            "record": list(range(n)),
            "process": [i // local_n for i in range(n)],
            "prompt": prompts,
            "response": responses,
            **gathered,
            "influence": influence[0],
            "rank": rank_by_influence.tolist(),
            "kept": kept[0],
            "influence_by_scoring": [list(x) for x in zip(*influence, strict=True)],
            "kept_by_scoring": [list(x) for x in zip(*kept, strict=True)],
            "kept_on_each_process": epochs[0].keep_by_process.T.tolist(),
        }
        tensors = {"batch": round_batch}
        if heldout is not None:
            tensors["target"] = heldout
        if projected is not None:
            tensors["gradients"] = {"projected": projected}
        if snapshot is not None:
            tensors["adapter"] = snapshot
        if not (self.store.path / "manifest.json").exists():
            self.store.write_manifest(self._manifest())
            self.store.write_model_files(self._model_files())
        self.store.write_round(round_index, records, metrics, tensors)

    def _gathered_batch(self, batch: RolloutBatch) -> dict[str, torch.Tensor]:
        """The round's token ids, masks, sampling log-probs and advantages over all processes,
        so the round's policy update can be re-run later (the intervention analysis)."""
        pad_id = self.processing_class.pad_token_id
        acc = self.accelerator

        def across(t: torch.Tensor, pad, first: bool = False) -> torch.Tensor:
            t = acc.pad_across_processes(t.to(acc.device), dim=1, pad_index=pad, pad_first=first)
            return acc.gather(t).cpu()

        return {
            "queries": across(batch.queries, pad_id, first=True).to(torch.int32),
            "responses": across(batch.responses, pad_id).to(torch.int32),
            "padding_mask": across(batch.padding_mask.to(torch.uint8), 1),
            "logprobs": across(batch.logprobs.float(), INVALID_LOGPROB),
            "advantages": across(batch.advantages.float(), 0.0),
        }

    def _manifest(self) -> dict:
        args = self.args
        return {
            "target": self.iif_target,
            "schedule": args.iif_schedule,
            "drop_fraction": args.iif_drop_fraction,
            "filter": args.iif_filter,
            "min_keep_fraction": args.iif_min_keep_fraction,
            "keep_steps": args.iif_keep_steps,
            "whiten_after_filter": args.iif_whiten_after_filter,
            "projection_dim": args.iif_projection_dim,
            "projection_seed": args.iif_projection_seed,
            "num_processes": self.accelerator.num_processes,
            "distributed_type": str(self.accelerator.distributed_type.value),
            "mixed_precision": str(self.accelerator.mixed_precision),
            "records_per_round": args.batch_size,
            "num_ppo_epochs": args.num_ppo_epochs,
            "lora_parameters": self.layout.num_params,
            "lora_adapters": len(self.layout),
            "temperature": args.temperature + 1e-7,
            "training": {
                "learning_rate": args.learning_rate,
                "num_ppo_epochs": args.num_ppo_epochs,
                "mini_batch_size": args.mini_batch_size,
                "per_device_train_batch_size": args.per_device_train_batch_size,
                "cliprange": args.cliprange,
                "pad_token_id": self.processing_class.pad_token_id,
                "optimizer": "AdamW (re-runs start from fresh moments)",
            },
            "stored_gradients": None
            if self.store_projector is None
            else {
                "projection": "one-sided per LoRA adapter side, orthogonal"
                + (", then a sparse sign sketch of the whole vector" if self._store_folds else ""),
                "dim": args.iif_store_projection_dim,
                "sketch_dim": args.iif_store_sketch_dim or None,
                "seed": self.store_projector.seed,
                "dtype": args.iif_store_dtype,
                "size": self.store_projector.output_size(self.layout),
            },
            "snapshot_dtype": args.iif_store_snapshot_dtype,
        }

    @property
    def _store_folds(self) -> bool:
        """Whether the stored vectors are folded by the sketch (only when longer than it)."""
        projector = self.store_projector
        return isinstance(projector, SketchedProjector) and projector.output_size(
            self.layout
        ) < projector.per_side.output_size(self.layout)

    def _model_files(self) -> dict:
        """What the store keeps so that a round's snapshot can be rebuilt after training."""
        policy = self.unwrapped.policy
        base = policy.get_base_model()
        reference = getattr(base.config, "_name_or_path", "") or None
        sharded = any(hasattr(p, "ds_id") for p in base.parameters())
        size = sum(p.numel() * p.element_size() for p in base.parameters())
        small = not sharded and size <= BASE_MODEL_STORE_LIMIT
        return {
            "tokenizer": self.processing_class,
            "peft_config": policy.peft_config[self.model_adapter_name or "default"],
            "base_model": base if small else None,
            "base_model_reference": reference,
        }

    # ------------------------------------------------------------------ trainer bookkeeping (as TRL)
    def _generation_kwargs(self) -> dict:
        # pad finished sequences with the tokenizer's pad id, which the rollout reads as the end
        # (the model's own generation config may name another, e.g. its eos)
        return {
            "pad_token_id": self.processing_class.pad_token_id,
            "max_new_tokens": self.args.response_length,
            "temperature": self.args.temperature + 1e-7,
            "top_k": 0.0,
            "top_p": 1.0,
            "do_sample": True,
        }

    def _generation_config(self) -> GenerationConfig:
        return GenerationConfig(**self._generation_kwargs())

    @staticmethod
    def _repeat(dataloader):
        while True:
            yield from dataloader

    def _begin_training(self) -> None:
        args = self.args
        self.model.train()
        self.state.global_step = 0
        self.state.episode = 0
        self.state.max_steps = args.num_total_batches
        self.state.num_train_epochs = args.total_episodes / self.train_dataset_len
        for name in ("logging_steps", "eval_steps", "save_steps"):
            value = getattr(args, name)
            if value is not None:
                setattr(self.state, name, math.ceil(self.state.max_steps * value) if value < 1 else value)
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        if self.is_deepspeed_enabled:
            self.deepspeed = self.model
            self.model_wrapped = self.model

    def _end_round(self, metrics: dict) -> None:
        args = self.args
        self.state.epoch = self.state.episode / self.train_dataset_len
        self.state.global_step += 1
        self.log(metrics)
        self.iif_history.append(metrics)
        self.lr_scheduler.step()
        self.control = self.callback_handler.on_step_end(args, self.state, self.control)
        if self.control.should_save:
            self._save_checkpoint(self.model, trial=None)
            self.control = self.callback_handler.on_save(args, self.state, self.control)
        gc.collect()
        if (
            args.num_sample_generations > 0
            and (self.state.global_step - 1) % self.sample_generations_freq == 0
        ):
            self.generate_completions(sampling=True)

    def _end_training(self) -> None:
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        if self.control.should_save:
            self._save_checkpoint(self.model, trial=None)
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)


def _check_policy_has_lora(model: nn.Module, peft_config) -> None:
    if peft_config is not None:
        from peft import LoraConfig

        if not isinstance(peft_config, LoraConfig):
            raise TypeError(
                f"IIF scores LoRA adapters: peft_config must be a peft.LoraConfig, got {type(peft_config).__name__}"
            )
        return
    try:
        find_lora_layout(model)
    except NoLoraError as exc:
        raise NoLoraError(
            f"IIF scores the policy's LoRA weights, but the policy has none: {exc} Or pass peft_config=LoraConfig(...)."
        ) from None


@contextmanager
def _mixed_precision_from(args: IIFPPOConfig):
    """Let the Accelerator TRL's PPOTrainer builds use the run's mixed precision.

    TRL 1.12 builds ``Accelerator()`` without ``mixed_precision``, so only ``accelerate launch``'s
    environment reaches it and ``--bf16 true`` alone trained in float32. transformers resolves the
    run's precision into ``args.mixed_precision`` (the flags over the launcher's setting), as its
    own Trainer hands it to accelerate; this hands it over the same way, through the variable the
    launcher sets, for the Accelerator's construction only.
    """
    key = "ACCELERATE_MIXED_PRECISION"
    previous = os.environ.get(key)
    os.environ[key] = getattr(args, "mixed_precision", None) or previous or "no"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


def _with_lora(model: nn.Module, peft_config, args: IIFPPOConfig) -> nn.Module:
    """The policy wrapped with LoRA adapters, as TRL's PPOTrainer wraps it.

    Under DeepSpeed ZeRO-3 the adapters are created in the base weights' dtype: PEFT upcasts them
    to float32 by default, and with mixed precision the base and value model are bf16, so ZeRO-3
    would see one parameter group of mixed dtypes and fail at start (``defragment``'s assert,
    DeepSpeed 0.19). TRL's GRPOTrainer does the same (``autocast_adapter_dtype=False``).
    """
    from peft import get_peft_model

    plugin = getattr(args, "deepspeed_plugin", None)
    zero3 = plugin is not None and plugin.zero_stage == 3
    return get_peft_model(model, peft_config, autocast_adapter_dtype=not zero3)


def _check_reward_model(reward_model: nn.Module) -> None:
    if isinstance(reward_model, RewardFunction):
        return
    if not (hasattr(reward_model, "score") and hasattr(reward_model, "base_model_prefix")):
        raise TypeError(
            f"reward_model {type(reward_model).__name__} is not a sequence-classification model (it needs .score "
            "and a base model, as AutoModelForSequenceClassification has); pass such a model or a callable "
            "f(prompts, completions) -> list[float]"
        )
