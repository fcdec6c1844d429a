"""Target functions f(theta) that records are attributed to, and the record's PPO loss.

All work on a causal LM and on prompt-response sequences laid out as ``input_ids`` /
``attention_mask`` ``[m, T]`` (left or right padding) with a ``response_mask`` ``[m, T]`` that
marks the positions holding response tokens. ``token_logprobs`` gives log pi(token_t | <t) at
each position, so a target is a weighted sum of it:

- :class:`LogProbTarget`: f = sum over the given pairs of log pi(y | x)  ("say y to x").
- :class:`ReturnTarget`: f = mean over pairs of  sum_t A_t log pi(y_t | x, y_<t), a
  REINFORCE-with-baseline surrogate of expected return at the current snapshot. Built from the
  rollout buffer's own records and per-token advantages (``from_buffer``), or from held-out
  prompts with freshly sampled responses and their last-token advantages (``from_heldout``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .errors import UnknownTokenWarning


def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    positions_from_mask: bool = True,
    position_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """log pi(input_ids[:, t] | input_ids[:, :t]) at every position ``[m, T]`` (0 at t = 0).

    Position ids follow the attention mask, so left-padded and right-padded batches give the
    same values for the same tokens (TRL's PPO does this); ``positions_from_mask=False`` leaves
    them to the model (0..T-1 whatever the padding), as TRL's GRPOTrainer calls it, or with
    ``position_offset`` ``[m]`` starts row i at -offset_i (rows left-padded further than they were
    in training, as a store gathered over processes pads them). Logits are divided by
    ``temperature`` as in sampling.
    """
    logp, _ = token_logprobs_and_hidden(
        model, input_ids, attention_mask, temperature, positions_from_mask, position_offset, hidden=False
    )
    return logp


def token_logprobs_and_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    positions_from_mask: bool = True,
    position_offset: torch.Tensor | None = None,
    hidden: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`token_logprobs` and, from the same forward, the last hidden state that predicts each
    position ``[m, T, H]`` (row t holds the state at t - 1, zeros at t = 0), as a value head reads it."""
    mask = attention_mask.bool()
    inputs = {"input_ids": input_ids.masked_fill(~mask, 0), "attention_mask": mask.long()}
    if positions_from_mask:
        inputs["position_ids"] = (mask.long().cumsum(dim=1) - 1).clamp_min(0)
    elif position_offset is not None:
        columns = torch.arange(input_ids.shape[1], device=input_ids.device)
        inputs["position_ids"] = (columns[None] - position_offset.to(input_ids.device)[:, None]).clamp_min(0)
    output = model(**inputs, output_hidden_states=True) if hidden else model(**inputs)
    logits = output.logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    picked = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    states = None
    if hidden:
        states = torch.nn.functional.pad(output.hidden_states[-1][:, :-1], (0, 0, 1, 0))
    return torch.nn.functional.pad(picked, (1, 0)), states


def _check_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [m, T], got shape {tuple(input_ids.shape)}")
    for name, t in (("attention_mask", attention_mask), ("response_mask", response_mask)):
        if t.shape != input_ids.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, input_ids {tuple(input_ids.shape)}")
    if bool(response_mask[:, 0].any()):
        raise ValueError("response_mask marks position 0, which has no preceding prompt token")
    if bool((response_mask.bool() & ~attention_mask.bool()).any()):
        raise ValueError("response_mask marks padding positions (attention_mask is 0 there)")


class TokenWeightedLogProb:
    """f(theta) = sum_{j,t} w_{j,t} log pi(y_{j,t}); called as ``f(model) -> Tensor[m]``."""

    def __init__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_weights: torch.Tensor,
        temperature: float = 1.0,
        *,
        positions_from_mask: bool = True,
        position_offset: torch.Tensor | None = None,
    ) -> None:
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.token_weights = token_weights
        self.temperature = temperature
        self.positions_from_mask = positions_from_mask  # as token_logprobs; False: the model's own positions (GRPO)
        self.position_offset = position_offset  # [m], with positions_from_mask=False

    def __call__(self, model: nn.Module) -> torch.Tensor:
        logp = token_logprobs(
            model,
            self.input_ids,
            self.attention_mask,
            self.temperature,
            self.positions_from_mask,
            self.position_offset,
        )
        return (logp * self.token_weights.to(logp.dtype)).sum(dim=1)


class LogProbTarget(TokenWeightedLogProb):
    """f(theta) = sum over pairs of log pi(response | prompt): which records made these more likely."""

    def __init__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        temperature: float = 1.0,
        *,
        positions_from_mask: bool = True,
    ) -> None:
        _check_layout(input_ids, attention_mask, response_mask)
        super().__init__(input_ids, attention_mask, response_mask.float(), temperature,
                         positions_from_mask=positions_from_mask)  # fmt: skip

    @classmethod
    def from_text(
        cls,
        tokenizer,
        prompts: Sequence[str],
        responses: Sequence[str],
        device: torch.device | str | None = None,
        *,
        temperature: float = 1.0,
        positions_from_mask: bool = True,
    ) -> LogProbTarget:
        """Tokenise prompt-response pairs (prompt and response tokenised separately)."""
        input_ids, attention_mask, response_mask = encode_pairs(tokenizer, prompts, responses)
        return cls(input_ids.to(device), attention_mask.to(device), response_mask.to(device), temperature,
                   positions_from_mask=positions_from_mask)  # fmt: skip


