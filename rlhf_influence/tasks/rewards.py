"""Python reward functions ``f(prompts, completions) -> list[float]`` used by the embedded tasks and real jobs."""

from __future__ import annotations

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


REWARD_FUNCTIONS = {"sentiment": sentiment_reward}
