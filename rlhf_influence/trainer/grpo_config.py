"""IIFGRPOConfig: TRL's GRPOConfig plus the IIF settings (:class:`~rlhf_influence.iif.settings.IIFSettings`)."""

from __future__ import annotations

from dataclasses import dataclass

from trl import GRPOConfig

from ..iif.losses import GRPO_LOSS_TYPES
from .group_config import GroupIIFSettings


@dataclass
class IIFGRPOConfig(GRPOConfig, GroupIIFSettings):
    """GRPOConfig with Iterative Influence-based Filtering (IIF); a record is one completion.

    A round is one generation batch (see :class:`~rlhf_influence.trainer.group_config.GroupIIFSettings`).
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_group_settings(
            "GRPO",
            {
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
            },
        )
