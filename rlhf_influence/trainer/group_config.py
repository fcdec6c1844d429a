"""The IIF settings of the trainers that sample groups of completions (GRPO, RLOO), and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..iif.settings import IIFSettings


@dataclass
class GroupIIFSettings(IIFSettings):
    """IIFSettings as a group trainer takes them; a record is one completion.

    A round is one generation batch. ``iif_schedule='round'`` scores it once, before its first
    optimisation step; ``'epoch'`` re-scores it before each of its ``num_iterations`` passes;
    ``'step'`` decides inside its first optimizer step, from that step's own backward.
    The held-out target samples ``num_generations`` completions for each of
    ``iif_num_heldout_prompts`` prompts. Dropped completions leave TRL's step count as it is:
    each step trains on the kept completions of its slice of the generation batch.
    """

    iif_keep_steps: bool = field(
        default=True,
        metadata={
            "help": "GRPO and RLOO keep TRL's number of optimizer steps (the Trainer's loop counts them): dropped "
            "completions make each step's micro-batch smaller, never fewer steps. Only true is accepted."
        },
    )

    iif_heldout_sampling: str = field(
        default="separate",
        metadata={
            "help": "GRPO and RLOO sample the held-out target's completions in their own call, under their own "
            "seed ('separate'), so training's random stream is TRL's. Only 'separate' is accepted.",
            "choices": ["separate"],
        },
    )

    def check_group_settings(self, title: str, unsupported: dict[str, tuple[bool, str]]) -> None:
        """The IIF and KL settings' checks, then what a group trainer refuses: PPO's own settings and
        the ``unsupported`` ones (name: (refused, what to use)) that would change the loss IIF scores."""
        self.check_iif_settings()
        self.check_kl_coefficient("beta", self.beta)
        if self.iif_record_loss != "policy":
            raise ValueError(
                f"iif_record_loss='policy_and_value' is PPO's (with a shared value head); {title} has no value loss"
            )
        if not self.iif_enabled:
            return
        if not self.iif_keep_steps:
            raise ValueError(f"iif_keep_steps=false (fewer optimizer steps) is PPO's; {title} keeps TRL's step count")
        if self.iif_heldout_sampling != "separate":
            raise ValueError(f"iif_heldout_sampling='with_rollout' is PPO's; {title} samples the held-out target apart")
        if self.iif_schedule == "step" and self.steps_per_generation != self.gradient_accumulation_steps:
            raise ValueError(
                f"iif_schedule='step' decides inside a round's one optimizer step: it needs steps_per_generation "
                f"({self.steps_per_generation}) == gradient_accumulation_steps ({self.gradient_accumulation_steps})"
            )
        if self.iif_whiten_after_filter:
            raise ValueError(f"iif_whiten_after_filter is PPO's; {title}'s advantages are group-relative already")
        for name, (bad, wanted) in unsupported.items():
            if bad:
                raise ValueError(
                    f"IIF scores each completion with {title}'s policy loss as written in rlhf_influence.iif.losses; "
                    f"{name}={getattr(self, name)!r} changes that loss and is not supported (use {wanted}, or "
                    "iif_enabled=false)"
                )
