"""Targets against direct recomputation, one unpadded sequence at a time."""

from __future__ import annotations

import pytest
import torch
from conftest import record_batch, rel_err, tiny_lora_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf_influence import LogProbTarget, ReturnTarget, encode_pairs, ppo_policy_loss, token_logprobs


def unpadded_logprob_sum(model, ids: torch.Tensor, response_positions: list[int]) -> torch.Tensor:
    """Sum of log pi(ids[t] | ids[:t]) over the given positions, for one sequence without padding."""
    logits = model(input_ids=ids[None]).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[t - 1, ids[t]] for t in response_positions)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logprob_target_equals_unpadded_recomputation(arch, padding_side):
    model = tiny_lora_model(arch)
    input_ids, attention_mask, response_mask = record_batch(4, padding_side=padding_side, seed=4)
    target = LogProbTarget(input_ids, attention_mask, response_mask)
    values = target(model)
    for j in range(4):
        keep = attention_mask[j].bool()
        ids = input_ids[j][keep]
        positions = response_mask[j][keep].nonzero().flatten().tolist()
        assert rel_err(values[j], unpadded_logprob_sum(model, ids, positions)) < 1e-6


def test_return_target_weights_logprobs_by_advantage():
    model = tiny_lora_model("gpt2")
    batch = record_batch(3, seed=5)
    adv = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    seq_logp = LogProbTarget(*batch)(model)
    heldout = ReturnTarget.from_heldout(*batch, adv)(model).sum()
    assert rel_err(heldout, (seq_logp * adv).mean()) < 1e-12
    token_adv = torch.randn(batch[0].shape, dtype=torch.float64)
    logp = token_logprobs(model, batch[0], batch[1])
    buffer = ReturnTarget.from_buffer(*batch, token_adv)(model).sum()
    assert rel_err(buffer, (logp * token_adv * batch[2]).sum() / 3) < 1e-12


def test_ppo_loss_at_snapshot_is_minus_advantage_weighted_logprob_gradient():
    model = tiny_lora_model("gpt2")
    batch = record_batch(3, seed=6)
    adv = torch.randn(batch[0].shape, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = ppo_policy_loss(model, *batch, adv).sum()
    surrogate = -(token_logprobs(model, batch[0], batch[1]) * adv * batch[2]).sum() / batch[2].sum()
    g1 = torch.autograd.grad(loss, params)
    g2 = torch.autograd.grad(surrogate, params)
    assert rel_err(torch.cat([g.flatten() for g in g1]), torch.cat([g.flatten() for g in g2])) < 1e-10


def test_ppo_loss_clips_like_the_surrogate():
    model = tiny_lora_model("gpt2")
    batch = record_batch(2, seed=7)
    adv = torch.ones(batch[0].shape, dtype=torch.float64)
    logp = token_logprobs(model, batch[0], batch[1]).detach()
    # old log-probs far below: ratio >> 1+eps, positive advantage -> clipped at 1+eps.
    loss = ppo_policy_loss(model, *batch, adv, old_logprobs=logp - 5.0, clip_range=0.2)
    mask = batch[2].double()
    expected = -(1.2 * mask).sum(dim=1) / mask.sum()
    assert rel_err(loss.detach(), expected) < 1e-12


def tiny_tokenizer(padding_side="left"):
    words = ["<pad>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "<unk>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", padding_side=padding_side
    )


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_encode_pairs_lays_out_prompt_then_response(padding_side):
    tok = tiny_tokenizer(padding_side)
    ids, mask, resp = encode_pairs(tok, ["the cat", "a dog ran"], ["sat", "on the mat"])
    assert ids.shape == (2, 6)
    assert tok.decode(ids[0][resp[0]]) == "sat"
    assert tok.decode(ids[1][resp[1]]) == "on the mat"
    assert int(mask[0].sum()) == 3 and int(mask[1].sum()) == 6
    left_padded = padding_side == "left"
    assert bool(mask[0, 0]) != left_padded


def test_encode_pairs_and_target_errors():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        encode_pairs(tok, ["the", "cat"], ["sat"])
    with pytest.raises(ValueError, match="empty prompt or response"):
        encode_pairs(tok, ["the"], [""])
    ids, mask, resp = encode_pairs(tok, ["the cat"], ["sat"])
    with pytest.raises(ValueError, match="advantages must be"):
        ReturnTarget(ids, mask, resp, torch.ones(3))
    with pytest.raises(ValueError, match="NaN or infinite"):
        ReturnTarget(ids, mask, resp, torch.tensor([float("nan")]))
    bad = resp.clone()
    bad[0, 0] = True
    with pytest.raises(ValueError, match="position 0"):
        LogProbTarget(ids, mask, bad)
