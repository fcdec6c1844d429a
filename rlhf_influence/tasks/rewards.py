"""Python reward functions ``f(prompts, completions) -> list[float]`` used by the embedded tasks and real jobs."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import lru_cache


@lru_cache(maxsize=1)
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("the sentiment reward needs vaderSentiment: pip install vaderSentiment") from exc
    return SentimentIntensityAnalyzer()


def sentiment_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """VADER compound sentiment of each completion, in [-1, 1] (the prompt is not scored)."""
    analyzer = _vader()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in completions]


def keyword_reward(keywords: list[str]) -> Callable[[list[str], list[str]], list[float]]:
    """Reward = how many of ``keywords`` a completion contains (whole words, case-insensitive)."""
    wanted = {k.lower() for k in keywords}
    if not wanted:
        raise ValueError("keyword reward needs at least one keyword")

    def reward(prompts: list[str], completions: list[str]) -> list[float]:
        return [float(sum(w.lower().strip(".,!?") in wanted for w in text.split())) for text in completions]

    return reward


def is_flipped(prompt: str, completion: str, fraction: float, salt: str = "") -> bool:
    """Whether :func:`sign_flipped` flips this record's reward: a hash of the text, so the same
    record is flipped in every round and process, and the choice can be recomputed from a store."""
    digest = hashlib.blake2b(f"{salt}\x00{prompt}\x00{completion}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def sign_flipped(
    reward: Callable[[list[str], list[str]], list[float]], fraction: float, salt: str = ""
) -> Callable[[list[str], list[str]], list[float]]:
    """``reward`` with the sign of a ``fraction`` of records' rewards flipped: known label noise,
    for measuring whether filtering finds it (the records are chosen by :func:`is_flipped`)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")

    def noisy(prompts: list[str], completions: list[str]) -> list[float]:
        clean = reward(prompts, completions)
        return [
            -r if is_flipped(p, c, fraction, salt) else r
            for p, c, r in zip(prompts, completions, clean, strict=True)
        ]

    return noisy


REWARD_FUNCTIONS = {"sentiment": sentiment_reward}
