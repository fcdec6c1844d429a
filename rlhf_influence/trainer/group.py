"""The IIF round for TRL's trainers that sample a group of completions per prompt: GRPO and RLOO.

A round is one generation batch. Where TRL's ``_prepare_inputs`` generates one, the trainer
runs the round's steps:

    generate and score completions (TRL) -> records -> target -> score -> filter
    -> the kept completions, in TRL's shuffled order, cut into its steps_per_generation slices

then TRL's own optimisation steps run on each slice; with ``iif_schedule='epoch'`` the records
are scored again before each of the ``num_iterations`` passes. With ``iif_schedule='step'`` the
round's first pass trains on every completion and the decision is taken inside its optimizer
step, from the gradients its own backward gave (:mod:`rlhf_influence.iif.in_step`): the round
schedule's update without the records' scoring pass. The round is stored when the
next one begins (or training ends), with every scoring it had. ``GroupIIFTrainer`` holds all of
it and sits before TRL's trainer in a subclass (``IIFGRPOTrainer``, ``IIFRLOOTrainer``), which
names its algorithm, its config and what its generation batch holds. With
``iif_drop_fraction=0`` the weights after training equal TRL's trainer's (tested for both).
"""

from __future__ import annotations

import copy
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from trl.trainer.utils import (
    shuffle_sequence_dict,
    split_pixel_values_by_grid,
    unsplit_pixel_values_by_grid,
    use_adapter,
)

from ..engine.lora import find_lora_layout
from ..engine.targets import token_logprobs
from ..iif.algorithms import get_algorithm
from ..iif.in_step import InStepRound, add_to_gradients, check_room
from ..iif.influence_filter import InfluenceFilter, Scoring
from ..iif.kl import KLController
from ..iif.records import ScoredRecords
from ..iif.scorer import Collectives, micro_batches
from ..iif.target_kinds import target_kind
from ..iif.training_gradients import TrainingGradients
from ..store import RunManifest, TrainingSettings
from . import shared
from .checkpoint import (
    CHECKPOINT_PREFIX,
    CheckpointInfo,
    checked_checkpoint,
    resolve_checkpoint,
    run_checkpoint_info,
    save_trained_policy,
    set_aside_redone_rounds,
    write_info,
)

# What TRL's _generate_and_score_completions rebinds for each batch it generates (environments, tools)
BATCH_BINDINGS = ("environments", "_batch_environments", "_sync_tool_dicts", "_async_tool_dicts")
ROW_KEY = "iif_row"  # each completion's position in its generation batch, carried through TRL's shuffle
# What a padding row of a step has zeroed: its loss mask, its advantage, and RLOO's sequence log-prob
# (GRPO's token losses vanish with the mask; RLOO's sequence ratio exp(logp - old) needs both at 0)
PADDING_BLANKED = ("completion_mask", "advantages", "old_logps")


@dataclass
class PendingKL:
    """A round's KL to the reference, its policy side taken from the first pass's own forward: TRL's
    log-probs of each completion at the round-start weights, gathered slice by slice (``[n, C]``,
    the completion's positions), against the reference's, taken at the round start."""

    reference: torch.Tensor  # [n, C] the reference's log-probs of the completions' tokens
    mask: torch.Tensor  # [n, C] the completions' loss masks
    policy: torch.Tensor  # [n, C] filled as the first pass's slices run
    seen: np.ndarray  # bool [n]

    @classmethod
    def start(cls, reference: torch.Tensor, mask: torch.Tensor) -> PendingKL:
        return cls(reference, mask.to(reference.dtype), torch.zeros_like(reference), np.zeros(len(reference), dtype=bool))

    def add(self, rows: np.ndarray, logprobs: torch.Tensor) -> None:
        """A slice's log-probs ``[rows, C]`` for its local ``rows`` (-1: padding)."""
        real = np.flatnonzero(rows >= 0)
        index = torch.as_tensor(rows[real], device=self.policy.device)
        self.policy[index] = logprobs[torch.as_tensor(real, device=logprobs.device)].detach().to(self.policy)
        self.seen[rows[real]] = True

    @property
    def complete(self) -> bool:
        return bool(self.seen.all())

    def value(self, accelerator) -> float:
        """The KL summed over each completion's tokens, averaged over all processes' completions."""
        return _kl_per_completion(self.policy, self.reference, self.mask, accelerator)


def _kl_per_completion(logp: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, accelerator) -> float:
    """GRPO's estimator ``exp(r) - r - 1`` with ``r = log pi_ref - log pi`` (never negative), summed
    over each completion's masked tokens, averaged over all processes' completions."""
    gap = (reference.to(logp.dtype) - logp) * mask
    kl = (torch.exp(gap) - gap - 1).sum(1)
    return float(accelerator.gather(kl.float()).mean())


