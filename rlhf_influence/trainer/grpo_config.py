"""IIFGRPOConfig: TRL's GRPOConfig plus the IIF settings (:class:`~rlhf_influence.settings.IIFSettings`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from ..losses import GRPO_LOSS_TYPES
from ..settings import IIFSettings


@dataclass
class IIFGRPOConfig(GRPOConfig, IIFSettings):
    """GRPOConfig with Iterative Influence-based Filtering (IIF); a record is one completion.

    A round is one generation batch. ``iif_schedule='round'`` scores it once, before its first
    optimisation step; ``'epoch'`` re-scores it before each of its ``num_iterations`` passes.
    The held-out target samples ``num_generations`` completions for each of
    ``iif_num_heldout_prompts`` prompts. Dropped completions leave TRL's step count as it is:
    each step trains on the kept completions of its slice of the generation batch.
    """

    iif_keep_steps: bool = field(
        default=True,
        metadata={
            "help": "GRPO keeps TRL's number of optimizer steps (the Trainer's loop counts them): dropped "
            "completions make each step's micro-batch smaller, never fewer steps. Only true is accepted."
        },
    )

    iif_heldout_sampling: str = field(
        default="separate",
        metadata={
            "help": "GRPO samples the held-out target's completions in their own call, under their own seed "
            "('separate'), so training's random stream is TRL's. Only 'separate' is accepted.",
            "choices": ["separate"],
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_iif_settings()
        self.check_kl_coefficient("beta", self.beta)
        if self.iif_record_loss != "policy":
            raise ValueError("iif_record_loss='policy_and_value' is PPO's (with a shared value head); GRPO has no value loss")
        if not self.iif_enabled:
            return
        if not self.iif_keep_steps:
            raise ValueError(
                "iif_keep_steps=false (fewer optimizer steps) is PPO's; GRPO keeps TRL's step count"
            )
        if self.iif_heldout_sampling != "separate":
            raise ValueError(
                "iif_heldout_sampling='with_rollout' is PPO's; GRPO samples the held-out target apart"
            )
        if self.iif_whiten_after_filter:
            raise ValueError("iif_whiten_after_filter is PPO's; GRPO's advantages are group-relative already")
        unsupported = {
            "loss_type": (self.loss_type not in GRPO_LOSS_TYPES, f"one of {GRPO_LOSS_TYPES}"),
            "importance_sampling_level": (self.importance_sampling_level != "token", "'token'"),
            "top_entropy_quantile": (self.top_entropy_quantile != 1.0, "1.0"),
            "off_policy_mask_threshold": (self.off_policy_mask_threshold is not None, "None"),
            "entropy_coef": (
                self.entropy_coef != 0.0 or self.use_adaptive_entropy,
                "0 (no adaptive entropy)",
            ),
            "use_vllm": (self.use_vllm, "false"),
            "use_liger_kernel": (self.use_liger_kernel, "false"),
        }
        for name, (bad, wanted) in unsupported.items():
            if bad:
                raise ValueError(
                    f"IIF scores each completion with GRPO's policy loss as written in rlhf_influence.losses; "
                    f"{name}={getattr(self, name)!r} changes that loss and is not supported (use {wanted}, or "
                    "iif_enabled=false)"
                )
