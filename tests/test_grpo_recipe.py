"""recipes/grpo_iif.py: the embedded default trains and stores rounds by prompt group, plain GRPO
stores nothing, bad flags fail in one line before any model loads, Ctrl-C keeps the rounds so far."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from recipe_loading import load_recipe
from test_filtering import reference_keep

from rlhf_influence.store import AttributionStore
from rlhf_influence.tasks import get_task
from rlhf_influence.tasks.toy import TOY_WORDS, tiny_causal_lm, tiny_scalar_head_model, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "grpo_iif.py"
QUIET = ["--disable_tqdm", "true"]


def recipe():
    return load_recipe("grpo")


def recipe_main():
    return recipe().main


def fails_with(capsys, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        recipe_main()(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # datasets' progress bars may come before the one line of error
    lines = [line for line in err.splitlines() if line.startswith("grpo_iif.py:")]
    assert len(lines) == 1 and lines[0].startswith("grpo_iif.py: error: "), err[-3000:]
    assert err.strip().splitlines()[-1] == lines[0] and message in lines[0], lines[0]


def test_embedded_default_trains_and_stores_rounds_by_group(tmp_path, capsys):
    out = tmp_path / "run"
    assert recipe_main()(["--output_dir", str(out), "--max_steps", "3", *QUIET]) == 0
    printed = capsys.readouterr().out
    assert "mean reward per round: " in printed and f"audit it:      rlhf-influence audit {out}" in printed
    store = AttributionStore.open(out)
    assert store.rounds() == [1, 2, 3]
    settings = get_task("sentiment").settings_for("grpo")
    per_round, group = settings["per_device_train_batch_size"], settings["num_generations"]
    assert store.manifest.algorithm == "grpo" and store.manifest.records_per_round == per_round
    for r in store.rounds():
        records = store.read_records(r).to_pydict()
        assert records["group"] == [i // group for i in range(per_round)]
        assert "objective/scores" in store.read_metrics(r)


def test_iif_enabled_false_trains_plain_grpo_and_stores_nothing(tmp_path, capsys):
    out = tmp_path / "plain"
    assert (
        recipe_main()(["--output_dir", str(out), "--max_steps", "2", "--iif_enabled", "false", *QUIET]) == 0
    )
    printed = capsys.readouterr().out
    assert "attribution:   none stored (--iif_enabled false or --iif_store false)" in printed
    assert "mean kept fraction 1.00" in printed
    assert out.is_dir() and not (out / "attribution").exists()


def test_drop_fraction_half_drops_half_the_negative_records(tmp_path):
    out = tmp_path / "half"
    argv = ["--output_dir", str(out), "--max_steps", "2", "--iif_drop_fraction", "0.5", *QUIET]
    assert recipe_main()(argv) == 0
    store = AttributionStore.open(out)
    assert store.manifest.drop_fraction == 0.5
    dropped = 0
    for r in store.rounds():
        t = store.read_records(r).to_pydict()
        assert t["kept"] == reference_keep(t["influence"], 0.5, 0.1)
        dropped += t["kept"].count(False)
    assert dropped > 0  # fewer records kept than generated


BAD_FLAGS = [  # (flags, a phrase of the one-line message); every case fails before any model loads
    (["--iif_drop_fraktion", "0.5"], "['--iif_drop_fraktion', '0.5']"),
    (["--num_ppo_epochs", "2"], "--num_ppo_epochs is a PPO flag (recipes/ppo_iif.py), not GRPO's: the nearest GRPO flag is --num_iterations"),
    (["--value_model_path", "x"], "--value_model_path is a PPO flag"),
    (["--loss_type", "cispo"], "loss_type='cispo' changes that loss and is not supported"),
    (["--num_generations", "5"], "generation_batch_size (32) must be divisible by num_generations (5)"),
    (["--num_generations", "0"], "--num_generations must be a whole number >= 2, got 0"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be a whole number >= 1, got 0"),
    (["--max_completion_length", "0"], "--max_completion_length must be a whole number >= 1, got 0"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number > 0, got nan"),
    (["--beta", "-1"], "--beta must be a finite number >= 0, got -1.0"),
    (["--iif_keep_steps", "false"], "GRPO keeps TRL's step count"),
    (["--reward_weights", "1", "2"], "--reward_weights takes one weight"),
    (["--reward_model_path", "/no/such_dir"], "--reward_model_path applies to a job on your own model"),
    (["--lora_r", "4"], "--lora_r applies to a job on your own model"),
    (["--iif_schedule", "weekly"], "invalid choice: 'weekly'"),
    (["--iif_schedule", "step", "--steps_per_generation", "2"], "iif_schedule='step' decides inside a round's one"),
]  # fmt: skip


@pytest.mark.parametrize("flags, message", BAD_FLAGS)
def test_bad_flags_fail_in_one_line_before_any_model_loads(capsys, tmp_path, no_model_loads, flags, message):
    fails_with(capsys, ["--output_dir", str(tmp_path / "out"), *flags], message)


def test_embedded_task_flags_override_the_tasks_grpo_settings(tmp_path):
    """The task's GRPO settings are the defaults, a --config file and flags win; TRL's own checks
    see the settings the run will have (a batch of 12 holds whole groups of the task's 4)."""
    config = tmp_path / "recipe.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nlearning_rate: 0.001\nmax_steps: 7\n")
    from trl import ModelConfig

    from rlhf_influence.launch.flags import parse
    from rlhf_influence.launch.group_recipe import RecipeArguments, recipe_config

    _, training_args, _ = parse(
        ["--config", str(config), "--per_device_train_batch_size", "12", "--max_steps", "5"],
        (RecipeArguments, recipe_config(recipe().RECIPE.config_class), ModelConfig),
        lambda spec: spec.settings_for("grpo"),
        {},
    )
    assert (training_args.per_device_train_batch_size, training_args.num_generations) == (12, 4)
    assert (training_args.learning_rate, training_args.max_steps) == (0.001, 5)
    assert training_args.max_completion_length == get_task("sentiment").settings_for("grpo")["max_completion_length"]