@dataclass
class GenerationRound:
    """One generation batch as IIF holds it until the round is stored."""

    index: int
    batch: dict  # TRL's generation batch (this process's rows, generation order)
    shuffled: dict  # the same, in the order TRL's shuffle gave its steps
    records: ScoredRecords
    target_records: ScoredRecords
    rewards: torch.Tensor  # [N] every process's completions' rewards (weighted sum over functions)
    target_rewards: torch.Tensor | None  # [M] the held-out completions' rewards
    snapshot: dict[str, torch.Tensor] | None
    metrics: dict[str, float]
    started: float  # perf_counter at the round's start: its steps end when the next round starts
    scorings: list[Scoring] = field(default_factory=list)
    optimizer: dict[str, torch.Tensor] | None = None  # the round-start Adam state, when stored
    collected: TrainingGradients | None = None  # record only, from the training's backward
    in_step: InStepRound | None = None  # iif_schedule='step': until its decision, in the first pass's last step
    step_rows: list[np.ndarray] = field(default_factory=list)  # each step's local records (-1: padding)
    kl: PendingKL | None = None  # the KL to the reference, until the first pass's forwards give its policy side


class GroupIIFTrainer:
    """Iterative Influence-based Filtering for a TRL trainer that samples groups of completions.

    Takes the TRL trainer's arguments plus ``target_dataset``: held-out prompts (a ``prompt``
    column, as ``train_dataset``) for the held-out return target. The policy must carry LoRA
    adapters or ``peft_config`` must be a ``LoraConfig``: IIF scores the LoRA weights. A subclass
    puts this class before TRL's trainer and sets the class attributes below.
    """

    algorithm: ClassVar[str]  # the spec's name (rlhf_influence.iif.algorithms)
    config_class: ClassVar[type]  # the IIF config the trainer takes
    # settings a resume must find unchanged, beside the ones every group trainer checks
    checkpoint_settings: ClassVar[tuple[str, ...]] = ()
    _kl_rows: np.ndarray | None = None  # the slice whose log-probs TRL's loss computes next, for the round's KL

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "algorithm" in cls.__dict__:  # TRL's model card names the trainer by these
            cls._tag_names = ["trl", cls.algorithm, "iif", "rlhf-influence"]
            cls._name = f"IIF-{cls.algorithm.upper()}"

    def __init__(self, model, reward_funcs, args, train_dataset, target_dataset=None,
                 processing_class=None, peft_config=None, **kwargs) -> None:  # fmt: skip
        if not isinstance(args, self.config_class):
            raise TypeError(f"args must be an {self.config_class.__name__}, got {type(args).__name__}")
        self.iif_target = args.resolved_target(target_dataset is not None)
        self.target_kind = target_kind(self.iif_target)
        if target_dataset is not None and "prompt" not in target_dataset.column_names:
            raise ValueError("target_dataset must have a 'prompt' column, as train_dataset")
        shared.check_policy_has_lora(model, peft_config)
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                         processing_class=processing_class, peft_config=peft_config, **kwargs)  # fmt: skip
        self.target_dataset = target_dataset
        self.layout = find_lora_layout(self.lora_policy)
        shared.check_optimizer_state_access(args, self.accelerator)
        self.store = shared.open_store(args, self.accelerator)
        self.spec = get_algorithm(self.algorithm)
        if args.iif_enabled and self.aux_loss_enabled:
            raise ValueError(
                f"IIF scores each completion with {self.spec.title}'s policy loss; the MoE router's auxiliary loss "
                "(router_aux_loss_coef != 0) changes it and is not supported (or set iif_enabled=false)"
            )
        self.iif_history: list[dict] = []  # per-round metrics, also written to the store
        self._round: GenerationRound | None = None
        self._rounds = 0
        self._last_rewards: torch.Tensor | None = None
        self._checkpoint_pending = False  # --save_steps fell inside a round: checkpoint when it ends
        self._pending: tuple[Any, np.ndarray, float] | None = None  # a recorded step's collector, rows, divisor
        self.kl_controller = KLController.from_settings(
            args.beta, args.kl_control, args.kl_target, args.kl_horizon
        )
        self._round_kl: float | None = None  # the last round's KL, for the controller's next step
        self.iif: InfluenceFilter | None = None  # plain training (iif_enabled=false): no filter, any loss type
        if not args.iif_enabled:
            return
        if args.iif_schedule == "step":
            self.check_in_step()
        self.iif = InfluenceFilter(
            args,
            self.layout,
            self.spec.record_loss(self.training_settings(), args.temperature, self.accelerator.num_processes),
            target=self.iif_target,
            micro_batch_size=args.per_device_train_batch_size,
            temperature=args.temperature,
            collectives=Collectives(self.accelerator),
            seed=args.seed,
            store_gradients=self.store is not None,
        )

    @property
    def lora_policy(self) -> nn.Module:
        """The LoRA policy without DDP / DeepSpeed around it."""
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------ where TRL hands over a generation batch
    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        args = self.args
        new_round = self._between_rounds() or self._buffered_inputs is None
        if new_round:
            self.steer_kl_coefficient()
        if not args.iif_enabled:  # plain training: TRL's own round, its KL measured for an adaptive beta
            inputs = super()._prepare_inputs(generation_batch)
            if new_round and self.kl_controller.adaptive:
                self._round_kl = self.kl_to_reference(self.scored_records(_joined(self._buffered_inputs)))
                self._metrics["train"]["objective/kl"].append(self._round_kl)
            return inputs
        if new_round:
            self.start_round(generation_batch)
        elif args.iif_schedule == "epoch" and self.target_kind.scores and self._step % args.steps_per_generation == 0:
            self.rescore_round()
        return self._buffered_inputs[self._step % args.steps_per_generation]

    def steer_kl_coefficient(self) -> None:
        """At a round's start: the adaptive controller's step from the last round's KL (``beta``,
        which TRL reads: GRPO in its loss, RLOO in the round's rewards, computed after this), and the
        coefficient this round uses, logged as objective/kl_coef."""
        if self.kl_controller.adaptive and self._round_kl is not None:
            self.beta = self.kl_controller.update(self._round_kl, self.args.generation_batch_size)
        self._round_kl = None
        self._metrics["train"]["objective/kl_coef"].append(self.beta)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights).nansum(dim=1)  # every process's completions, as TRL sums them
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan  # unscorable: no reward, as TRL logs it
        self._last_rewards = rewards.detach().cpu()
        return rewards_per_func

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """TRL's training; from a checkpoint (a path, or True for the run's latest complete one) the
        run continues at the round after it, as the uninterrupted run would have."""
        checkpoint = resolve_checkpoint(self.args.output_dir, resume_from_checkpoint)
        if checkpoint is not None:
            self.load_iif_checkpoint(checkpoint)
        output = super().train(str(checkpoint) if checkpoint else None, *args, **kwargs)
        self.store_round()  # the last round (every process reaches this point)
        # leave together: a process that exits while the main one still writes the round tears its
        # process group down under it (gloo aborts with "terminate called without an active exception")
        self.accelerator.wait_for_everyone()
        if self.args.save_final_model:
            self.save_final_model()
        return output

    # ------------------------------------------------------------------ the final model and checkpoints
    def save_final_model(self, output_dir: str | None = None) -> Path:
        """Save the trained policy as TRL's scripts do (LoRA adapter and tokenizer, loadable with
        ``AutoPeftModelForCausalLM.from_pretrained(output_dir)``); every process must call it."""
        out = Path(output_dir or self.args.output_dir)
        save_trained_policy(out, self.lora_policy, self.accelerator, self.save_model)
        return out

    def checkpoint_info(self) -> CheckpointInfo:
        """What a checkpoint taken now is, and what a resume from it must match."""
        return run_checkpoint_info(
            self.algorithm, round=self._step // self._steps_per_round, global_step=self.state.global_step,
            args=self.args, accelerator=self.accelerator, policy=self.lora_policy, layout=self.layout,
            store=self.store,
            settings=("generation_batch_size", "num_generations", "num_iterations", "steps_per_generation",
                      "learning_rate", *self.checkpoint_settings, "iif_enabled", "iif_drop_fraction", "iif_filter",
                      "iif_schedule", "iif_target", "iif_score", "iif_store_gradients", "iif_store_optimizer_state"),
        )  # fmt: skip

    @property
    def _steps_per_round(self) -> int:
        """TRL's training steps (micro-steps) per round: a generation batch's slices, each pass over them."""
        return self.args.steps_per_generation * self.num_iterations

    def _between_rounds(self) -> bool:
        """Whether the steps so far end a round (a generation batch's slices, each pass over them)."""
        return self._step % self._steps_per_round == 0

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        # A checkpoint falls between rounds, where a resume can start: one that --save_steps asks for
        # inside a round is written when that round ends.
        if self.control.should_save and not self._between_rounds():
            self.control.should_save, self._checkpoint_pending = False, True
        elif self._checkpoint_pending and self._between_rounds():
            self.control.should_save = True
        if self.control.should_save:
            self._checkpoint_pending = False
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    def _save_checkpoint(self, model, trial):
        """Hugging Face's checkpoint (adapter, optimizer, scheduler, random streams, trainer state)
        after the round it ends is stored, plus IIF's own state (round counter, the filter's random
        control, TRL's step counter); the info file, written last, makes it complete."""
        self.store_round()  # the round that just ended (a checkpoint falls between rounds)
        super()._save_checkpoint(model, trial)
        path = Path(self._get_output_dir(trial=trial)) / f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        acc = self.accelerator
        state = {
            "rounds": self._rounds,
            "step": self._step,
            "filter_scorings": self.iif._scorings if self.iif else 0,
            "kl_controller": self.kl_controller.state_dict(),
            "round_kl": self._round_kl,
            "beta": self.beta,
        }
        torch.save(state, path / f"iif_process_{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_info(path, self.checkpoint_info())
        acc.wait_for_everyone()

    def load_iif_checkpoint(self, path: Path) -> None:
        """IIF's part of a resume: the checks, the store's later rounds set aside, the counters."""
        acc = self.accelerator
        state_file = f"iif_process_{acc.process_index}.pt"
        info = checked_checkpoint(path, self.checkpoint_info(), self.store, state_file)
        state = torch.load(path / state_file, weights_only=True)
        self._rounds, self._step = state["rounds"], state["step"]
        self.kl_controller.load_state_dict(state["kl_controller"])
        self._round_kl, self.beta = state["round_kl"], state["beta"]
        if self.iif is not None:
            self.iif._scorings = state["filter_scorings"]
        set_aside_redone_rounds(self.store, info, acc)

    # ------------------------------------------------------------------ a round
    def start_round(self, generation_batch) -> None:
        """Generate and score the round's completions, score them, filter, and cut the steps."""
        self.store_round()  # the previous round, now that all its scorings are known
        self._rounds += 1
        started = time.perf_counter()
        timer = shared.PhaseTimer(self.accelerator.device)
        snapshot = self.adapter_snapshot() if self.store is not None else None
        moments = (
            shared.optimizer_moments(self.lora_policy, self.optimizer)
            if self.store is not None and self.args.iif_store_optimizer_state
            else None
        )
        with timer("rollout"):
            batch = self._generate_and_score_completions(generation_batch)
            rewards = self._last_rewards
        records = self.scored_records(batch)
        target_records, target_rewards = records, None
        if self.target_kind.needs_heldout:
            with timer("target_sampling"):
                target_records, target_rewards = self.sample_heldout_target()
        collected = None
        in_step = None
        if self.args.iif_schedule == "step":  # the target now; the records' scores in the step (their vectors too)
            with timer("scoring"):
                in_step = self.in_step_round(records, target_records)
            scoring = self.iif.recorded(torch.zeros(len(records), 0))  # the first pass trains on every record
        elif self.store is not None and self.args.iif_store_gradients == "training":  # record only, no pass
            collected = TrainingGradients(self.iif, len(records), self.iif.normaliser(records))
            scoring = self.iif.recorded(torch.zeros(len(records), 0))  # every record kept; vectors come later
        else:
            with timer("scoring"):
                scoring = self.score(records, target_records, round_start=True)
        metrics = {"objective/scores": float(rewards.nanmean()), "objective/kl_coef": self.beta}
        pending_kl = None
        if (self.store is not None and self.args.iif_store_kl) or self.kl_controller.adaptive:  # curves, controller
            with timer("kl"):
                if self._kl_from_training():  # the policy's side comes from the first pass's forward
                    width = records.context_length
                    pending_kl = PendingKL.start(self.reference_logprobs(records)[:, width:],
                                                 records.response_mask[:, width:])  # fmt: skip
                else:
                    metrics["objective/kl"] = self._round_kl = self.kl_to_reference(records)
        batch = split_pixel_values_by_grid(batch)
        batch[ROW_KEY] = torch.arange(len(records), device=self.accelerator.device)
        shuffled = shuffle_sequence_dict(batch)  # TRL's shuffle, from the same random stream
        self._round = GenerationRound(
            index=self._rounds, batch=batch, shuffled=shuffled, records=records, target_records=target_records,
            rewards=rewards, target_rewards=target_rewards, snapshot=snapshot,
            metrics={**metrics, **timer.metrics()}, started=started,
            scorings=[] if in_step else [scoring], optimizer=moments, collected=collected, in_step=in_step,
            kl=pending_kl,
        )  # fmt: skip
        self._buffered_inputs = self.kept_steps(shuffled, scoring.keep_local)
        self._round.step_rows = self._step_rows
        if in_step is None:
            self._log_scoring(scoring)

    # ------------------------------------------------------------------ iif_schedule='step': the decision in the step
    def check_in_step(self) -> None:
        """What the step schedule needs to give the round schedule's update (ValueError, in one line, if not)."""
        if getattr(self.accelerator.state, "deepspeed_plugin", None):
            raise ValueError(
                "iif_schedule='step' edits each LoRA weight's gradient before the optimizer step, which DeepSpeed "
                "keeps partitioned: run with DDP or one process, or use iif_schedule='round'"
            )
        if self.layout.excluded_trainable:
            raise ValueError(
                f"iif_schedule='step' takes the dropped completions out of the LoRA weights' gradients only, and "
                f"{self.layout.excluded_trainable[0]} (not a LoRA weight) trains too (modules_to_save, bias): use "
                "iif_schedule='round'"
            )
        if self._dropout_on():
            raise ValueError(
                "iif_schedule='step' scores each completion from the training's own forward, which has dropout on "
                "here (the round schedule scores without it): use --disable_dropout true and lora_dropout=0, or "
                "iif_schedule='round'"
            )
        per_process = self.args.per_device_train_batch_size * self.args.steps_per_generation
        check_room(per_process, self.layout.num_params, self.accelerator.device)

    def in_step_round(self, records: ScoredRecords, target_records: ScoredRecords) -> InStepRound:
        """The round's in-step filter, with the target's gradient at the round start (none for the
        buffer target, whose gradient the records' own give in the step)."""
        policy, iif = self.lora_policy, self.iif
        normaliser = iif.normaliser(records)
        with shared.own_random_stream(self.accelerator.device), _no_dropout(policy):
            preconditioner = shared.score_preconditioner(self.args, policy, self.optimizer, iif.layout)
            if self.target_kind.round_start_shortcut and iif.loss.scales_like_token_advantages:
                return InStepRound(iif, len(records), normaliser, None, preconditioner)
            target = iif.scorer.target_gradient(policy, target_records)
        if preconditioner is not None:
            target = target * preconditioner.to(target)
        return InStepRound(iif, len(records), normaliser, target)

    def filter_in_step(self) -> None:
        """After the first pass's last backward, before clipping and the optimizer step: score every
        completion from its share of the gradient, decide over all processes' completions, and turn
        the step's gradient into the kept completions' (their own slices' normalisers); the later
        passes (``num_iterations``) train on the kept slices, as the round schedule's do."""
        round_, start = self._round, time.perf_counter()
        in_step, round_.in_step = round_.in_step, None
        scoring = in_step.scoring()
        steps = self.kept_steps(round_.shuffled, scoring.keep_local)
        kept_divisors = np.ones(len(round_.records))
        for step, rows in zip(steps, self._step_rows, strict=True):
            kept_divisors[rows[rows >= 0]] = self.slice_divisor(step, len(rows))
        delta = self.iif.collectives.sum(in_step.correction(scoring.keep_local, kept_divisors))
        add_to_gradients(self.iif.layout, delta / self.accelerator.num_processes)  # .grad: the processes' mean
        self._buffered_inputs, round_.step_rows = steps, self._step_rows
        round_.scorings.append(scoring)
        seconds = time.perf_counter() - start + in_step.seconds
        round_.metrics["time/scoring_seconds"] = round_.metrics.get("time/scoring_seconds", 0.0) + seconds
        self._log_scoring(scoring)

    def slice_divisor(self, inputs: dict, rows: int) -> float:
        """What TRL divides a slice's summed loss by (its ``rows``, padding included)."""
        mask = inputs["completion_mask"] * inputs["tool_mask"] if "tool_mask" in inputs else inputs["completion_mask"]
        return self.iif.loss.slice_normaliser(max(float(mask.sum()), 1.0), float(inputs["num_items_in_batch"]), rows)

    # ------------------------------------------------------------------ record only: gradients from TRL's backward
    def _collecting(self) -> TrainingGradients | InStepRound | None:
        """The round's collector while its first pass over its slices runs (``iif_store_gradients='training'``,
        or ``iif_schedule='step'`` until its decision)."""
        round_ = self._round
        if round_ is None:
            return None
        collector = round_.collected if round_.collected is not None else round_.in_step
        if collector is None:
            return None
        return collector if self._in_first_pass() else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        round_ = self._round
        if round_ is not None and round_.kl is not None and self._in_first_pass():  # the KL's policy side
            self._kl_rows = round_.step_rows[self._step % self.args.steps_per_generation]
        try:
            collected = self._collecting()
            if collected is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            rows = self._round.step_rows[self._step % self.args.steps_per_generation]
            with collected.recording(rows):  # the hooks' output-gradient hooks fire in TRL's backward, after this
                output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self._pending = (collected, rows, self.slice_divisor(inputs, len(rows)))
            return output
        finally:
            self._kl_rows = None  # taken by TRL's log-prob call inside the loss, or by nothing (an error)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._pending = None
        output = super().training_step(model, inputs, num_items_in_batch)
        if self._pending is not None:  # after TRL's backward: each record's gradient of TRL's slice loss
            collector, rows, divisor = self._pending
            self._pending = None
            collector.collect(rows, divisor)
            if isinstance(collector, InStepRound) and collector.complete:  # the step's last backward: decide
                self.filter_in_step()
        round_ = self._round
        if round_ is not None and round_.kl is not None and round_.kl.complete:  # every completion's log-probs
            start = time.perf_counter()
            round_.metrics["objective/kl"] = self._round_kl = round_.kl.value(self.accelerator)
            round_.metrics["time/kl_seconds"] = round_.metrics.get("time/kl_seconds", 0.0) + time.perf_counter() - start
            round_.kl = None
        return output

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        output = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        rows, self._kl_rows = self._kl_rows, None
        if rows is not None and self._round is not None and self._round.kl is not None:  # a first-pass slice's loss
            self._round.kl.add(rows, output[0])  # its log-probs at the round-start weights
        return output

    def _in_first_pass(self) -> bool:
        """Whether the step about to run is in the round's first pass over its slices."""
        return self.model.training and self._step % self._steps_per_round < self.args.steps_per_generation

    def _kl_from_training(self) -> bool:
        """Whether the round's KL can take the policy's log-probs from the first pass's own forward:
        that pass trains every completion (nothing dropped before it: record only, p = 0, or the step
        schedule), all at the round-start weights (one optimizer step a generation batch) and with
        no dropout (the KL is the deterministic policy's)."""
        args = self.args
        trains_all = not self.target_kind.scores or args.iif_schedule == "step" or args.iif_drop_fraction == 0
        return trains_all and args.steps_per_generation == args.gradient_accumulation_steps and not self._dropout_on()

    def _dropout_on(self) -> bool:
        """Whether the policy's training forward drops activations (TRL's ``disable_dropout`` is off and
        the model or its LoRA adapter has dropout)."""
        return any(m.p > 0 for m in self.lora_policy.modules() if isinstance(m, nn.Dropout))

    def rescore_round(self) -> None:
        """Score the round's records again at the current weights, before another pass over them."""
        round_ = self._round
        start = time.perf_counter()
        scoring = self.score(round_.records, round_.target_records, round_start=False)
        round_.metrics["time/scoring_seconds"] = round_.metrics.get("time/scoring_seconds", 0.0) + (
            time.perf_counter() - start
        )
        round_.scorings.append(scoring)
        self._buffered_inputs = self.kept_steps(round_.shuffled, scoring.keep_local)
        self._log_scoring(scoring)

    def scored_records(self, batch: dict) -> ScoredRecords:
        """TRL's generation batch (this process's rows) as the records IIF scores: one record per
        completion, its advantage on every token, its group the prompt it answers."""
        prompt_ids, completion_ids = batch["prompt_ids"], batch["completion_ids"]
        width = prompt_ids.shape[1]
        loss_mask = batch["completion_mask"]
        if "tool_mask" in batch:
            loss_mask = loss_mask * batch["tool_mask"]
        advantages = batch["advantages"]
        if advantages.dim() == 1:
            advantages = advantages[:, None].expand_as(completion_ids)

        def aligned(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(t, (width, 0))

        n = len(prompt_ids)
        first = self.accelerator.process_index * n
        rows = torch.arange(first, first + n, device=prompt_ids.device)
        return ScoredRecords(
            input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
            attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1).bool(),
            response_mask=aligned(loss_mask.bool()),
            advantages=aligned(advantages.float() * loss_mask),
            context_length=width,
            old_logprobs=self.old_token_logprobs(batch, width),
            ref_logprobs=aligned(batch["ref_per_token_logps"]) if "ref_per_token_logps" in batch else None,
            group=rows // self.num_generations,
            positions_from_mask=self.spec.positions_from_mask,
        )

    def old_token_logprobs(self, batch: dict, prompt_width: int) -> torch.Tensor | None:
        """The completions' sampling log-probs aligned with prompt + completion ``[n, T]``, or None
        where TRL kept none (the weights that sampled them are the ones that train on them)."""
        raise NotImplementedError

    @torch.no_grad()
    def kl_to_reference(self, records: ScoredRecords) -> float:
        """The policy's KL to the reference on the round's completions, summed over a completion's
        tokens (as PPO's ``objective/kl``) and averaged over all processes' completions. Per token
        GRPO's estimator ``exp(r) - r - 1`` with ``r = log pi_ref - log pi`` (never negative);
        the reference is TRL's reference log-probs where the batch has them (GRPO with ``beta > 0``),
        else the policy with its adapter disabled (TRL's reference adapter where there is one)."""
        policy = self.lora_policy
        logp = []
        with shared.own_random_stream(self.accelerator.device), _no_dropout(policy):
            for idx in micro_batches(len(records), self.args.per_device_train_batch_size):
                part = records.select(idx)
                logp.append(token_logprobs(policy, part.input_ids, part.attention_mask, self.args.temperature, False))
        return _kl_per_completion(torch.cat(logp), self.reference_logprobs(records), records.response_mask,
                                  self.accelerator)  # fmt: skip

    @torch.no_grad()
    def reference_logprobs(self, records: ScoredRecords) -> torch.Tensor:
        """The reference's log-probs of the records' tokens ``[n, T]``: TRL's where the batch has them
        (GRPO with ``beta > 0``), else the policy with its adapter disabled (TRL's reference adapter
        where there is one)."""
        if records.ref_logprobs is not None:
            return records.ref_logprobs
        policy = self.lora_policy
        ref = []
        with shared.own_random_stream(self.accelerator.device), _no_dropout(policy):
            for idx in micro_batches(len(records), self.args.per_device_train_batch_size):
                part = records.select(idx)
                with use_adapter(policy, adapter_name="ref" if "ref" in policy.peft_config else None):
                    ref.append(token_logprobs(policy, part.input_ids, part.attention_mask, self.args.temperature, False))
        return torch.cat(ref)

    def sample_heldout_target(self) -> tuple[ScoredRecords, torch.Tensor]:
        """Held-out prompts, ``num_generations`` fresh completions each from the current policy,
        scored by TRL as a generation batch (rewards, group-relative advantages), under their own
        seed and without touching TRL's logged metrics or training's random stream."""
        acc = self.accelerator
        rows = shared.heldout_rows(self.target_dataset, self._rounds, self.args.iif_num_heldout_prompts, acc)
        inputs = [dict(row) for row in rows for _ in range(self.num_generations)]
        seed = shared.heldout_seed(self.args.seed, self._rounds, acc.process_index)
        with shared.own_random_stream(acc.device, seed), self._trl_state_untouched():
            batch = self._generate_and_score_completions(inputs)
            rewards = self._last_rewards
        return self.scored_records(batch), rewards

    def score(self, records: ScoredRecords, target_records: ScoredRecords, *, round_start: bool) -> Scoring:
        """The filter's scores and decision, with dropout off and training's random stream untouched."""
        policy = self.lora_policy
        keep_gradients = round_start and self.iif.store_projector is not None
        if not self.target_kind.scores:  # record only: the store's gradients, nothing scored or dropped
            with shared.own_random_stream(self.accelerator.device), _no_dropout(policy):
                return self.iif.record(policy, records)
        with shared.own_random_stream(self.accelerator.device), _no_dropout(policy):
            preconditioner = shared.score_preconditioner(self.args, policy, self.optimizer, self.iif.layout)
            return self.iif.score(policy, records, target_records, round_start=round_start,
                                  keep_gradients=keep_gradients, preconditioner=preconditioner)  # fmt: skip

    def kept_steps(self, shuffled: dict, keep_local: np.ndarray) -> list[dict]:
        """The kept completions in TRL's shuffled order, cut into ``steps_per_generation`` slices.

        With nothing dropped the slices are TRL's own. Every process's slice of a step is padded
        to the longest one any process has (at least one completion) with completions whose loss
        mask is zeroed: TRL gathers per-completion statistics across processes, which needs equal
        sizes, and a step must run on every process to keep the collectives in step. Padding adds
        nothing to a loss's sum or to its token count (``dapo``, ``bnpo``: exact); GRPO's ``grpo``
        and ``dr_grpo`` and RLOO divide by the slice's rows, padding included. ``num_items_in_batch`` (dapo's
        normaliser) counts the kept completions' tokens over all processes.
        """
        rows = shuffled[ROW_KEY].cpu().numpy()
        kept = np.flatnonzero(keep_local[rows])
        loss_mask = shuffled["completion_mask"]
        if "tool_mask" in shuffled:
            loss_mask = loss_mask * shuffled["tool_mask"]
        device = loss_mask.device
        num_items = self.accelerator.gather(
            loss_mask[torch.as_tensor(kept, dtype=torch.long, device=device)].sum()
        ).sum()
        parts = np.array_split(kept, self.args.steps_per_generation)
        self._step_rows: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(parts)
        sizes = torch.tensor([len(p) for p in parts], device=self.accelerator.device)
        widths = self.accelerator.gather(sizes[None]).max(dim=0).values.clamp(min=1).tolist()
        steps = []
        for part, width in zip(parts, widths, strict=True):
            padding = width - len(part)
            index = torch.as_tensor(
                np.concatenate([part, np.zeros(padding, dtype=np.int64)]), dtype=torch.long
            )
            step = {}
            for key, value in shuffled.items():
                if key == ROW_KEY:
                    continue
                if isinstance(value, torch.Tensor) and value.ndim > 0:
                    step[key] = value[index.to(value.device)]
                elif isinstance(value, list):
                    step[key] = [value[i] for i in index.tolist()]
                else:
                    step[key] = value
            step["num_items_in_batch"] = num_items
            self._step_rows[len(steps)] = np.concatenate([rows[part], -np.ones(padding, dtype=np.int64)])
            if padding:  # rows that add nothing: no loss tokens, no advantage, ratio 1 for a sequence loss
                real = torch.arange(width, device=device) < len(part)
                for key in PADDING_BLANKED:
                    if key in step:
                        value = step[key]
                        step[key] = value * real.view(-1, *[1] * (value.ndim - 1)).to(value.dtype)
            steps.append(unsplit_pixel_values_by_grid(step))
        return steps

    def _log_scoring(self, scoring: Scoring) -> None:
        for key, value in InfluenceFilter.metrics([scoring]).items():
            self._metrics["train"][key].append(value)

    @contextmanager
    def _trl_state_untouched(self):
        """TRL's logged metrics, completion logs, token count and per-batch environment and tool
        bindings as they were before (the held-out batch is generated and scored by TRL's own code)."""
        metrics, logs = copy.deepcopy(self._metrics), copy.deepcopy(self._logs)
        tokens_seen = self.state.num_input_tokens_seen
        bindings = {name: getattr(self, name) for name in BATCH_BINDINGS if hasattr(self, name)}
        try:
            yield
        finally:
            self._metrics, self._logs = metrics, logs
            self.state.num_input_tokens_seen = tokens_seen
            for name, value in bindings.items():
                setattr(self, name, value)

    # ------------------------------------------------------------------ the store
    def adapter_snapshot(self) -> dict[str, torch.Tensor]:
        """The policy's trainable LoRA weights now, on the CPU, in ``iif_store_snapshot_dtype``."""
        return shared.adapter_snapshot(self.lora_policy, getattr(torch, self.args.iif_store_snapshot_dtype))

    def store_round(self) -> None:
        """Hand the finished round's completions, rewards, groups, scores, kept flags, projected
        gradients, round-start adapter and held-out samples to the store (the main process writes)."""
        round_, self._round = self._round, None
        if round_ is None:
            return
        if round_.kl is not None:
            warnings.warn(
                f"round {round_.index} ended before its first pass had run every completion (max_steps inside a "
                "round): its KL to the reference is not known (NaN)",
                stacklevel=2,
            )
            round_.metrics["objective/kl"] = float("nan")
        if round_.in_step is not None:
            warnings.warn(
                f"round {round_.index} ended before its first pass's optimizer step (max_steps inside a round): "
                "nothing was decided, and it is not stored",
                stacklevel=2,
            )
            return
        if round_.collected is not None:  # record only: the vectors its first pass's backward gave
            if not round_.collected.complete:
                warnings.warn(
                    f"round {round_.index} ended before all its completions were trained on (max_steps inside a "
                    "round): it is not stored",
                    stacklevel=2,
                )
                return
            round_.scorings = [self.iif.recorded(round_.collected.projected(), round_.collected.seconds)]
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize(self.accelerator.device)
        seconds = time.perf_counter() - round_.started
        phases = sum(v for k, v in round_.metrics.items() if k.startswith("time/"))
        metrics = {
            **round_.metrics,
            "time/optimisation_seconds": seconds - phases,  # TRL's steps on the round (and its logging)
            "time/round_seconds": seconds,
            **InfluenceFilter.metrics(round_.scorings),
        }
        self.iif_history.append(metrics)
        if self.store is None:
            return
        decode = self.processing_class.batch_decode
        records = round_.records
        n, rank = len(records), self.accelerator.process_index
        advantage = records.sequence_advantages().float()
        columns = {
            "group": records.group,
            "reward": round_.rewards[rank * n : (rank + 1) * n].float(),
            "advantage_mean": advantage,
            "advantage_last": advantage,
            "logprob": (records.old_logprobs * records.response_mask).sum(1).float()
            if records.old_logprobs is not None
            else torch.full((n,), float("nan")),
        }
        stored = shared.StoredRound(
            index=round_.index,
            algorithm=self.algorithm,
            prompts=decode(round_.batch["prompt_ids"], skip_special_tokens=True),
            responses=decode(round_.batch["completion_ids"], skip_special_tokens=True),
            columns=columns,
            scorings=round_.scorings,
            records=records,
            metrics=metrics,
            snapshot=round_.snapshot,
            target=round_.target_records if round_.target_rewards is not None else None,
            target_rewards=round_.target_rewards,
            optimizer=round_.optimizer,
        )
        shared.write_round(self.store, self.accelerator, self.processing_class.pad_token_id, stored, self._manifest,
                    lambda: shared.model_files(self.lora_policy, self.processing_class, None))  # fmt: skip

    def training_settings(self) -> TrainingSettings:
        """This run's settings as the store keeps them: what scores a completion and what a replay needs."""
        raise NotImplementedError

    def group_training_settings(self, **specific: Any) -> TrainingSettings:
        """The settings every group trainer records, plus the algorithm's ``specific`` ones."""
        args = self.args
        return TrainingSettings(
            algorithm=self.algorithm,
            learning_rate=args.learning_rate,
            per_device_train_batch_size=args.per_device_train_batch_size,
            pad_token_id=self.processing_class.pad_token_id,
            optimizer=shared.replay_optimizer(args),
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            beta=args.beta,
            num_iterations=self.num_iterations,
            steps_per_generation=args.steps_per_generation,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            max_completion_length=args.max_completion_length,
            num_generations=self.num_generations,
            **specific,
        )

    def _manifest(self) -> RunManifest:
        return shared.run_manifest(
            self.args, self.iif, self.accelerator, self.training_settings(),
            records_per_round=self.args.generation_batch_size, keep_steps=True, group_size=self.num_generations,
        )  # fmt: skip


@contextmanager
def _no_dropout(model: nn.Module):
    """Dropout off while scoring (a record's gradient is then its expected one), as TRL's
    ``disable_dropout_in_model`` does it: p = 0 (some attention layers read ``dropout.p`` in
    training mode rather than calling the module); restored after."""
    modules = [(m, m.p) for m in model.modules() if isinstance(m, nn.Dropout)]
    for module, _ in modules:
        module.p = 0.0
    try:
        yield
    finally:
        for module, p in modules:
            module.p = p


def _joined(steps: list[dict]) -> dict:
    """A round's generation batch from TRL's buffered slices of it (their tensors concatenated;
    one round's slices share the prompt and completion widths)."""
    return {
        key: torch.cat([step[key] for step in steps])
        for key, value in steps[0].items()
        if isinstance(value, torch.Tensor) and value.ndim > 0
    }
