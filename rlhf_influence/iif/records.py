"""The records of a round: TRL PPO's rollout batch, and the trainer-neutral description IIF scores."""

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
    exact_kl: torch.Tensor | None = None  # [n] each response's KL to the reference (kl.exact_kl)

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

    def scored_records(self, pad_token_id: int) -> ScoredRecords:
        """These records as IIF scores them (TRL PPO's conventions: every non-pad token attended,
        positions from the attention mask, sampling log-probs as the ratio's denominator)."""
        c = self.context_length
        aligned = lambda t: None if t is None else torch.nn.functional.pad(t, (c, 0))  # noqa: E731
        return ScoredRecords(
            input_ids=self.query_responses,
            attention_mask=self.query_responses != pad_token_id,
            response_mask=self.response_mask(),
            advantages=aligned(self.advantages),
            context_length=c,
            old_logprobs=aligned(self.logprobs),
            old_values=aligned(self.values),
            returns=aligned(self.returns),
            value_mask=torch.nn.functional.pad(~self.padding_mask_p1, (c, 0), value=False),
        )


@dataclass
class ScoredRecords:
    """The records IIF scores, whatever trainer made them: prompt+response token ids, masks,
    sampling log-probs and advantages, aligned with ``input_ids`` ``[n, T]``.

    Built by the PPO trainer (:meth:`RolloutBatch.scored_records`), the GRPO trainer and the audit's
    replay from the store (``store.schema.records_from_stored``, which with ``records_to_stored``
    is the store's layout of them).
    ``old_logprobs`` None means the records were sampled by the weights they are scored at
    (importance ratio 1). ``group`` is the GRPO group (one prompt's completions), None for PPO.
    """

    input_ids: torch.Tensor  # [n, T] prompt (left-padded) then response
    attention_mask: torch.Tensor  # [n, T] bool
    response_mask: torch.Tensor  # [n, T] bool: response tokens that count in the loss
    advantages: torch.Tensor  # [n, T] per-token advantages (0 off the response)
    context_length: int  # prompt width C: the response starts at column C
    old_logprobs: torch.Tensor | None = None  # [n, T] sampling log-probs of the response tokens
    ref_logprobs: torch.Tensor | None = None  # [n, T] reference log-probs (GRPO's KL term)
    group: torch.Tensor | None = None  # [n] long
    positions_from_mask: bool = True  # position ids follow the attention mask (TRL's PPO) or not (GRPO)
    position_offset: torch.Tensor | None = None  # [n] left padding added after training (stored rounds)
    old_values: torch.Tensor | None = None  # [n, T] PPO's values at sampling (the value loss's clip centre)
    returns: torch.Tensor | None = None  # [n, T] PPO's value targets
    value_mask: torch.Tensor | None = None  # [n, T] bool: positions PPO's value loss counts (one past the response)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, indices) -> ScoredRecords:
        """The records at ``indices``."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.input_ids.device)
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            values[f.name] = value[idx] if isinstance(value, torch.Tensor) else value
        return ScoredRecords(**values)

    def sequence_advantages(self) -> torch.Tensor:
        """Each record's advantage at its last response token, ``[n]`` (GRPO: the completion's)."""
        columns = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        last = torch.where(self.response_mask, columns, -1).max(dim=1).values.clamp_min(0)
        return self.advantages.gather(1, last[:, None]).squeeze(1)

    def num_tokens(self) -> torch.Tensor:
        """Response tokens counted in the loss per record, ``[n]``."""
        return self.response_mask.sum(1)

    def num_value_tokens(self) -> torch.Tensor:
        """Positions PPO's value loss counts per record, ``[n]`` (ValueError without a value mask)."""
        if self.value_mask is None:
            raise ValueError("these records carry no value targets (old values, returns, value mask)")
        return self.value_mask.sum(1)
