"""A harder embedded task: rare rewarded words, over a tiny LM briefly pre-trained here.

A small stochastic grammar generates a corpus of simple sentences ("the old dog saw a ball
near the river ."). Colour adjectives, the rewarded words, are rare in it: a noun phrase
takes one with probability ``colour_rate`` (about 0.5% of the corpus's tokens at the default).
A tiny GPT-2 is pre-trained on that corpus for a few hundred steps (seconds on a CPU), so the
policy starts fluent and almost never says a colour; the reward counts the colour words in a
completion. PPO has to find and reinforce a rare behaviour against the KL penalty, and needs
many rounds to plateau: the setting where the paper's filtering should pay.

The pre-trained model is cached on disk (keyed by every setting that changes it), so the
benchmark's many runs pre-train once per seed. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from ..launch.models import cache_root, publish_directory
from . import sentiment
from .base import EmbeddedTask, TaskSpec, group_run_settings, prompt_dataset, run_settings
from .rewards import keyword_reward
from .toy import tiny_causal_lm, toy_lora_config, word_tokenizer

# What the keyword task changes in the default task's settings: longer responses (room for several
# colour words) and a KL penalty strong enough that the climb takes tens of rounds (0.02 lets it
# collapse into colour salad in ~25 rounds; 0.3 stalls it near the start).
# kl_target, with --kl_control adaptive: PPO's KL reaches about 40 here (colour-word salad); hold it at half
TRAINING = {**sentiment.TRAINING, "response_length": 12, "kl_coef": 0.1, "kl_target": 20.0}
ROUNDS = 100
# Under GRPO: the default task's settings with longer completions and GRPO's KL penalty (beta) in
# place of PPO's KL-penalised reward, so the climb takes tens of steps rather than collapsing.
GRPO_TRAINING = {**sentiment.GRPO_TRAINING, "max_completion_length": 12, "beta": 0.1, "kl_target": 5.0}

COLOURS = ["red", "blue", "green", "gold", "silver"]
_ADJECTIVES = ["big", "small", "old", "young", "happy", "tired", "quiet", "little", "tall", "kind"]
_AGENTS = ["dog", "cat", "man", "woman", "boy", "girl", "bird", "horse", "king", "child", "farmer", "teacher"]
_THINGS = ["ball", "house", "tree", "river", "road", "hill", "garden", "box", "book", "door", "boat", "hat"]
_TRANSITIVE = ["saw", "found", "took", "liked", "made", "kept", "carried", "opened", "watched", "wanted"]
_INTRANSITIVE = ["walked", "ran", "slept", "sat", "waited", "sang", "stopped", "smiled"]
_PREPOSITIONS = ["in", "on", "near", "under", "by", "to", "with", "behind"]
_FUNCTION = ["the", "a", "and", "then", "but", "."]

VOCABULARY = (
    COLOURS + _ADJECTIVES + _AGENTS + _THINGS + _TRANSITIVE + _INTRANSITIVE + _PREPOSITIONS + _FUNCTION
)


class SentenceGrammar:
    """Samples sentences; a noun phrase carries a colour with probability ``colour_rate``."""

    def __init__(self, rng: random.Random, colour_rate: float = 0.03) -> None:
        self.rng, self.colour_rate = rng, colour_rate

    def noun_phrase(self, nouns: list[str]) -> list[str]:
        words = [self.rng.choice(["the", "the", "a"])]
        if self.rng.random() < self.colour_rate:
            words.append(self.rng.choice(COLOURS))
        elif self.rng.random() < 0.35:
            words.append(self.rng.choice(_ADJECTIVES))
        return [*words, self.rng.choice(nouns)]

    def prepositional(self) -> list[str]:
        return [self.rng.choice(_PREPOSITIONS), *self.noun_phrase(_THINGS)]

    def sentence(self) -> list[str]:
        words = self.noun_phrase(_AGENTS)
        if self.rng.random() < 0.65:
            words += [self.rng.choice(_TRANSITIVE), *self.noun_phrase(_THINGS + _AGENTS)]
        else:
            words.append(self.rng.choice(_INTRANSITIVE))
        if self.rng.random() < 0.5:
            words += self.prepositional()
        if self.rng.random() < 0.25:
            words += [self.rng.choice(["and", "then", "but"]), self.rng.choice(_INTRANSITIVE)]
        return [*words, "."]

    def text(self, num_words: int) -> list[str]:
        words: list[str] = []
        while len(words) < num_words:
            words += self.sentence()
        return words[:num_words]


def keyword_prompts(
    seed: int = 0, num_train: int = 512, num_heldout: int = 128
) -> tuple[list[str], list[str]]:
    """(training, held-out) prompts: a sentence's opening noun phrase, or it and its verb.

    The held-out prompts start with agents the training prompts never start with.
    """
    rng = random.Random(seed)
    grammar = SentenceGrammar(rng, colour_rate=0.0)  # prompts never carry the rewarded words
    heldout_agents = set(_AGENTS[-3:])
    train: set[str] = set()
    heldout: set[str] = set()
    while len(train) < num_train or len(heldout) < num_heldout:
        words = grammar.sentence()
        cut = 3 if words[1] in _ADJECTIVES else 2
        prompt = words[: cut + rng.randint(0, 1)]
        target = heldout if prompt[cut - 1] in heldout_agents else train
        if len(target) < (num_heldout if target is heldout else num_train):
            target.add(" ".join(prompt))
    return sorted(train), sorted(heldout)


def pretrain_keyword_lm(
    seed: int = 0,
    steps: int = 300,
    hidden: int = 64,
    layers: int = 2,
    colour_rate: float = 0.03,
    batch_size: int = 32,
    seq_len: int = 32,
    learning_rate: float = 3e-3,
):
    """A tiny GPT-2 trained on the generated corpus (next-word loss), with its tokenizer."""
    tokenizer = word_tokenizer(VOCABULARY)
    with torch.random.fork_rng():
        model = tiny_causal_lm(len(tokenizer), hidden=hidden, layers=layers, seed=seed)
        grammar = SentenceGrammar(random.Random(seed), colour_rate=colour_rate)
        optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
        model.train()
        for step in range(steps):
            texts = [" ".join(grammar.text(seq_len)) for _ in range(batch_size)]
            ids = torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts])
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            for group in optimiser.param_groups:  # linear decay to 10%
                group["lr"] = learning_rate * (1 - 0.9 * step / steps)
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
        model.eval()
    model.config.pretrain_loss = float(loss.detach())
    return model, tokenizer


def cached_keyword_lm(seed: int = 0, cache_dir: str | os.PathLike | None = None, **settings) -> Path:
    """The directory of the pre-trained keyword-task LM for these settings, training it if absent."""
    key = json.dumps({"seed": seed, "vocabulary": VOCABULARY, **settings}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(cache_dir) if cache_dir is not None else cache_root()
    path = path / f"keyword_lm_{digest}"
    if (path / "config.json").is_file():
        return path
    model, tokenizer = pretrain_keyword_lm(seed=seed, **settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    return publish_directory(staging, path)


def build(
    seed: int = 0, cache_dir: str | os.PathLike | None = None, pretrain_steps: int = 300, value_model: bool = True
) -> EmbeddedTask:
    """The keyword task: pre-trained policy, value model from the same weights (unless not
    ``value_model``), colour-count reward."""
    path = cached_keyword_lm(seed=seed, cache_dir=cache_dir, steps=pretrain_steps)
    tokenizer = word_tokenizer(VOCABULARY)
    policy = AutoModelForCausalLM.from_pretrained(path)
    value = None
    if value_model:
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)  # the value head is new: seeded, outside training's stream
            value = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    train, heldout = keyword_prompts(seed=0)

    return EmbeddedTask(
        tokenizer=tokenizer,
        policy=policy,
        value_model=value,
        reward=keyword_reward(COLOURS),
        train_dataset=prompt_dataset(tokenizer, train),
        heldout_dataset=prompt_dataset(tokenizer, heldout),
        lora_config=toy_lora_config("gpt2", r=8),
    )


SPEC = TaskSpec(
    name="keywords",
    summary="a tiny GPT-2 pre-trained here for a few seconds on a generated corpus where the rewarded colour "
    "words are rare; reward = colour words per completion; PPO needs 40-60 rounds to plateau",
    settings={
        "ppo": run_settings(
            "runs/ppo_iif_keywords", TRAINING, rounds=ROUNDS, heldout_prompts=sentiment.HELDOUT_PROMPTS
        ),
        **group_run_settings(
            "runs/{algorithm}_iif_keywords", GRPO_TRAINING, ROUNDS, sentiment.GRPO_HELDOUT_PROMPTS
        ),
    },
    build=build,
)
