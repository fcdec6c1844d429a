"""IIFRLOOConfig: TRL's RLOOConfig plus the IIF settings (:class:`~rlhf_influence.iif.settings.IIFSettings`)."""

from __future__ import annotations

from dataclasses import dataclass

from trl import RLOOConfig

from .group_config import GroupIIFSettings


@dataclass
class IIFRLOOConfig(RLOOConfig, GroupIIFSettings):
    """RLOOConfig with Iterative Influence-based Filtering (IIF); a record is one completion.

    A round is one generation batch (see :class:`~rlhf_influence.trainer.group_config.GroupIIFSettings`).
    RLOO's KL penalty (``beta``) is part of each completion's reward, so of its advantage;
    ``--kl_control adaptive`` steers it.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_group_settings(
            "RLOO",
            {"use_vllm": (self.use_vllm, "false"), "use_liger_kernel": (self.use_liger_kernel, "false")},
        )
