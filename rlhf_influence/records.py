"""A rollout batch: the prompt-response records of one PPO round, the unit of attribution."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class RolloutBatch:
    """One process's records of a round. Response-aligned tensors are ``[n, R]``.

    ``padding_mask`` marks response positions after the record's last token (TRL's convention);
    ``padding_mask_p1`` is the same shifted by one (value targets include the next position).
    """

    queries: torch.Tensor  # [n, C] left-padded prompt ids
    query_responses: torch.Tensor  # [n, C + R]
    responses: torch.Tensor  # [n, R] sampled tokens
    postprocessed_responses: torch.Tensor  # [n, R] truncated after the stop token
    logprobs: torch.Tensor  # [n, R] policy log-probs at sampling
    ref_logprobs: torch.Tensor  # [n, R]
    values: torch.Tensor  # [n, R]
    scores: torch.Tensor  # [n] reward of each response (after the missing-EOS penalty)
    sequence_lengths: torch.Tensor  # [n] index of each response's last token
    padding_mask: torch.Tensor  # [n, R] bool
    padding_mask_p1: torch.Tensor  # [n, R] bool
    kl: torch.Tensor | None = None  # [n, R] per-token KL estimate to the reference
    non_score_reward: torch.Tensor | None = None  # [n, R]
    advantages: torch.Tensor | None = None  # [n, R] whitened, 0 on padding
    returns: torch.Tensor | None = None  # [n, R]

    def __len__(self) -> int:
        return self.queries.shape[0]

    @property
    def context_length(self) -> int:
        return self.queries.shape[1]

    def select(self, indices) -> RolloutBatch:
        """The records at ``indices`` (a tensor, array or list of positions)."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.queries.device)
        return RolloutBatch(
            **{
                f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx])
                for f in fields(self)
            }
        )

    def response_mask(self) -> torch.Tensor:
        """Positions of ``query_responses`` holding the records' response tokens, ``[n, C + R]``."""
        valid = ~self.padding_mask
        return torch.nn.functional.pad(valid, (self.context_length, 0), value=False)

    def last_token_advantages(self) -> torch.Tensor:
        """Each record's advantage at its last response token, ``[n]``."""
        last = self.sequence_lengths.clamp(min=0, max=self.responses.shape[1] - 1)
        return self.advantages.gather(1, last[:, None]).squeeze(1)

    def mean_advantages(self) -> torch.Tensor:
        valid = (~self.padding_mask).float()
        return (self.advantages * valid).sum(1) / valid.sum(1).clamp_min(1)

    def sequence_logprobs(self) -> torch.Tensor:
        """Sum of the sampled responses' token log-probs under the sampling policy, ``[n]``."""
        return (self.logprobs * (~self.padding_mask)).sum(1)
