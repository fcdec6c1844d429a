"""IIFPPOTrainer: TRL's PPOTrainer that scores every rollout record and filters harmful ones.

A round reads as the steps of :meth:`IIFPPOTrainer.train`:

    rollout -> rewards and advantages -> target -> [score -> filter -> PPO epoch] x epochs
    -> log -> store

The rollout, its rewards and advantages and the target's records are ``ppo_rollout.PPORollout``;
the PPO epoch is ``ppo_optimisation.PPOOptimisation``; this module holds the round loop, the
scoring hand-off, the metrics, the store hand-off and the checkpoints.

Everything PPO does (generation, KL-penalised rewards, GAE, whitening, clipped policy and value
losses, the missing-EOS penalty) keeps TRL 1.12's semantics; with ``iif_drop_fraction=0`` the
weights after training equal TRL's own PPOTrainer's. Influence is the attribution engine's:
each record's policy-loss gradient over the policy's LoRA weights, dotted with a target's
gradient, from one forward and one backward per micro-batch.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl.experimental.ppo import PPOTrainer

from ..engine.lora import find_lora_layout
from ..engine.projection import RandomProjector, SketchedProjector
from ..iif.influence_filter import InfluenceFilter, Scoring
from ..iif.kl import KLController
from ..iif.losses import PPORecordLoss
from ..iif.records import RolloutBatch
from ..iif.scorer import Collectives
from ..iif.target_kinds import target_kind
from ..iif.training_gradients import TrainingGradients
from ..store import RunManifest, TrainingSettings
from .checkpoint import (
    CHECKPOINT_PREFIX,
    CheckpointError,
    CheckpointInfo,
    ResumableBatches,
    checked_checkpoint,
    load_trainable_weights,
    resolve_checkpoint,
    rotate_checkpoints,
    run_checkpoint_info,
    save_trained_policy,
    set_aside_redone_rounds,
    trainable_weights_only,
    write_info,
)
from .config import IIFPPOConfig
from .ppo_optimisation import PPOOptimisation
from .ppo_rollout import PPORollout
from .rewards import RewardFunction, as_reward_module
from .shared import (
    PhaseTimer,
    StoredRound,
    adapter_snapshot,
    check_optimizer_state_access,
    check_policy_has_lora,
    gathered_state_dict,
    model_files,
    open_store,
    optimizer_moments,
    replay_optimizer,
    run_manifest,
    score_preconditioner,
    write_round,
)
from .value_head import SharedValueHead, policy_and_value_wrapper

RESUMED_STATE = ("global_step", "episode", "epoch", "log_history")  # TRL's trainer state a checkpoint keeps


class IIFPPOTrainer(PPORollout, PPOOptimisation, PPOTrainer):
    """PPO with Iterative Influence-based Filtering, a drop-in for TRL's ``PPOTrainer``.

    Takes TRL's arguments plus ``target_dataset`` (held-out prompts, tokenised like
    ``train_dataset``) for the held-out return target. ``reward_model`` may be a
    sequence-classification model or a callable ``f(prompts, completions) -> list[float]``.
    ``value_model``: TRL's separate value model, or None with ``value_head='shared'`` (a scalar
    head on the policy's own LoRA backbone, built here).
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
        value_model: nn.Module | None,
        target_dataset=None,
        data_collator=None,
        eval_dataset=None,
        optimizers=(None, None),
        callbacks=None,
        peft_config=None,
    ) -> None:
        if not isinstance(args, IIFPPOConfig):
            raise TypeError(f"args must be an IIFPPOConfig, got {type(args).__name__}")
        self.iif_target = args.resolved_target(target_dataset is not None)
        self.target_kind = target_kind(self.iif_target)
        if target_dataset is not None and "input_ids" not in target_dataset.column_names:
            raise ValueError("target_dataset must be tokenised like train_dataset (an 'input_ids' column)")
        check_policy_has_lora(model, peft_config)
        if peft_config is not None:  # wrapped here, as TRL would, but in the dtype ZeRO-3 needs
            model, peft_config = _with_lora(model, peft_config, args), None
        reward_model = as_reward_module(reward_model)
        _check_reward_model(reward_model)
        value_model = _value_model_for(args, model, value_model)
        # TRL's PPOTrainer builds its Accelerator without the run's precision; with a shared head its
        # one-pass policy-and-value wrapper stands in for TRL's
        with _mixed_precision_from(args), policy_and_value_wrapper(args.value_head):
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
        check_optimizer_state_access(args, self.accelerator, self.optimizer)
        self.store = open_store(args, self.accelerator)
        self.iif = InfluenceFilter(
            args,
            self.layout,
            self._record_loss(),
            target=self.iif_target,
            micro_batch_size=args.per_device_train_batch_size,
            temperature=args.temperature + 1e-7,
            collectives=Collectives(self.accelerator),
            seed=args.seed,
            store_gradients=self.store is not None,
        )
        self.iif_history: list[dict] = []  # per-round summaries, also written to the store
        self.kl_controller = KLController.from_settings(
            args.kl_coef, args.kl_control, args.kl_target, args.kl_horizon
        )
        if not self.is_deepspeed_enabled:  # checkpoints keep the trainable weights only
            self.accelerator.register_save_state_pre_hook(trainable_weights_only)
            self.accelerator.register_load_state_pre_hook(load_trainable_weights)

    def _record_loss(self) -> PPORecordLoss:
        """Each record's loss as influence differentiates it: PPO's policy loss, with
        ``iif_record_loss='policy_and_value'`` plus ``vf_coef`` x the shared head's value loss."""
        args = self.args
        value = {}
        if args.iif_record_loss == "policy_and_value":
            value = {"value_coef": args.vf_coef, "clip_range_value": args.cliprange_value,
                     "value_head": self.unwrapped.value_model}  # fmt: skip
        return PPORecordLoss(clip_range=args.cliprange, temperature=args.temperature + 1e-7, **value)

    @property
    def store_projector(self) -> RandomProjector | SketchedProjector | None:
        """How the store's per-record gradients are projected (None: no gradients stored)."""
        return self.iif.store_projector

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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """The policy's LoRA adapter and the tokenizer in ``output_dir`` (PEFT's format), gathered
        under ZeRO-3; the main process writes, every process must call it. (TRL's own goes through
        Hugging Face's Trainer, which its PPOTrainer never initialises: it fails under DeepSpeed.)"""
        out = output_dir or self.args.output_dir
        policy = self.unwrapped.policy
        adapter = gathered_state_dict(policy, lambda name, p: p.requires_grad)
        if self.accelerator.is_main_process:
            policy.save_pretrained(out, state_dict=adapter)
            self.processing_class.save_pretrained(out)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ the training loop
    def train(self, resume_from_checkpoint: str | bool | None = None) -> None:
        """PPO rounds until ``total_episodes``; from a checkpoint (a path, or True for the run's
        latest) the run continues at the round after it, as the uninterrupted run would have."""
        args = self.args
        self._begin_training()
        batches = ResumableBatches(self.dataloader)
        first_round = 1
        checkpoint = resolve_checkpoint(args.output_dir, resume_from_checkpoint)
        if checkpoint is not None:
            first_round = self.load_checkpoint(checkpoint, batches) + 1
        self._batches = batches
        start = time.time()
        for round_index in range(first_round, args.num_total_batches + 1):
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
            epochs: list[Scoring] = []
            snapshot = self.adapter_snapshot() if self.store is not None else None
            moments = self.optimizer_snapshot() if self.store is not None else None
            collected = self.gradients_from_training(batch)
            for epoch in range(args.num_ppo_epochs):
                rescore = args.iif_schedule == "epoch" and self.target_kind.scores
                if args.iif_enabled and collected is None and (epoch == 0 or rescore):
                    keep_gradients = epoch == 0 and self.store_projector is not None
                    with timer("scoring"):
                        epochs.append(
                            self.score_and_filter(batch, target_batch, keep_gradients, round_start=epoch == 0)
                        )
                keep_local = epochs[-1].keep_local if epochs else None  # None: plain PPO keeps all
                with timer("optimisation"):
                    self.ppo_epoch(batch, keep_local, stats, collected if epoch == 0 else None)
            if collected is not None:  # record only, from the training's own backward
                epochs.append(self.iif.recorded(collected.projected(), collected.seconds))

            metrics = {**self.round_metrics(batch, stats, epochs, start), **timer.metrics()}
            self.store_round(round_index, batch, epochs, metrics, snapshot, target_batch, moments)
            self.kl_controller.update(metrics["objective/kl_exact"], args.batch_size)  # for the next round
            self._end_round(metrics)
        self._end_training()
        if args.save_final_model:
            self.save_final_model()

    # ------------------------------------------------------------------ step 4: score and filter
    def score_and_filter(
        self,
        batch: RolloutBatch,
        target_batch: RolloutBatch,
        keep_gradients: bool = False,
        round_start: bool = True,
    ) -> Scoring:
        """Influence of every record on the return target at the current weights; the IIF decision.

        ``keep_gradients``: also keep the records' projected gradients for the store.
        ``round_start``: the weights are those the records were sampled with (the first scoring
        of a round).
        """
        pad_id = self.processing_class.pad_token_id
        if not self.target_kind.scores:  # record only: the store's gradients, nothing scored or dropped
            return self.iif.record(self.unwrapped.policy, batch.scored_records(pad_id))
        return self.iif.score(
            self.unwrapped.policy,  # dropout is disabled in it, as PPOTrainer does
            batch.scored_records(pad_id),
            target_batch.scored_records(pad_id),
            round_start=round_start,
            keep_gradients=keep_gradients,
            preconditioner=score_preconditioner(self.args, self.unwrapped.policy, self.optimizer, self.layout),
        )

    def gradients_from_training(self, batch: RolloutBatch) -> TrainingGradients | None:
        """The round's collector of per-record gradients from the optimisation's backward, for a
        record-only run that stores them so (``iif_store_gradients='training'``); else None."""
        args = self.args
        if not (args.iif_enabled and self.store is not None and args.iif_store_gradients == "training"):
            return None
        records = batch.scored_records(self.processing_class.pad_token_id)
        return TrainingGradients(self.iif, len(records), self.iif.normaliser(records))

    # ------------------------------------------------------------------ step 6: log and store
    @torch.no_grad()
    def round_metrics(
        self, batch: RolloutBatch, stats, epochs: list[Scoring], start: float
    ) -> dict[str, float]:
        """TRL's PPO metrics plus iif/* (averaged over the round's scorings)."""
        gather_mean = lambda t: float(self.accelerator.gather_for_metrics(t.reshape(-1)).float().mean())  # noqa: E731
        mean_kl = batch.kl.sum(1).mean()
        mean_entropy = ((-batch.logprobs) * (~batch.padding_mask).float()).sum(1).mean()
        mean_non_score_reward = batch.non_score_reward.sum(1).mean()
        metrics = {
            "eps": int(self.state.episode / max(time.time() - start, 1e-9)),
            "objective/kl": gather_mean(mean_kl),  # TRL's: the sampled estimate (kl_estimator), can be < 0
            "objective/kl_exact": gather_mean(batch.exact_kl.mean()),  # exact over the vocabulary, >= 0
            "objective/kl_coef": self.kl_controller.value,  # the coefficient this round's rewards used
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

        return {**metrics, **InfluenceFilter.metrics(epochs)}  # no iif/* with IIF switched off

    def _global(self, local: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(local.to(self.accelerator.device)).cpu().double()

    def adapter_snapshot(self) -> dict[str, torch.Tensor]:
        """The policy's trainable LoRA weights now, on the CPU, in ``iif_store_snapshot_dtype``."""
        return adapter_snapshot(self.unwrapped.policy, getattr(torch, self.args.iif_store_snapshot_dtype))

    def optimizer_snapshot(self) -> dict[str, torch.Tensor] | None:
        """Adam's round-start state of the LoRA weights, when ``iif_store_optimizer_state`` asks for it."""
        if not self.args.iif_store_optimizer_state:
            return None
        return optimizer_moments(self.unwrapped.policy, self.optimizer)

    def store_round(
        self,
        round_index: int,
        batch: RolloutBatch,
        epochs: list[Scoring],
        metrics: dict,
        snapshot: dict[str, torch.Tensor] | None,
        target_batch: RolloutBatch | None = None,
        optimizer_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Hand the round's records, scores, kept flags, projected gradients, round-start adapter
        and held-out target samples to the attribution store (the main process writes)."""
        if self.store is None:
            return
        decode = self.processing_class.batch_decode
        pad_id = self.processing_class.pad_token_id
        heldout = (
            target_batch is not None and target_batch is not batch
        )  # the held-out return target's samples
        stored = StoredRound(
            index=round_index,
            algorithm="ppo",
            prompts=decode(batch.queries, skip_special_tokens=True),
            responses=decode(batch.postprocessed_responses, skip_special_tokens=True),
            columns={
                "reward": batch.scores.float(),
                "advantage_mean": batch.mean_advantages().float(),
                "advantage_last": batch.last_token_advantages().float(),
                "logprob": batch.sequence_logprobs().float(),
            },
            scorings=epochs,
            records=batch.scored_records(pad_id),
            metrics=metrics,
            snapshot=snapshot,
            target=target_batch.scored_records(pad_id) if heldout else None,
            target_rewards=self._global(target_batch.scores) if heldout else None,
            optimizer=optimizer_state,
        )
        write_round(self.store, self.accelerator, pad_id, stored, self._manifest, self._model_files)

    def _manifest(self) -> RunManifest:
        args = self.args
        training = TrainingSettings(
            algorithm="ppo",
            learning_rate=args.learning_rate,
            per_device_train_batch_size=args.per_device_train_batch_size,
            pad_token_id=self.processing_class.pad_token_id,
            optimizer=replay_optimizer(args),
            num_ppo_epochs=args.num_ppo_epochs,
            mini_batch_size=args.mini_batch_size,
            cliprange=args.cliprange,
            value_head=args.value_head,
            record_loss=args.iif_record_loss,
        )
        return run_manifest(
            args, self.iif, self.accelerator, training, records_per_round=args.batch_size,
            keep_steps=args.iif_keep_steps, whiten_after_filter=args.iif_whiten_after_filter,
            num_ppo_epochs=args.num_ppo_epochs,
        )  # fmt: skip

    def _model_files(self) -> dict:
        """What the store keeps so that a round's snapshot can be rebuilt after training."""
        return model_files(self.unwrapped.policy, self.processing_class, self.model_adapter_name)

    # ------------------------------------------------------------------ trainer bookkeeping (as TRL)
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
            self.save_checkpoint()
            self.control = self.callback_handler.on_save(args, self.state, self.control)
        gc.collect()
        if (
            args.num_sample_generations > 0
            and (self.state.global_step - 1) % self.sample_generations_freq == 0
        ):
            self.generate_completions(sampling=True)

    def _end_training(self) -> None:
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        if self.control.should_save and not (Path(self.args.output_dir) / self._checkpoint_name()).is_dir():
            self.save_checkpoint()
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    # ------------------------------------------------------------------ the final model and checkpoints
    def save_final_model(self, output_dir: str | None = None) -> Path:
        """Save the trained policy as TRL's scripts do (LoRA adapter and tokenizer, loadable with
        ``AutoPeftModelForCausalLM.from_pretrained(output_dir)``) and the value model in
        ``output_dir/value_model`` (a shared head: ``output_dir/value_head.safetensors``); every process
        must call it. Returns the directory."""
        out = Path(output_dir or self.args.output_dir)
        save_trained_policy(out, self.unwrapped.policy, self.accelerator, self.save_model)
        value_model = self.unwrapped.value_model
        state = gathered_state_dict(value_model)
        if self.accelerator.is_main_process:
            if isinstance(value_model, SharedValueHead):
                value_model.save(out, state)
            else:
                value_model.save_pretrained(out / "value_model", state_dict=state)
        self.accelerator.wait_for_everyone()
        return out

    def _checkpoint_name(self) -> str:
        return f"{CHECKPOINT_PREFIX}{self.state.global_step}"

    def checkpoint_info(self) -> CheckpointInfo:
        """What a checkpoint taken now is, and what a resume from it must match."""
        return run_checkpoint_info(
            "ppo", round=self.state.global_step, global_step=self.state.global_step, args=self.args,
            accelerator=self.accelerator, policy=self.unwrapped.policy, layout=self.layout, store=self.store,
            settings=("batch_size", "num_ppo_epochs", "num_mini_batches", "learning_rate", "iif_enabled",
                      "iif_drop_fraction", "iif_filter", "iif_schedule", "iif_target", "iif_score", "iif_store_gradients", "iif_store_optimizer_state",
                      "value_head", "iif_record_loss"),
        )  # fmt: skip

    def save_checkpoint(self) -> Path:
        """``output_dir/checkpoint-K`` after round K: the policy's adapter (PEFT) and tokenizer, the
        trainable weights (LoRA and value model), optimizer, learning-rate schedule, every random
        stream of every process, the data position, the filter's counter and the trainer state;
        written under a temporary name and renamed (every process must call it)."""
        acc, args = self.accelerator, self.args
        final = Path(args.output_dir) / self._checkpoint_name()
        tmp = final.with_name(f".{final.name}.tmp")
        if acc.is_main_process:  # this one, and any a killed run left half-written
            for stale in [tmp, *Path(args.output_dir).glob(f".{CHECKPOINT_PREFIX}*.tmp")]:
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        self.save_model(str(tmp))  # the policy's adapter and tokenizer, as at the end of a run
        acc.save_state(str(tmp / "state"), **self._state_kwargs())
        torch.save(
            {"batches": self._batches.state_dict(), "filter_scorings": self.iif._scorings},
            tmp / f"process_{acc.process_index}.pt",
        )
        acc.wait_for_everyone()
        if acc.is_main_process:
            torch.save({"lr_scheduler": self.lr_scheduler.state_dict()}, tmp / "scheduler.pt")
            state = {name: getattr(self.state, name) for name in RESUMED_STATE}
            state |= {"iif_history": self.iif_history, "kl_controller": self.kl_controller.state_dict()}
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            write_info(tmp, self.checkpoint_info())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            rotate_checkpoints(args.output_dir, args.save_total_limit)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path, batches: ResumableBatches) -> int:
        """Restore the run as it was at checkpoint ``path``; the rounds it completed."""
        acc = self.accelerator
        process_file = f"process_{acc.process_index}.pt"
        info = checked_checkpoint(path, self.checkpoint_info(), self.store, process_file)
        try:
            acc.load_state(str(path / "state"), **self._state_kwargs(loading=True))
            process = torch.load(path / process_file, weights_only=False)
            scheduler = torch.load(path / "scheduler.pt", weights_only=False)
            state = json.loads((path / "trainer_state.json").read_text())
        except CheckpointError:
            raise
        except Exception as exc:  # unreadable or truncated files of any kind
            raise CheckpointError(
                f"cannot resume from {path}: it is damaged ({type(exc).__name__}: {' '.join(str(exc).split())})"
            ) from None
        self.lr_scheduler.load_state_dict(scheduler["lr_scheduler"])
        self.iif._scorings = process["filter_scorings"]
        self.iif_history = state["iif_history"]
        self.kl_controller.load_state_dict(state["kl_controller"])
        for name in RESUMED_STATE:
            setattr(self.state, name, state[name])
        batches.load_state_dict(process["batches"])
        set_aside_redone_rounds(self.store, info, acc)
        return info.round

    def _state_kwargs(self, loading: bool = False) -> dict:
        """accelerate's save/load of the model under DeepSpeed: only the trainable weights (LoRA and
        value model); elsewhere the hooks registered at construction do it."""
        if self.is_deepspeed_enabled:
            return {"load_module_strict": False} if loading else {"exclude_frozen_parameters": True}
        return {}


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


def _value_model_for(args: IIFPPOConfig, policy: nn.Module, value_model: nn.Module | None) -> nn.Module:
    """The value model TRL's PPOTrainer is given: the one passed (``value_head='separate'``) or a
    shared head on the (LoRA-wrapped) policy; ``'auto'`` settles here, in ``args``."""
    if args.resolve_value_head(value_model is not None) == "shared":
        if value_model is not None:
            raise ValueError(
                "value_head='shared' puts the value head on the policy's own backbone: pass value_model=None "
                "(a separate value model would be loaded for nothing)"
            )
        return SharedValueHead(policy)
    if value_model is None:
        raise ValueError("value_head='separate' trains a value model of its own: pass value_model (or use value_head='shared')")
    return value_model


def _check_reward_model(reward_model: nn.Module) -> None:
    if isinstance(reward_model, RewardFunction):
        return
    if not (hasattr(reward_model, "score") and hasattr(reward_model, "base_model_prefix")):
        raise TypeError(
            f"reward_model {type(reward_model).__name__} is not a sequence-classification model (it needs .score "
            "and a base model, as AutoModelForSequenceClassification has); pass such a model or a callable "
            "f(prompts, completions) -> list[float]"
        )
