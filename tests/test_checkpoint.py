"""The final model, checkpoints and --resume_from_checkpoint, through both recipes.

References: the uninterrupted run of the same command (a resumed run must equal it bit for bit),
PEFT's own loader (the saved policy must generate what the trainer's policy generates).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from recipe_loading import load_recipe
from safetensors.torch import load_file

from rlhf_influence import IIFGRPOTrainer, IIFPPOTrainer, IIFRLOOTrainer
from rlhf_influence.store import AttributionStore
from rlhf_influence.trainer.checkpoint import INFO_FILE, complete_checkpoints, read_info

ROOT = Path(__file__).resolve().parents[1]
TIMED = ("time/", "seconds", "eps")  # wall-clock metrics: the only ones a resumed run may differ in

# with the adaptive KL coefficient, whose state a checkpoint keeps too
PPO_FLAGS = ["--total_episodes", "160", "--save_strategy", "steps", "--save_steps", "2", "--disable_tqdm", "true",
             "--kl_control", "adaptive", "--kl_horizon", "32"]
GRPO_FLAGS = ["--max_steps", "10", "--num_iterations", "2", "--iif_schedule", "epoch", "--save_strategy", "steps",
              "--save_steps", "4", "--disable_tqdm", "true", "--beta", "0.04", "--kl_control", "adaptive",
              "--kl_horizon", "32"]  # fmt: skip


def recipe_main(algorithm: str):
    return load_recipe(algorithm).main


def killed_run(algorithm: str, kill_round: int, argv: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "killed_run.py"), algorithm, str(kill_round), *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL, mid-round


def untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMED)}


def assert_same_store(expected: Path, got: Path) -> None:
    a, b = AttributionStore.open(expected), AttributionStore.open(got)
    assert a.rounds() == b.rounds()
    for r in a.rounds():
        assert a.read_records(r).equals(b.read_records(r)), f"round {r}: records differ"
        assert untimed(a.read_metrics(r)) == untimed(b.read_metrics(r)), f"round {r}: metrics differ"
        files = sorted(p.name for p in a.round_dir(r).glob("*.safetensors"))
        assert files == sorted(p.name for p in b.round_dir(r).glob("*.safetensors"))
        for name in files:
            x, y = load_file(a.round_dir(r) / name), load_file(b.round_dir(r) / name)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"round {r}: {name} differs"


def assert_same_weights(expected: Path, got: Path) -> None:
    x, y = load_file(expected), load_file(got)
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


def audit(run: Path) -> str:
    from rlhf_influence.cli import main as cli

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli(["audit", str(run), "--json"]) in (0, None)
    return printed.getvalue()


# PPO's value head on the policy's backbone, scored with its value term: the head resumes too
SHARED_HEAD = ["--value_head", "shared", "--iif_record_loss", "policy_and_value"]


@pytest.mark.parametrize(
    "algorithm, extra",
    [pytest.param("ppo", ["--value_head", "separate"], id="ppo-value-model"),
     pytest.param("ppo", SHARED_HEAD, id="ppo-shared-head"),
     pytest.param("grpo", [], id="grpo"),
     pytest.param("rloo", [], id="rloo")],
)  # fmt: skip
def test_sigkill_mid_round_then_resume_equals_the_uninterrupted_run(tmp_path, algorithm, extra):
    flags = [*(PPO_FLAGS if algorithm == "ppo" else GRPO_FLAGS), *extra]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert recipe_main(algorithm)(["--output_dir", str(whole), *flags]) == 0

    killed_run(algorithm, 4 if algorithm == "ppo" else 3, ["--output_dir", str(killed), *flags])
    store = AttributionStore(killed / "attribution")
    # PPO: checkpoints after rounds 2 (and 4, if the kill in round 4 had not come); round 3 stored after
    # checkpoint-2. GRPO and RLOO (2 steps a round): checkpoint-4 after round 2, killed in round 3.
    checkpoint, stored = ("checkpoint-2", 3) if algorithm == "ppo" else ("checkpoint-4", 2)
    assert [p.name for p in complete_checkpoints(killed)] == [checkpoint]
    assert store.rounds() == list(range(1, stored + 1))

    assert recipe_main(algorithm)(["--output_dir", str(killed), *flags, "--resume_from_checkpoint", "true"]) == 0
    assert_same_store(whole / "attribution", killed / "attribution")
    assert_same_weights(whole / "adapter_model.safetensors", killed / "adapter_model.safetensors")
    if algorithm == "ppo":
        value = "value_head.safetensors" if "shared" in extra else "value_model/model.safetensors"
        assert_same_weights(whole / value, killed / value)
        aside = list((killed / "attribution" / "set_aside").glob("after_round_000002-*/round_000003"))
        assert len(aside) == 1  # the round the resume redid, kept apart
    coefs = [AttributionStore(whole / "attribution").read_metrics(r)["objective/kl_coef"] for r in range(1, 6)]
    assert len(set(coefs)) > 1  # the adaptive coefficient moved, and the resumed run followed it
    report = audit(whole)
    assert len(json.loads(report)["rounds"]) == len(AttributionStore.open(whole).rounds())
    assert report == audit(killed).replace(str(killed), str(whole))


def captured_trainers(monkeypatch) -> list:
    """The trainers whose final model a recipe saves (to compare the files with the live policy)."""
    seen = []
    for cls in (IIFPPOTrainer, IIFGRPOTrainer, IIFRLOOTrainer):
        original = cls.save_final_model

        def save(self, *args, _original=original, **kwargs):
            seen.append(self)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "save_final_model", save)
    return seen


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo"])
def test_the_trained_policy_is_saved_and_generates_as_the_trainer(tmp_path, monkeypatch, capsys, algorithm):
    from peft import AutoPeftModelForCausalLM

    seen = captured_trainers(monkeypatch)
    out = tmp_path / "run"
    length = ["--total_episodes", "64"] if algorithm == "ppo" else ["--max_steps", "2"]
    assert recipe_main(algorithm)(["--output_dir", str(out), *length, "--disable_tqdm", "true"]) == 0
    assert f"trained model: {out}" in capsys.readouterr().out
    (trainer,) = seen
    policy = trainer.unwrapped.policy if algorithm == "ppo" else trainer.lora_policy
    loaded = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    tokenizer = trainer.processing_class
    prompt = tokenizer(["the movie was", "i thought the film"], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    policy.eval()
    with torch.no_grad():
        expected = policy.generate(**prompt, **kwargs)
        got = loaded.generate(**prompt, **kwargs)
    assert torch.equal(expected, got)
    trained = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    reloaded = dict(loaded.named_parameters())
    assert trained and all(torch.equal(p, reloaded[n]) for n, p in trained.items())
    if algorithm == "ppo":  # and the value head beside it (the recipe's default: on the policy's backbone)
        head = load_file(out / "value_head.safetensors")
        live = trainer.unwrapped.value_model.state_dict()
        assert head.keys() == live.keys() and all(torch.equal(t, live[k]) for k, t in head.items())


def test_plain_ppo_saves_the_trained_policy_too(tmp_path):
    out = tmp_path / "plain"
    argv = ["--output_dir", str(out), "--total_episodes", "32", "--iif_enabled", "false", "--disable_tqdm", "true",
            "--value_head", "separate"]  # fmt: skip
    assert recipe_main("ppo")(argv) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "value_model" / "config.json").is_file()
    assert not (out / "attribution").exists()


def fails_with(capsys, algorithm: str, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        recipe_main(algorithm)(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path`` with its size and modification time (to show that nothing changed)."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def checkpointed_runs(tmp_path_factory) -> dict[str, Path]:
    """A PPO and a GRPO run of the embedded default with checkpoints (4 rounds each)."""
    root = tmp_path_factory.mktemp("checkpointed")
    runs = {"ppo": root / "ppo", "grpo": root / "grpo"}
    flags = {"ppo": ["--total_episodes", "128", "--save_steps", "2"], "grpo": ["--max_steps", "4", "--save_steps", "2"]}
    for algorithm, out in runs.items():
        argv = ["--output_dir", str(out), *flags[algorithm], "--save_strategy", "steps", "--disable_tqdm", "true"]
        assert recipe_main(algorithm)(argv) == 0
    return runs


def test_resume_refuses_what_it_cannot_continue_in_one_line_and_changes_nothing(tmp_path, capsys, checkpointed_runs):
    ppo, grpo = checkpointed_runs["ppo"], checkpointed_runs["grpo"]
    flags = ["--total_episodes", "128", "--save_strategy", "steps", "--save_steps", "2", "--disable_tqdm", "true"]
    run = tmp_path / "run"
    shutil.copytree(ppo, run)
    # the copy is another directory: its checkpoints name the run they belong to
    fails_with(capsys, "ppo", ["--output_dir", str(run), *flags, "--resume_from_checkpoint", "true"],
               f"belongs to the run in {ppo.resolve()}, not {run.resolve()}")  # fmt: skip
    before = snapshot(run)
    cases = [
        (["--resume_from_checkpoint", str(grpo / "checkpoint-2")], "it is a GRPO checkpoint, this run trains PPO"),
        (["--resume_from_checkpoint", str(tmp_path / "nowhere")], "no such checkpoint directory"),
        (["--seed", "3", "--resume_from_checkpoint", str(ppo / "checkpoint-2")], "trained with --seed 0, this run has 3"),
    ]
    for extra, message in cases:
        fails_with(capsys, "ppo", ["--output_dir", str(ppo), *flags, *extra], message)
    empty = tmp_path / "empty"
    fails_with(capsys, "ppo", ["--output_dir", str(empty), *flags, "--resume_from_checkpoint", "true"],
               "holds no complete checkpoint-K")  # fmt: skip
    assert snapshot(run) == before


def backup_of(run: Path, tmp_path: Path) -> Path:
    """A copy of ``run`` to restore it from after a test damaged it in place (a run's checkpoints
    name their directory, so the damage is done to the run itself)."""
    backup = tmp_path / "backup"
    shutil.copytree(run, backup)
    return backup


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda ckpt, store: (ckpt / INFO_FILE).unlink(), "not a complete rlhf-influence checkpoint"),
        (lambda ckpt, store: (ckpt / INFO_FILE).write_text("{not json"), "is unreadable"),
        (lambda ckpt, store: (ckpt / INFO_FILE).write_text(json.dumps({"round": 2})), "is damaged: it lacks"),
        (lambda ckpt, store: (ckpt / "state" / "model.safetensors").write_bytes(b"\0" * 64), "is damaged"),
        (lambda ckpt, store: shutil.rmtree(store.round_dir(2)), "round(s) 2 missing"),
        (lambda ckpt, store: [shutil.rmtree(store.round_dir(r)) for r in (2, 3, 4)], "holds 1 round(s)"),
        (lambda ckpt, store: shutil.copy(store.round_dir(1) / "records.parquet", store.round_dir(2)),
         "is not the one the checkpoint saw"),
    ],
    ids=["half-written", "unreadable", "missing-fields", "damaged-weights", "store-hole", "store-cut", "store-other"],
)  # fmt: skip
def test_damaged_checkpoint_or_store_is_refused_in_one_line(tmp_path, capsys, checkpointed_runs, damage, message):
    run = checkpointed_runs["ppo"]
    backup = backup_of(run, tmp_path)
    try:
        checkpoint = run / "checkpoint-2"
        damage(checkpoint, AttributionStore(run / "attribution"))
        before = snapshot(run)
        argv = ["--output_dir", str(run), "--total_episodes", "128", "--save_strategy", "steps", "--save_steps", "2",
                "--disable_tqdm", "true", "--resume_from_checkpoint", str(checkpoint)]  # fmt: skip
        fails_with(capsys, "ppo", argv, message)
        assert snapshot(run) == before
    finally:
        shutil.rmtree(run)
        shutil.move(backup, run)


def test_checkpoints_rotate_and_record_what_they_are(checkpointed_runs):
    from rlhf_influence.trainer.checkpoint import rotate_checkpoints

    for algorithm, run in checkpointed_runs.items():
        names = [p.name for p in complete_checkpoints(run)]
        assert names == ["checkpoint-2", "checkpoint-4"]
        info = read_info(run / "checkpoint-2")
        assert (info.algorithm, info.round, info.stored_rounds, info.num_processes) == (algorithm, 2, 2, 1)
        assert info.output_dir == str(run.resolve())
    scratch = checkpointed_runs["ppo"].parent / "rotate"
    shutil.copytree(checkpointed_runs["ppo"], scratch)
    assert [p.name for p in rotate_checkpoints(scratch, 1)] == ["checkpoint-2"]
    assert [p.name for p in complete_checkpoints(scratch)] == ["checkpoint-4"]


def test_grpo_checkpoints_fall_between_rounds(tmp_path):
    from test_grpo import build

    # a round is 2 steps: the checkpoint --save_steps 3 asks for at step 3 is written when round 2 ends
    trainer = build(tmp_path, max_steps=6, num_iterations=2, save_strategy="steps", save_steps=3)
    trainer.train()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert [read_info(p).round for p in complete_checkpoints(tmp_path)] == [2, 3]


def test_another_lora_layout_or_base_model_is_refused(tmp_path):
    """Through the trainer (an embedded task's LoRA layout and model are fixed): a checkpoint of a
    rank-4 policy cannot continue a rank-8 one, nor one of another width."""
    from trainer_setup import Setup, ppo_kwargs

    from rlhf_influence import IIFPPOConfig
    from rlhf_influence.tasks.toy import toy_lora_config
    from rlhf_influence.trainer.checkpoint import CheckpointError

    def trainer(setup: Setup):
        config = IIFPPOConfig(**ppo_kwargs(tmp_path, save_strategy="steps", save_steps=1))
        return IIFPPOTrainer(args=config, processing_class=setup.tokenizer, model=setup.peft_policy(), ref_model=None,
                             reward_model=setup.reward, train_dataset=setup.train, value_model=setup.value,
                             target_dataset=setup.heldout)  # fmt: skip

    trainer(Setup()).train()
    wider = Setup(hidden=48)
    with pytest.raises(CheckpointError, match=r"its base model is 'GPT2LMHeadModel \(model_type=gpt2, .*n_embd=32"):
        trainer(wider).train(resume_from_checkpoint=True)
    other_rank = Setup()
    other_rank.lora = toy_lora_config("gpt2", r=8)
    with pytest.raises(CheckpointError, match=r"its LoRA layout .* differs from this run's"):
        trainer(other_rank).train(resume_from_checkpoint=True)


@pytest.mark.parametrize("own_generator", [False, True], ids=["global-stream", "loader-generator"])
def test_data_position_resumes_across_passes(own_generator):
    """The batches after a checkpoint are the uninterrupted run's, in this pass and the next ones,
    whether the shuffle draws from the global torch stream (one process) or from the loader's own
    generator (accelerate's, on several processes)."""
    from torch.utils.data import DataLoader

    from rlhf_influence.trainer.checkpoint import ResumableBatches

    def loader():
        torch.manual_seed(5)
        generator = torch.Generator().manual_seed(11) if own_generator else None
        data = DataLoader(list(range(10)), batch_size=3, shuffle=True, drop_last=True, generator=generator)
        data.synchronized_generator = generator  # where accelerate's loader keeps it
        return data

    batches = ResumableBatches(loader())
    [next(batches) for _ in range(4)]  # into the second pass of three batches
    state, torch_state = batches.state_dict(), torch.get_rng_state()
    expected = [next(batches).tolist() for _ in range(7)]
    resumed = ResumableBatches(loader())
    torch.set_rng_state(torch_state)  # a checkpoint restores the global stream with the others
    resumed.load_state_dict(state)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert [next(resumed).tolist() for _ in range(7)] == expected


def test_ppo_refuses_the_trainers_other_save_strategies(capsys, tmp_path, no_model_loads):
    fails_with(capsys, "ppo", ["--output_dir", str(tmp_path / "x"), "--save_strategy", "epoch"],
               "IIF-PPO checkpoints every save_steps rounds ('steps') or never ('no')")  # fmt: skip
