"""recipes/ppo_iif.py: bad input fails fast with a clear message; Ctrl-C keeps the rounds so far."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from recipe_loading import load_recipe
from test_manifest import toy_manifest

from rlhf_influence.store import AttributionStore
from rlhf_influence.tasks.toy import TOY_WORDS, tiny_causal_lm, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "ppo_iif.py"


def recipe_main():
    return load_recipe("ppo").main


@pytest.fixture(scope="module")
def local_model(tmp_path_factory) -> Path:
    """A tiny policy and tokenizer saved to disk, loaded back through from_pretrained."""
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = word_tokenizer(TOY_WORDS)
    tiny_causal_lm(len(tokenizer), hidden=32, layers=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_prompts(path: Path, n: int, column: str = "prompt") -> Path:
    path.write_text("\n".join(json.dumps({column: "the movie was"}) for _ in range(n)))
    return path


def fails_with(capsys, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        recipe_main()(argv)
    assert exit_info.value.code not in (0, None)
    assert message in capsys.readouterr().err


def test_unknown_flag(capsys, tmp_path):
    fails_with(capsys, ["--output_dir", str(tmp_path), "--iif_drop_fraktion", "0.5"], "--iif_drop_fraktion")


def test_missing_dataset_column(capsys, tmp_path, local_model):
    data = write_prompts(tmp_path / "prompts.jsonl", 400, column="text")
    argv = ["--model_name_or_path", str(local_model), "--dataset_name", str(data), "--reward_function", "sentiment",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    fails_with(capsys, argv, "has no column 'prompt'; its columns are ['text']")


def test_reward_model_that_does_not_load(capsys, tmp_path, local_model):
    data = write_prompts(tmp_path / "prompts.jsonl", 400)
    argv = ["--model_name_or_path", str(local_model), "--dataset_name", str(data),
            "--reward_model_path", str(tmp_path / "no-such-model"), "--output_dir", str(tmp_path / "out")]  # fmt: skip
    fails_with(capsys, argv, "cannot load the reward model: ")


def test_dataset_too_small_for_one_batch(capsys, tmp_path, local_model):
    data = write_prompts(tmp_path / "prompts.jsonl", 40)
    argv = ["--model_name_or_path", str(local_model), "--dataset_name", str(data), "--reward_function", "sentiment",
            "--heldout_size", "8", "--per_device_train_batch_size", "64", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    fails_with(capsys, argv, "32 training prompts are fewer than one round's batch of 64 records")


def test_real_job_from_local_files_trains(tmp_path, local_model):
    data = write_prompts(tmp_path / "prompts.jsonl", 48)
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(local_model), "--dataset_name", str(data), "--reward_function", "keywords",
            "--reward_keywords", "great", "fun", "--heldout_size", "8", "--per_device_train_batch_size", "8",
            "--total_episodes", "16", "--response_length", "4", "--lora_r", "4", "--lora_target_modules", "c_attn",
            "--output_dir", str(out), "--disable_tqdm", "true", "--report_to", "none"]  # fmt: skip
    assert recipe_main()(argv) == 0
    store = AttributionStore.open(out)
    assert store.rounds() == [1, 2]
    # a job on your own model drops nothing unless asked (the evidence: README, When IIF helps)
    assert store.manifest.drop_fraction == 0.0
    assert all(all(store.read_records(r).to_pydict()["kept"]) for r in store.rounds())


def test_own_model_jobs_filter_only_when_asked(tmp_path):
    """--iif_drop_fraction defaults to 0 for a job on your own model (every recipe), to the task's own
    setting for an embedded task; the flag wins either way."""
    from trl import ModelConfig

    from rlhf_influence import IIFPPOConfig
    from rlhf_influence.launch.flags import JobArguments, parse

    def drop_fraction(*flags: str) -> float:
        _, training_args, _ = parse([*flags, "--output_dir", str(tmp_path)], (JobArguments, IIFPPOConfig, ModelConfig),
                                    lambda spec: spec.settings_for("ppo"), {"use_cpu": True})  # fmt: skip
        return training_args.iif_drop_fraction

    own = ("--model_name_or_path", str(tmp_path / "model"))
    assert drop_fraction(*own) == 0.0
    assert drop_fraction(*own, "--iif_drop_fraction", "1") == 1.0
    assert drop_fraction() == 1.0  # the embedded default task: its own (the paper's p)


def test_real_job_with_a_shared_value_head_loads_no_value_model(tmp_path, local_model, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    def no_value_model(*args, **kwargs):
        raise AssertionError("a value model was loaded")

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", no_value_model)
    data = write_prompts(tmp_path / "prompts.jsonl", 48)
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(local_model), "--dataset_name", str(data), "--reward_function", "keywords",
            "--reward_keywords", "great", "fun", "--heldout_size", "8", "--per_device_train_batch_size", "8",
            "--total_episodes", "16", "--response_length", "4", "--lora_r", "4", "--lora_target_modules", "c_attn",
            "--value_head", "shared", "--iif_record_loss", "policy_and_value",
            "--output_dir", str(out), "--disable_tqdm", "true", "--report_to", "none"]  # fmt: skip
    assert recipe_main()(argv) == 0
    store = AttributionStore.open(out / "attribution")
    assert store.rounds() == [1, 2] and store.manifest.training.value_head == "shared"
    assert (out / "value_head.safetensors").is_file() and not (out / "value_model").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--value_head", "shared", "--value_model_path", "./v"], "--value_head shared puts the value head on the policy"),
        (["--iif_record_loss", "policy_and_value", "--value_head", "separate"], "needs value_head='shared'"),
    ],
)
def test_value_flags_that_do_not_go_together_are_refused(capsys, tmp_path, flags, message, no_model_loads):
    fails_with(capsys, ["--output_dir", str(tmp_path), *flags], message)


def test_iif_enabled_false_trains_plain_ppo_and_stores_nothing(tmp_path, capsys):
    out = tmp_path / "plain"
    argv = [
        "--output_dir",
        str(out),
        "--total_episodes",
        "32",
        "--iif_enabled",
        "false",
        "--disable_tqdm",
        "true",
    ]
    assert recipe_main()(argv) == 0
    printed = capsys.readouterr().out
    assert "attribution:   none stored (--iif_enabled false or --iif_store false)" in printed
    assert "mean kept fraction 1.00" in printed
    assert out.is_dir() and not (out / "attribution").exists()


@pytest.mark.parametrize(
    "stop, status, said",
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
)
def test_ctrl_c_and_sigterm_stop_cleanly_with_rounds_on_disk(tmp_path, stop, status, said):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # A shell starting a job in the background without job control (as `cmd &` in a script does)
    # makes it ignore SIGINT, and Python then installs no Ctrl-C handler: give the run the default
    # disposition, as a terminal would.
    proc = subprocess.Popen(
        [sys.executable, str(RECIPE), "--output_dir", str(out), "--disable_tqdm", "true"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    store = AttributionStore(out / "attribution")
    deadline = time.time() + 120
    while len(store.rounds()) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    proc.send_signal(stop)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == status, stderr[-3000:]
    done = store.rounds()
    assert len(done) >= 3
    assert f"{said}: {len(done)} complete round(s) are on disk" in stdout
    assert done == list(range(1, len(done) + 1))
    assert not store.stale_temporaries()  # the round being written was discarded, not left half-written
    # the policy as the signal found it is saved, loadable as a finished run's
    assert f"the policy as it was when stopped is saved in {out}" in stdout
    assert (out / "adapter_model.safetensors").is_file() and (out / "value_head.safetensors").is_file()
    for r in done:
        assert len(store.read_records(r)) == 32


def test_config_yaml_sets_flags_and_cli_overrides_it(tmp_path):
    out = tmp_path / "from-yaml"
    config = tmp_path / "recipe.yaml"
    config.write_text(
        f"output_dir: {out}\ntotal_episodes: 64\niif_drop_fraction: 0.5\niif_schedule: round\nnum_ppo_epochs: 1\n"
    )
    assert recipe_main()(["--config", str(config), "--total_episodes", "32", "--disable_tqdm", "true"]) == 0
    store = AttributionStore.open(out)
    assert store.rounds() == [1]  # the command line's 32 episodes won over the file's 64
    assert store.manifest.drop_fraction == 0.5 and store.manifest.schedule == "round"


def test_gguf_file_that_does_not_load(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_INFLUENCE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF but not really" * 10)
    data = write_prompts(tmp_path / "prompts.jsonl", 400)
    argv = ["--model_name_or_path", str(bad), "--dataset_name", str(data), "--reward_function", "sentiment",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    fails_with(capsys, argv, "cannot read GGUF file 'model.gguf'")
    argv[1] = str(tmp_path / "missing.gguf")
    fails_with(capsys, argv, "missing.gguf' does not exist")
    argv[1:2] = [str(tmp_path), "--gguf_file", "model.gguf"]  # a directory and a file name in it
    fails_with(capsys, argv, "cannot read GGUF file 'model.gguf'")


def test_gguf_without_the_gguf_package(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_INFLUENCE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    model = tmp_path / "model.gguf"
    model.write_bytes(b"0" * 64)
    data = write_prompts(tmp_path / "prompts.jsonl", 400)
    argv = ["--model_name_or_path", str(model), "--dataset_name", str(data), "--reward_function", "sentiment",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    fails_with(capsys, argv, "needs the 'gguf' package: pip install gguf")


def test_model_too_large_for_memory(capsys, tmp_path, local_model, monkeypatch):
    import rlhf_influence.launch.models

    monkeypatch.setattr(rlhf_influence.launch.models, "available_memory_bytes", lambda: 10_000)
    data = write_prompts(tmp_path / "prompts.jsonl", 400)
    argv = ["--model_name_or_path", str(local_model), "--dataset_name", str(data), "--reward_function", "sentiment",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    fails_with(capsys, argv, "GiB of memory is available")


def test_ppo_job_too_large_for_the_device_names_both_value_settings(capsys, tmp_path, local_model, monkeypatch):
    """The recipe's estimate of the whole job (policy, LoRA with Adam, value model trained in full)
    against the device's free memory, from the configs: the message gives the shared head's figure."""
    from transformers import AutoConfig

    import rlhf_influence.launch.memory
    from rlhf_influence.launch.memory import in_gib, ppo_job_memory

    config = AutoConfig.from_pretrained(local_model)
    need = {s: ppo_job_memory(config, torch.float32, value_head=s, lora_r=4, lora_target_modules=["c_attn"],
                              reward_config=False).total for s in ("separate", "shared")}  # fmt: skip
    assert need["shared"] < need["separate"]
    free = (need["shared"] + need["separate"]) // 2  # the shared head fits, the value model does not
    monkeypatch.setattr(rlhf_influence.launch.memory, "free_device_memory", lambda device: (free, "the test device"))
    data = write_prompts(tmp_path / "prompts.jsonl", 48)
    argv = ["--model_name_or_path", str(local_model), "--dataset_name", str(data), "--reward_function", "sentiment",
            "--lora_r", "4", "--lora_target_modules", "c_attn", "--heldout_size", "8", "--per_device_train_batch_size", "8",
            "--total_episodes", "8", "--response_length", "4", "--output_dir", str(tmp_path / "out"),
            "--disable_tqdm", "true", "--report_to", "none"]  # fmt: skip
    fails_with(capsys, [*argv, "--value_head", "separate"], f"needs about {in_gib(need['separate'])} with --value_head separate")
    assert recipe_main()([*argv, "--output_dir", str(tmp_path / "shared")]) == 0  # the default: the shared head


def test_tokenizer_without_pad_token(capsys, tmp_path, local_model):
    from transformers import AutoTokenizer

    no_pad = tmp_path / "no-pad"
    shutil.copytree(local_model, no_pad)
    tokenizer = AutoTokenizer.from_pretrained(no_pad)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(no_pad)
    data = write_prompts(tmp_path / "prompts.jsonl", 400)
    argv = ["--model_name_or_path", str(no_pad), "--dataset_name", str(data), "--reward_function", "sentiment",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    fails_with(capsys, argv, "the tokenizer has no pad token; name one of its tokens with --pad_token")
    fails_with(capsys, [*argv, "--pad_token", "<nonsense>"], "--pad_token '<nonsense>' is not a token")


def test_prompts_holding_the_pad_token(capsys, tmp_path, local_model):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "the <pad> movie was"}) for _ in range(400)))
    argv = ["--model_name_or_path", str(local_model), "--dataset_name", str(data), "--reward_function", "sentiment",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    fails_with(capsys, argv, "prompt(s) contain the pad token '<pad>'")


def test_chat_message_prompts_are_tokenised_with_the_template(tmp_path, local_model):
    """Chat prompts become the template's token ids (transformers 5 returns a dict unless told not to)."""
    from transformers import AutoTokenizer

    chat = tmp_path / "chat-model"
    shutil.copytree(local_model, chat)
    tokenizer = AutoTokenizer.from_pretrained(chat)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(chat)
    data = tmp_path / "chat.jsonl"
    data.write_text(
        "\n".join(json.dumps({"prompt": [{"role": "user", "content": "the movie was"}]}) for _ in range(48))
    )
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(chat), "--dataset_name", str(data), "--reward_function", "sentiment",
            "--heldout_size", "8", "--per_device_train_batch_size", "8", "--total_episodes", "8",
            "--response_length", "4", "--lora_r", "4", "--lora_target_modules", "c_attn", "--output_dir", str(out),
            "--disable_tqdm", "true", "--report_to", "none"]  # fmt: skip
    assert recipe_main()(argv) == 0
    prompts = AttributionStore.open(out).read_records(1).to_pydict()["prompt"]
    assert set(prompts) == {"the movie was"}


