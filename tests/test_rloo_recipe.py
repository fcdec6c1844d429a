"""recipes/rloo_iif.py: the embedded default trains with TRL's RLOO and stores rounds by prompt group,
plain RLOO stores nothing, bad flags fail in one line (naming RLOO) before any model loads."""

from __future__ import annotations

import pytest
from recipe_loading import load_recipe

from rlhf_influence.store import AttributionStore
from rlhf_influence.tasks import get_task

QUIET = ["--disable_tqdm", "true"]


def recipe_main():
    return load_recipe("rloo").main


def test_embedded_default_trains_rloo_and_stores_rounds_by_group(tmp_path, capsys):
    out = tmp_path / "run"
    assert recipe_main()(["--output_dir", str(out), "--max_steps", "3", "--beta", "0.05", *QUIET]) == 0
    printed = capsys.readouterr().out
    assert "mean reward per round: " in printed and f"audit it:      rlhf-influence audit {out}" in printed
    store = AttributionStore.open(out)
    assert store.rounds() == [1, 2, 3]
    settings = get_task("sentiment").settings_for("rloo")
    per_round, group = settings["per_device_train_batch_size"], settings["num_generations"]
    manifest = store.manifest
    assert (manifest.algorithm, manifest.training.algorithm, manifest.records_per_round) == ("rloo", "rloo", per_round)
    assert manifest.training.beta == 0.05 and manifest.training.loss_type is None
    for r in store.rounds():
        assert store.read_records(r).to_pydict()["group"] == [i // group for i in range(per_round)]
        assert store.read_metrics(r)["objective/kl_coef"] == 0.05
    assert (out / "adapter_model.safetensors").is_file()  # the trained policy


def test_iif_enabled_false_trains_plain_rloo_and_stores_nothing(tmp_path, capsys):
    out = tmp_path / "plain"
    assert recipe_main()(["--output_dir", str(out), "--max_steps", "2", "--iif_enabled", "false", *QUIET]) == 0
    assert "attribution:   none stored (--iif_enabled false or --iif_store false)" in capsys.readouterr().out
    assert not (out / "attribution").exists()


BAD_FLAGS = [  # (flags, a phrase of the one-line message); every case fails before any model loads
    (["--num_ppo_epochs", "2"], "--num_ppo_epochs is a PPO flag (recipes/ppo_iif.py), not RLOO's: the nearest RLOO flag is --num_iterations"),
    (["--loss_type", "dapo"], "['--loss_type', 'dapo']"),  # GRPO's, not RLOO's
    (["--num_generations", "1"], "--num_generations must be a whole number >= 2, got 1"),
    (["--iif_keep_steps", "false"], "RLOO keeps TRL's step count"),
    (["--iif_record_loss", "policy_and_value"], "RLOO has no value loss"),
    (["--beta", "-1"], "--beta must be a finite number >= 0, got -1.0"),
]  # fmt: skip


@pytest.mark.parametrize("flags, message", BAD_FLAGS)
def test_bad_flags_fail_in_one_line_before_any_model_loads(capsys, tmp_path, no_model_loads, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        recipe_main()(["--output_dir", str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rloo_iif.py:")]
    assert len(lines) == 1 and lines[0].startswith("rloo_iif.py: error: ") and message in lines[0], err[-3000:]
