"""PPO's optimisation, as TRL 1.12's PPOTrainer does it, over the records the filter kept:
each epoch's shuffled mini-batches and micro-batches (the same number on every process), the
clipped policy and value losses, and optional re-whitening of the kept records' advantages.

Step 5 of :meth:`IIFPPOTrainer.train <rlhf_influence.trainer.ppo.IIFPPOTrainer.train>`, a mixin of
the trainer (it reads the trainer's ``args``, ``model``, ``optimizer`` and ``accelerator``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl.experimental.ppo.ppo_trainer import INVALID_LOGPROB, forward, masked_mean, masked_whiten
from trl.trainer.utils import selective_log_softmax

from ..iif.filtering import plan_epoch
from ..iif.records import RolloutBatch
from ..iif.training_gradients import TrainingGradients


class PPOOptimisation:
    """One PPO epoch over the kept records (TRL 1.12's losses and steps)."""

    def ppo_epoch(
        self,
        batch: RolloutBatch,
        keep_local: np.ndarray | None,
        stats: dict[str, list[float]],
        collected: TrainingGradients | None = None,
    ) -> None:
        """Mini-batch PPO over the kept records (all when ``keep_local`` is None), the same number
        of micro-batches on every process; ``collected`` keeps each record's gradient from the backward."""
        args = self.args
        if keep_local is None:
            keep_local = np.ones(args.local_batch_size, dtype=bool)
        with self._advantages_whitened_over(batch, keep_local if args.iif_whiten_after_filter else None):
            self._run_epoch_plan(batch, keep_local, stats, collected)

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
        self,
        batch: RolloutBatch,
        keep_local: np.ndarray,
        stats: dict[str, list[float]],
        collected: TrainingGradients | None = None,
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
                    recording = collected is not None and real
                    with collected.recording(micro) if recording else nullcontext():
                        loss, micro_stats = self._ppo_loss(batch, micro if real else np.array([0]))
                        if not real:  # keeps collectives in step on a process with no record left
                            loss = loss * 0.0
                        self.accelerator.backward(loss)
                    if recording:  # the policy loss is a masked mean over the micro-batch's response tokens
                        tokens = float((~batch.padding_mask[micro]).sum())
                        collected.collect(micro, tokens, self.accelerator.gradient_accumulation_steps)
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

