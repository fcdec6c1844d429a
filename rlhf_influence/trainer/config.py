"""IIFPPOConfig: TRL's PPOConfig plus the IIF settings (:class:`~rlhf_influence.settings.IIFSettings`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl.experimental.ppo import PPOConfig

from ..settings import HELDOUT_SAMPLING, SCHEDULES, SNAPSHOT_DTYPES, TARGETS, IIFSettings

__all__ = ["HELDOUT_SAMPLING", "SCHEDULES", "SNAPSHOT_DTYPES", "TARGETS", "IIFPPOConfig"]


@dataclass
class IIFPPOConfig(PPOConfig, IIFSettings):
    """PPOConfig with Iterative Influence-based Filtering (IIF).

    Every field is also a command-line flag through ``TrlParser`` / ``HfArgumentParser``.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_iif_settings()
        if str(getattr(self.save_strategy, "value", self.save_strategy)) not in ("steps", "no"):
            raise ValueError(
                f"save_strategy={self.save_strategy!r} is the Trainer's; IIF-PPO checkpoints every save_steps rounds "
                "('steps') or never ('no')"
            )
        self.check_kl_coefficient("kl_coef", self.kl_coef)
