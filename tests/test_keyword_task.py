"""The harder embedded task: rare rewarded words over a briefly pre-trained LM."""

from __future__ import annotations

import random

import pytest
import torch
from test_recipe import recipe_main

from rlhf_influence.store import AttributionStore
from rlhf_influence.tasks.keywords import (
    COLOURS,
    SentenceGrammar,
    build,
    cached_keyword_lm,
    keyword_prompts,
)
from rlhf_influence.tasks.toy import tiny_causal_lm


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("keyword-cache")


def test_corpus_makes_the_rewarded_words_rare():
    words = SentenceGrammar(random.Random(1)).text(50_000)
    rate = sum(w in COLOURS for w in words) / len(words)
    assert 0.003 < rate < 0.015, rate
    train, heldout = keyword_prompts()
    assert len(train) == 512 and len(heldout) == 128 and not set(train) & set(heldout)
    assert not any(w in COLOURS for p in train + heldout for w in p.split())


def test_reward_counts_colour_words(cache_dir):
    reward = build(seed=0, cache_dir=cache_dir).reward
    completions = ["the red ball near a gold hat .", "the dog ran .", "Blue, blue!"]
    assert reward(["a", "b", "c"], completions) == [2.0, 0.0, 2.0]


def test_pretrained_lm_is_fluent_cached_and_rarely_says_a_colour(cache_dir):
    path = cached_keyword_lm(seed=0, cache_dir=cache_dir, steps=300)
    stamp = (path / "config.json").stat().st_mtime_ns
    assert cached_keyword_lm(seed=0, cache_dir=cache_dir, steps=300) == path  # reused, not retrained
    assert (path / "config.json").stat().st_mtime_ns == stamp
    assert cached_keyword_lm(seed=1, cache_dir=cache_dir, steps=300) != path

    task = build(seed=0, cache_dir=cache_dir)
    tokenizer, policy = task.tokenizer, task.policy
    text = " ".join(SentenceGrammar(random.Random(123)).text(2000))
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])[:, :512].reshape(8, 64)
    untrained = tiny_causal_lm(len(tokenizer), hidden=64, layers=2, seed=5)
    with torch.no_grad():
        trained_loss = float(policy(input_ids=ids, labels=ids).loss)
        untrained_loss = float(untrained(input_ids=ids, labels=ids).loss)
    assert trained_loss < 0.6 * untrained_loss, (trained_loss, untrained_loss)
    prompt = torch.tensor([tokenizer("the old dog", add_special_tokens=False)["input_ids"]] * 64)
    torch.manual_seed(0)
    with torch.no_grad():
        out = policy.generate(prompt, do_sample=True, max_new_tokens=12, pad_token_id=0)
    completions = tokenizer.batch_decode(out[:, prompt.shape[1] :])
    assert sum(task.reward([], completions)) / len(completions) < 0.5  # PPO starts near zero reward


def test_recipe_runs_the_keyword_task(cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_INFLUENCE_CACHE", str(cache_dir))
    out = tmp_path / "run"
    argv = ["--embedded_task", "keywords", "--output_dir", str(out), "--total_episodes", "64", "--disable_tqdm",
            "true", "--iif_store_projection_dim", "0"]  # fmt: skip
    assert recipe_main()(argv) == 0
    store = AttributionStore.open(out)
    assert store.rounds() == [1, 2]
    responses = store.read_records(1).to_pydict()["response"]
    assert max(len(r.split()) for r in responses) == 12  # the task's own response length
    assert all(w in tokenizer_words() for r in responses for w in r.split())


def tokenizer_words() -> set[str]:
    from rlhf_influence.tasks.keywords import VOCABULARY

    return set(VOCABULARY) | {"<eos>", "<unk>"}