@pytest.fixture(scope="module")
def local_model(tmp_path_factory) -> Path:
    """A tiny policy, a tiny reward model, and their tokenizer, saved to disk."""
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = word_tokenizer(TOY_WORDS)
    tiny_causal_lm(len(tokenizer), hidden=32, layers=1).save_pretrained(path / "policy")
    tiny_scalar_head_model(len(tokenizer), hidden=32, layers=1).save_pretrained(path / "reward")
    for name in ("policy", "reward"):
        tokenizer.save_pretrained(path / name)
    return path


def write_prompts(path: Path, n: int) -> Path:
    path.write_text(
        "\n".join(json.dumps({"text": f"the movie was {'good' if i % 2 else 'bad'}"}) for i in range(n))
    )
    return path


def test_real_job_with_a_reward_model_trains(tmp_path, local_model):
    data = write_prompts(tmp_path / "prompts.jsonl", 48)
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(local_model / "policy"), "--dataset_name", str(data), "--prompt_column",
            "text", "--reward_model_path", str(local_model / "reward"), "--heldout_size", "8",
            "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "4",
            "--max_steps", "2", "--lora_r", "4", "--lora_target_modules", "c_attn", "--iif_num_heldout_prompts", "2",
            "--output_dir", str(out), "--report_to", "none", *QUIET]  # fmt: skip
    assert recipe_main()(argv) == 0
    store = AttributionStore.open(out)
    assert store.rounds() == [1, 2]
    assert set(store.read_records(1).to_pydict()["prompt"]) <= {"the movie was good", "the movie was bad"}


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "a job on your own model needs a reward: --reward_model_path (a sequence classifier) or --reward_function"),
        (["--reward_function", "sentiment", "--embedded_task", "keywords"], "--embedded_task applies only without"),
        (["--reward_model_path", "/no/such_dir"], "cannot load the reward model: '/no/such_dir' does not exist"),
        (["--reward_function", "keywords"], "--reward_function keywords needs the words it rewards: --reward_keywords"),
        (["--reward_function", "sentiment", "--per_device_train_batch_size", "512",
          "--max_completion_length", "4"],
         "40 training prompts are fewer than one generation batch's 64 prompts (512 completions, --num_generations 8 each)"),
        (["--reward_function", "sentiment", "--max_completion_length", "200"],
         "--max_completion_length 200 leaves no room for a prompt in the model's context of 128"),
    ],
)  # fmt: skip
def test_bad_flags_of_a_real_job(capsys, tmp_path, local_model, flags, message):
    data = write_prompts(tmp_path / "prompts.jsonl", 48)
    argv = ["--model_name_or_path", str(local_model / "policy"), "--dataset_name", str(data), "--prompt_column", "text",
            "--heldout_size", "8", "--output_dir", str(tmp_path / "o")]  # fmt: skip
    fails_with(capsys, [*argv, *flags], message)


def test_ctrl_c_stops_cleanly_with_rounds_on_disk(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # A shell starting a job in the background without job control ignores SIGINT for it, and
    # Python then installs no Ctrl-C handler: give the run the default disposition, as a terminal would.
    proc = subprocess.Popen(
        [sys.executable, str(RECIPE), "--output_dir", str(out), *QUIET],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    store = AttributionStore(out / "attribution")
    deadline = time.time() + 120
    while len(store.rounds()) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    done = store.rounds()
    assert len(done) >= 3
    assert f"interrupted: {len(done)} complete round(s) are on disk" in stdout
    assert done == list(range(1, len(done) + 1))
    assert not store.stale_temporaries()  # the round being written was discarded, not left half-written
    for r in done:
        assert len(store.read_records(r)) == 32


@pytest.mark.parametrize("function, fails", [("words", None), ("nan_reward", "the reward function returned nan for completion 0")])
def test_a_reward_function_by_import_path(capsys, tmp_path, local_model, monkeypatch, function, fails):
    from test_recipe import REWARD_MODULE

    (tmp_path / "grpo_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_prompts(tmp_path / "prompts.jsonl", 48)
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(local_model / "policy"), "--dataset_name", str(data), "--prompt_column",
            "text", "--reward_function", f"grpo_rewards:{function}", "--heldout_size", "8",
            "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "4",
            "--max_steps", "2", "--lora_r", "4", "--lora_target_modules", "c_attn", "--iif_num_heldout_prompts", "2",
            "--output_dir", str(out), "--report_to", "none", *QUIET]  # fmt: skip
    try:
        if fails is None:
            assert recipe_main()(argv) == 0
            table = AttributionStore.open(out).read_records(1).to_pydict()
            assert table["reward"] == [float(len(r.split())) for r in table["response"]]
        else:
            fails_with(capsys, argv, fails)
            assert not (out / "attribution").exists() or AttributionStore(out / "attribution").rounds() == []
    finally:
        sys.modules.pop("grpo_rewards", None)