class ReturnTarget(TokenWeightedLogProb):
    """f(theta) = mean over pairs of sum_t A_t log pi(y_t | x, y_<t).

    ``advantages`` is ``[m]`` (one advantage per pair, applied to the whole response's
    log-prob) or ``[m, T]`` (per-token, aligned with ``input_ids``; only response positions count).
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        advantages: torch.Tensor,
        temperature: float = 1.0,
        *,
        positions_from_mask: bool = True,
        position_offset: torch.Tensor | None = None,
    ) -> None:
        _check_layout(input_ids, attention_mask, response_mask)
        m = input_ids.shape[0]
        if advantages.shape == (m,):
            advantages = advantages[:, None]
        elif advantages.shape != input_ids.shape:
            raise ValueError(
                f"advantages must be [m]={m} or [m, T]={tuple(input_ids.shape)}, got {tuple(advantages.shape)}"
            )
        if not bool(torch.isfinite(advantages).all()):
            raise ValueError("advantages contain NaN or infinite values")
        weights = response_mask.to(advantages.dtype) * advantages / m
        super().__init__(input_ids, attention_mask, weights, temperature, positions_from_mask=positions_from_mask,
                         position_offset=position_offset)  # fmt: skip

    @classmethod
    def from_buffer(cls, input_ids, attention_mask, response_mask, token_advantages, temperature=1.0):
        """Buffer form: the round's own records and their per-token advantages ``[m, T]``."""
        return cls(input_ids, attention_mask, response_mask, token_advantages, temperature)

    @classmethod
    def from_heldout(cls, input_ids, attention_mask, response_mask, last_token_advantages, temperature=1.0):
        """Held-out form: held-out prompts, responses sampled now, last-token advantages ``[m]``."""
        return cls(input_ids, attention_mask, response_mask, last_token_advantages, temperature)


def ppo_policy_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    *,
    clip_range: float = 0.2,
    normaliser: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Each record's clipped PPO surrogate loss ``[n]`` (the records' training losses).

    loss_i = sum_t mask * max(-A r, -A clip(r, 1-eps, 1+eps)) / normaliser with
    r = exp(logp - old_logp). ``normaliser`` defaults to the number of response tokens in the
    batch, which makes the losses sum to the batch's masked-mean loss. Without
    ``old_logprobs`` the ratio is 1 (the round-start snapshot) and clipping is inactive, so
    the gradient of record i is -sum_t A_t grad log pi(y_t) / normaliser.
    """
    _check_layout(input_ids, attention_mask, response_mask)
    logp = token_logprobs(model, input_ids, attention_mask, temperature)
    return clipped_policy_loss(logp, response_mask, advantages, old_logprobs, clip_range, normaliser)


def clipped_policy_loss(
    logp: torch.Tensor,
    response_mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    clip_range: float,
    normaliser: float | None = None,
) -> torch.Tensor:
    """PPO's clipped surrogate per record ``[n]`` from the log-probs ``[n, T]`` (see :func:`ppo_policy_loss`)."""
    old = logp.detach() if old_logprobs is None else old_logprobs.to(logp.dtype)
    ratio = torch.exp(logp - old)
    adv = advantages.to(logp.dtype)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range))
    mask = response_mask.to(logp.dtype)
    denom = mask.sum() if normaliser is None else torch.as_tensor(normaliser, dtype=logp.dtype)
    return (per_token * mask).sum(dim=1) / denom


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    value_mask: torch.Tensor,
    clip_range_value: float,
    normaliser: float | None = None,
) -> torch.Tensor:
    """Each record's share of TRL PPO's value loss ``[n]``: ``0.5 * sum_t mask * max((V - R)^2,
    (clip(V, V_old - c, V_old + c) - R)^2) / normaliser``, ``normaliser`` defaulting to the batch's
    masked positions (TRL's masked mean over the micro-batch)."""
    values = values.to(returns.dtype)
    clipped = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    per_token = torch.maximum(torch.square(values - returns), torch.square(clipped - returns))
    mask = value_mask.to(per_token.dtype)
    denom = mask.sum() if normaliser is None else torch.as_tensor(normaliser, dtype=per_token.dtype)
    return 0.5 * (per_token * mask).sum(dim=1) / denom


def encode_pairs(tokenizer, prompts: Sequence[str], responses: Sequence[str]):
    """Tokenise prompt-response pairs into ``input_ids, attention_mask, response_mask`` ``[m, T]``.

    Prompt and response are tokenised separately (as generation produces them) and laid out
    following ``tokenizer.padding_side``.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("no prompt-response pairs given")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    unk_id = getattr(tokenizer, "unk_token_id", None)
    rows = []
    for prompt, response in zip(prompts, responses, strict=True):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        if not p or not r:
            raise ValueError(f"empty prompt or response after tokenisation: {prompt!r} -> {response!r}")
        unknown = (p + r).count(unk_id) if unk_id is not None else 0
        if unknown:
            warnings.warn(
                f"{unknown} piece(s) of {prompt!r} -> {response!r} are unknown to the tokenizer (read as "
                f"{tokenizer.unk_token!r}): the scores are for that, not for the words typed",
                UnknownTokenWarning,
                stacklevel=2,
            )
        rows.append((p, r))
    width = max(len(p) + len(r) for p, r in rows)
    m = len(rows)
    input_ids = torch.full((m, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(m, width, dtype=torch.long)
    response_mask = torch.zeros(m, width, dtype=torch.bool)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    for j, (p, r) in enumerate(rows):
        length = len(p) + len(r)
        start = width - length if left else 0
        input_ids[j, start : start + length] = torch.tensor(p + r)
        attention_mask[j, start : start + length] = 1
        response_mask[j, start + len(p) : start + length] = True
    return input_ids, attention_mask, response_mask
