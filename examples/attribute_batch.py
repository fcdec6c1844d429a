"""Attribute one rollout batch: which prompt-response records push the policy where?

Runs offline in seconds: a tiny GPT-2 with LoRA adapters, a word-level tokenizer, 48 sampled
responses scored by a word-count reward. It computes every record's influence (exact, one
forward and one backward over the batch) on two targets:

- the held-out return target: does a PPO step on the record raise expected reward?
- a log-prob target: does it make the model more likely to answer "the movie was" with "great fun"?

and checks the engine against a per-record autograd loop and its random projection.

    python examples/attribute_batch.py
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from rlhf_influence import (
    LogProbTarget,
    RandomProjector,
    ReturnTarget,
    capture_factors,
    encode_pairs,
    find_lora_layout,
    ppo_policy_loss,
    scores_from_factors,
    target_gradients,
)
from rlhf_influence.tasks.toy import tiny_lora_policy, word_tokenizer

POSITIVE = {"great", "good", "fun", "lovely", "wonderful", "brilliant", "funny", "bright", "liked", "loved"}
NEGATIVE = {"bad", "boring", "awful", "dull", "terrible", "slow", "sad", "dark", "hated"}
PROMPTS = [
    "the movie was",
    "i thought the film",
    "this story is",
    "we watched the show and",
    "the ending felt",
    "it was",
]


def reward(text: str) -> float:
    words = text.split()
    return float(sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words))


def sample(policy, tokenizer, prompts: list[str], max_new_tokens: int = 6) -> list[str]:
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = policy.generate(
            **enc,
            do_sample=True,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            top_k=0,
            top_p=1.0,
        )
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def main() -> None:
    console = Console()
    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    policy = tiny_lora_policy(len(tokenizer), arch="gpt2", seed=0)
    policy.eval()

    # One rollout batch of records and their advantages (reward minus the batch mean).
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(48)]
    responses = sample(policy, tokenizer, prompts)
    rewards = torch.tensor([reward(r) for r in responses])
    advantages = rewards - rewards.mean()
    input_ids, attention_mask, response_mask = encode_pairs(tokenizer, prompts, responses)
    token_adv = response_mask * advantages[:, None]

    def loss_fn(model):  # each record's PPO loss at the round-start snapshot
        return ppo_policy_loss(model, input_ids, attention_mask, response_mask, token_adv)

    # Targets: held-out prompts with fresh samples, and a behaviour chosen by hand.
    heldout_prompts = [PROMPTS[i % len(PROMPTS)] for i in range(24)]
    heldout_responses = sample(policy, tokenizer, heldout_prompts)
    heldout_rewards = torch.tensor([reward(r) for r in heldout_responses])
    heldout = ReturnTarget.from_heldout(
        *encode_pairs(tokenizer, heldout_prompts, heldout_responses), heldout_rewards - heldout_rewards.mean()
    )
    behaviour = LogProbTarget.from_text(tokenizer, ["the movie was"], ["great fun"])

    layout = find_lora_layout(policy)
    start = time.perf_counter()
    target_grads = target_gradients(policy, [heldout, behaviour], layout=layout)
    factors = capture_factors(policy, loss_fn, layout=layout)
    scores = scores_from_factors(factors, target_grads)  # [48, 2], exact
    elapsed = time.perf_counter() - start

    console.print(
        f"[bold]{len(prompts)} records[/], {layout.num_params:,} LoRA parameters in {len(layout)} adapters; "
        f"exact influence on 2 targets in {elapsed * 1000:.0f} ms (one forward+backward per target and batch)"
    )
    for column, title in (
        (0, "held-out return target"),
        (1, 'log-prob target: "the movie was" -> "great fun"'),
    ):
        order = scores[:, column].argsort(descending=True)
        table = Table(title=f"Influence on the {title}", show_lines=False)
        for name, justify in (
            ("", "left"),
            ("influence", "right"),
            ("reward", "right"),
            ("prompt", "left"),
            ("response", "left"),
        ):
            table.add_column(name, justify=justify)
        for label, rows in (("top", order[:4]), ("bottom", order[-4:])):
            for i in rows.tolist():
                table.add_row(
                    label, f"{scores[i, column]:+.2e}", f"{rewards[i]:+.0f}", prompts[i], responses[i]
                )
        console.print(table)

    # Checks: a per-record autograd loop (4 records) and the seeded random projection.
    params = [p for p in policy.parameters() if p.requires_grad]
    exact = factors.gradients()
    worst = 0.0
    for i in range(4):
        reference = torch.cat([g.flatten() for g in torch.autograd.grad(loss_fn(policy)[i], params)])
        worst = max(worst, float((exact[i] - reference).norm() / reference.norm()))
    projected = scores_from_factors(factors, target_grads, RandomProjector(dim=16, seed=0))
    rho = spearmanr(scores[:, 0].numpy(), projected[:, 0].numpy()).statistic
    positive = scores[:, 0] > 0
    console.print(
        f"max relative error vs per-record autograd: {worst:.1e}; "
        f"Spearman(exact, projected dim=16) on the return target: {rho:.3f}; "
        f"records helpful to it: {int(positive.sum())}/{len(prompts)} "
        f"(mean reward {rewards[positive].mean():+.2f} vs {rewards[~positive].mean():+.2f})"
    )
    if worst > 1e-4:
        raise SystemExit("per-record gradients disagree with autograd")


if __name__ == "__main__":
    main()
