"""The target kinds' registry: the settings accept exactly its kinds, and what each kind is decides
what the trainers sample and what the scorer does (checked against brute force elsewhere)."""

from __future__ import annotations

import pytest

from rlhf_influence.iif.settings import TARGETS, IIFSettings
from rlhf_influence.iif.target_kinds import TARGET_KINDS, target_kind


def test_the_settings_take_the_registry_kinds():
    assert TARGETS == tuple(TARGET_KINDS) == ("heldout_return", "buffer_return", "none")
    with pytest.raises(ValueError, match="unknown iif_target 'weekly'; known: heldout_return, buffer_return, none"):
        target_kind("weekly")


def test_what_each_kind_is():
    heldout, buffer, none = (target_kind(name) for name in TARGETS)
    assert heldout.needs_heldout and not buffer.needs_heldout and not none.needs_heldout
    assert buffer.per_token_advantages and not heldout.per_token_advantages
    assert buffer.round_start_shortcut and not heldout.round_start_shortcut
    assert heldout.scores and buffer.scores and not none.scores


def test_a_kind_that_needs_heldout_prompts_asks_for_them():
    settings = IIFSettings(iif_target="heldout_return")
    with pytest.raises(ValueError, match="needs a target_dataset of held-out prompts"):
        settings.resolved_target(has_target_dataset=False)
    assert IIFSettings().resolved_target(has_target_dataset=False) == "buffer_return"
    assert IIFSettings().resolved_target(has_target_dataset=True) == "heldout_return"