def test_split_gguf_path():
    from rlhf_influence.launch.models import split_gguf_path

    assert split_gguf_path("org/model", None) is None
    assert split_gguf_path("/models/x.gguf", None) == ("/models", "x.gguf")
    assert split_gguf_path("/models", "x.gguf") == ("/models", "x.gguf")
    assert split_gguf_path("ignored", "/elsewhere/y.GGUF") == ("/elsewhere", "y.GGUF")


BAD_FLAGS = [  # (flags, a phrase of the one-line message); every case fails before any model loads
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be a whole number >= 1, got 0"),
    (["--response_length", "0"], "--response_length must be a whole number >= 1, got 0"),
    (["--num_mini_batches", "0"], "--num_mini_batches must be a whole number >= 1, got 0"),
    (["--num_mini_batches", "64"], "--num_mini_batches 64 must divide the 32 records each process collects"),
    (["--num_mini_batches", "3"], "--num_mini_batches 3 must divide the 32 records"),
    (["--total_episodes", "0"], "--total_episodes 0 is less than one round of 32 records: nothing would train"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number > 0, got nan"),
    (["--temperature", "-1"], "--temperature must be a finite number > 0, got -1.0"),
    (["--kl_coef", "inf"], "--kl_coef must be a finite number >= 0, got inf"),
    (["--gamma", "1.5"], "--gamma must be a finite number >= 0 and <= 1, got 1.5"),
    (["--iif_drop_fraction", "nan"], "iif_drop_fraction must be in [0, 1], got nan"),
    (["--dataset_name", "/no/such.jsonl", "--reward_model_path", "/no/such_dir"],
     "--dataset_name applies to a job on your own model (--model_name_or_path); without one the embedded task"),
    (["--reward_model_path", "/no/such_dir"], "--reward_model_path applies to a job on your own model"),
    (["--heldout_size", "8"], "--heldout_size applies to a job on your own model"),
    (["--embedded_task", "keywords", "--pad_token", "<pad>"], "--pad_token applies to a job on your own model"),
    (["--lora_r", "4"], "--lora_r applies to a job on your own model"),
    (["--whiten_rewards", "true", "--num_mini_batches", "8"], "--whiten_rewards needs mini-batches of at least 8 records per process, got 4"),
    (["--config", "/no/such.yaml"], "cannot read /no/such.yaml: No such file or directory"),
    (["--iif_schedule", "weekly"], "invalid choice: 'weekly' (choose from 'epoch', 'round', 'step') (see --help)"),
    (["--iif_schedule", "step"], "iif_schedule='step' is GRPO's and RLOO's"),
    (["--iif_score", "cosine"], "invalid choice: 'cosine' (choose from 'raw', 'adam') (see --help)"),
]  # fmt: skip


@pytest.mark.parametrize("flags, message", BAD_FLAGS)
def test_bad_flags_of_the_embedded_run(capsys, tmp_path, no_model_loads, flags, message):
    fails_with(capsys, ["--output_dir", str(tmp_path / "out"), *flags], message)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--reward_function", "sentiment", "--embedded_task", "keywords"],
         "--embedded_task applies only without --model_name_or_path"),
        ([], "a job on your own model needs a reward: --reward_model_path (a sequence classifier) or --reward_function"),
        (["--reward_model_path", "/no/such_dir"], "cannot load the reward model: '/no/such_dir' does not exist"),
        (["--reward_function", "sentiment", "--value_model_path", "./nosuch"], "cannot load the value model: './nosuch' does not exist"),
        (["--reward_function", "sentiment", "--lora_r", "0"], "--lora_r must be >= 1 and --lora_alpha > 0, got 0 and 32"),
        (["--reward_function", "sentiment", "--lora_dropout", "1"], "--lora_dropout must be in [0, 1), got 1.0"),
        (["--reward_function", "sentiment", "--heldout_size", "0"], "--heldout_size must be a whole number >= 1, got 0"),
    ],
)  # fmt: skip
def test_bad_flags_of_a_real_job(capsys, tmp_path, local_model, no_model_loads, flags, message):
    data = write_prompts(tmp_path / "prompts.jsonl", 400)
    argv = [
        "--model_name_or_path",
        str(local_model),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    fails_with(capsys, [*argv, *flags], message)


def test_bad_output_locations(capsys, tmp_path, no_model_loads):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    fails_with(capsys, ["--output_dir", str(a_file)], "is a file, not a directory")
    fails_with(capsys, ["--output_dir", str(a_file / "sub")], "cannot write to --output_dir")
    run = tmp_path / "run"
    AttributionStore(run / "attribution").write_manifest(toy_manifest())
    fails_with(capsys, ["--output_dir", str(run)], "already holds a run; choose another --output_dir")
    fails_with(capsys, ["--output_dir", str(run / "nested")], f"lies inside the run {run.resolve()}")
    fails_with(capsys, ["--output_dir", str(run / "attribution" / "x")], "lies inside the run")


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": None}] * 400, "row 0, is not text or chat messages (NoneType"),
        ([{"prompt": 7}] * 400, "is not text or chat messages (int: '7')"),
        ([{"prompt": "the movie was"}] * 399 + [{"prompt": "  "}], "is empty text"),
        ([{"prompt": [{"role": "user"}]}] * 400, "is a list that is not chat messages"),
    ],
)  # fmt: skip
def test_unusable_prompts(capsys, tmp_path, local_model, rows, message):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    argv = ["--model_name_or_path", str(local_model), "--dataset_name", str(data), "--reward_function", "sentiment",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    fails_with(capsys, argv, message)


def test_prompts_longer_than_the_context_are_dropped_and_counted(capsys, tmp_path, local_model):
    data = tmp_path / "prompts.jsonl"  # the tiny model's context is 128 tokens; 8 of these prompts exceed it
    long_prompt = " ".join(["the movie was"] * 50)
    data.write_text(
        "\n".join(json.dumps({"prompt": long_prompt if i < 8 else "the movie was"}) for i in range(48))
    )
    argv = ["--model_name_or_path", str(local_model), "--dataset_name", str(data), "--reward_function", "sentiment",
            "--heldout_size", "8", "--per_device_train_batch_size", "40", "--response_length", "28",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit):
        recipe_main()(argv)
    out, err = capsys.readouterr()
    assert (
        "prompts longer than 100 tokens (the model's context of 128 tokens minus --response_length 28)" in out
    )
    assert "training prompts are fewer than one round's batch of 40 records" in err


def test_empty_data_file(capsys, tmp_path, local_model):
    data = tmp_path / "prompts.jsonl"
    data.write_text("")
    argv = ["--model_name_or_path", str(local_model), "--dataset_name", str(data), "--reward_function", "sentiment",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        recipe_main()(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ppo_iif.py: error:"), err


def test_bad_lora_targets(capsys, tmp_path, local_model):
    data = write_prompts(tmp_path / "prompts.jsonl", 400)
    argv = ["--model_name_or_path", str(local_model), "--dataset_name", str(data), "--reward_function", "sentiment",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    fails_with(capsys, [*argv, "--lora_target_modules", "nosuch", "c_attn"],
               "--lora_target_modules ['nosuch'] name no module of the policy; its linear layers are ['c_attn',")  # fmt: skip


def test_bf16_flag_alone_reaches_the_accelerator(tmp_path):
    """TRL 1.12's PPOTrainer builds its Accelerator without mixed precision: --bf16 alone trained in float32."""
    out = tmp_path / "bf16"  # in its own process: accelerate keeps one precision per process
    argv = [sys.executable, str(RECIPE), "--output_dir", str(out), "--bf16", "true", "--total_episodes", "32",
            "--num_ppo_epochs", "1", "--disable_tqdm", "true"]  # fmt: skip
    result = subprocess.run(
        argv, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert AttributionStore.open(out).manifest.mixed_precision == "bf16"


REWARD_MODULE = '''
import math

def words(prompts, completions):
    return [float(len(c.split())) for c in completions]

def too_few(prompts, completions):
    return [0.0] * (len(completions) - 1)

def nan_reward(prompts, completions):
    return [math.nan] + [0.0] * (len(completions) - 1)

NOT_CALLABLE = 3
'''


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def real_job_argv(tmp_path, local_model, reward: str) -> list[str]:
    data = write_prompts(tmp_path / "prompts.jsonl", 48)
    return ["--model_name_or_path", str(local_model), "--dataset_name", str(data), "--reward_function", reward,
            "--heldout_size", "8", "--per_device_train_batch_size", "8", "--total_episodes", "16",
            "--response_length", "4", "--lora_r", "4", "--lora_target_modules", "c_attn",
            "--output_dir", str(tmp_path / "out"), "--disable_tqdm", "true", "--report_to", "none"]  # fmt: skip


def test_a_reward_function_by_import_path_trains(tmp_path, local_model, reward_module):
    assert recipe_main()(real_job_argv(tmp_path, local_model, f"{reward_module}:words")) == 0
    store = AttributionStore(tmp_path / "out" / "attribution")
    assert store.rounds() == [1, 2]
    table = store.read_records(1).to_pydict()
    assert table["reward"] == [float(len(r.split())) for r in table["response"]]  # the function's own rewards


@pytest.mark.parametrize(
    "reward, message",
    [
        ("no_such_module:f", "cannot import the reward function 'no_such_module:f': ModuleNotFoundError"),
        ("my_rewards:missing", "cannot import the reward function 'my_rewards:missing': my_rewards has no 'missing'"),
        ("my_rewards:NOT_CALLABLE", "the reward function 'my_rewards:NOT_CALLABLE' is a int, not a callable"),
        ("nodots", "--reward_function 'nodots' is neither a named reward nor an import path module:function"),
        ("my_rewards:too_few", "the reward function returned 7 values for 8 completions"),
        ("my_rewards.nan_reward", "the reward function returned nan for completion 0"),
    ],
)  # fmt: skip
def test_bad_reward_functions_stop_the_run_in_one_line(capsys, tmp_path, local_model, reward_module, reward, message):
    fails_with(capsys, real_job_argv(tmp_path, local_model, reward), message)
    store = tmp_path / "out" / "attribution"
    assert not store.exists() or AttributionStore(store).rounds() == []  # nothing trained on it was written
