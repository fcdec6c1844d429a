"""IIF inside the optimizer step (iif_schedule='step') against the round schedule it must equal.

With one optimizer step per round at the sampling weights, the step schedule trains on every
completion and takes the dropped ones' shares out of the step's gradient before clipping; the
round schedule scores in a pass of its own and trains on the kept ones. The two must choose the
same completions, store the same vectors and land on the same weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import test_grpo
import test_rloo
import torch
from test_grpo import lora_state

from rlhf_influence import IIFGRPOConfig, IIFPPOConfig
from rlhf_influence.store import AttributionStore

CASES = {
    "grpo-dapo-heldout": (test_grpo.build, {}),
    "grpo-loss-accumulation-kl": (test_grpo.build, {"loss_type": "grpo", "beta": 0.1, "gradient_accumulation_steps": 2}),
    "grpo-bnpo-iterations": (test_grpo.build, {"loss_type": "bnpo", "num_iterations": 2, "max_steps": 6}),
    "grpo-random-half": (test_grpo.build, {"iif_filter": "random", "iif_drop_fraction": 0.5}),
    "grpo-adam-clipped": (test_grpo.build, {"iif_score": "adam", "max_grad_norm": 1e-3}),
    "grpo-scoring-projection": (test_grpo.build, {"iif_projection_dim": 16}),
    # the buffer target's gradient from the shares, preconditioned (the round schedule: a pass of its own)
    "rloo-buffer-adam": (test_rloo.build, {"iif_target": "buffer_return", "beta": 0.0, "iif_score": "adam"}),
    "rloo-heldout": (test_rloo.build, {}),
    "rloo-buffer-accumulation": (test_rloo.build, {"iif_target": "buffer_return", "beta": 0.0,
                                                   "gradient_accumulation_steps": 2}),
}  # fmt: skip


def stored_rounds(path) -> dict[int, dict]:
    store = AttributionStore.open(path)
    out = {}
    for k in store.rounds():
        table = store.read_records(k).to_pydict()
        out[k] = {
            "kept": np.array(table["kept"]),
            "influence": torch.tensor(table["influence"], dtype=torch.float64),
            "gradients": store.read_tensors(k, "gradients")["projected"].float(),
        }
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_step_schedule_equals_the_round_schedule(tmp_path, case):
    build, settings = CASES[case]
    settings = {"iif_drop_fraction": 1.0, "max_steps": 4, **settings}
    by_round = build(tmp_path / "round", **settings)
    by_round.train()
    in_step = build(tmp_path / "step", iif_schedule="step", **settings)
    in_step.train()
    assert in_step.state.global_step == by_round.state.global_step
    expected, got = stored_rounds(tmp_path / "round"), stored_rounds(tmp_path / "step")
    assert expected.keys() == got.keys() and len(got) >= 2
    dropped = 0
    for k in expected:
        assert np.array_equal(expected[k]["kept"], got[k]["kept"]), f"round {k}: another decision"
        dropped += int((~got[k]["kept"]).sum())
        scores = expected[k]["influence"]
        assert torch.allclose(got[k]["influence"], scores, rtol=1e-4, atol=1e-5 * float(scores.abs().max()))
        vectors = expected[k]["gradients"]  # stored in float16: equal to its rounding
        assert torch.allclose(got[k]["gradients"], vectors, rtol=2e-3, atol=1e-3 * float(vectors.abs().max()))
    assert dropped > 0  # the decision removed something, and the updates still agree
    before, after = lora_state(by_round), lora_state(in_step)
    for name, value in before.items():
        assert torch.allclose(after[name], value, atol=1e-5), name  # float rounding, through Adam near eps
    manifest = AttributionStore.open(tmp_path / "step").manifest
    assert manifest.schedule == "step" and manifest.stored_gradients.taken == "training"
    metrics = AttributionStore.open(tmp_path / "step").read_metrics(1)
    assert metrics["iif/scorings"] == 1 and metrics["time/scoring_seconds"] > 0


def test_step_schedule_drops_the_records_from_the_update(tmp_path):
    """Against plain training on every completion: the step schedule's weights differ from it
    (the correction is applied) and its stored round keeps what the round schedule keeps."""
    plain = test_grpo.build(tmp_path / "all", iif_drop_fraction=0.0, max_steps=2, iif_schedule="step")
    plain.train()
    reference = test_grpo.build(tmp_path / "all-round", iif_drop_fraction=0.0, max_steps=2)
    reference.train()
    for name, value in lora_state(reference).items():  # nothing dropped: the step is TRL's own
        assert torch.equal(lora_state(plain)[name], value), name
    filtered = test_grpo.build(tmp_path / "filtered", iif_drop_fraction=1.0, max_steps=2, iif_schedule="step")
    filtered.train()
    assert any(not torch.equal(lora_state(filtered)[n], v) for n, v in lora_state(plain).items())


@pytest.mark.parametrize(
    ("config", "settings", "message"),
    [
        (IIFPPOConfig, {}, "GRPO's and RLOO's"),
        (IIFGRPOConfig, {"steps_per_generation": 2}, "steps_per_generation"),
        (IIFGRPOConfig, {"iif_target": "none"}, "applies only with a target"),
    ],
    ids=["ppo", "several-steps-a-round", "record-only"],
)
def test_step_schedule_refused_where_it_cannot_equal_the_round(tmp_path, config, settings, message):
    kwargs = {"output_dir": str(tmp_path), "report_to": [], "use_cpu": True, "iif_schedule": "step", **settings}
    if config is IIFGRPOConfig:
        kwargs.update(per_device_train_batch_size=8, num_generations=4)
    with pytest.raises(ValueError, match=message):
        config(**kwargs)


def test_step_schedule_says_when_the_shares_do_not_fit_on_the_gpu(monkeypatch):
    """The shares are allocated on the device at the round start; on CUDA a round that cannot hold
    them is refused in one line with what to do (the check runs here with the free memory faked)."""
    from rlhf_influence.iif import in_step

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2**30)  # cached by torch ...
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2**29)  # ... half of it unused
    in_step.check_room(16, 1_000_000, torch.device("cpu"))  # the CPU: nothing to check
    in_step.check_room(16, 1_000_000, "cuda")  # 61 MiB: fits
    in_step.check_room(128, 4_500_000, "cuda")  # 2.1 GiB: fits in the free 2 GiB plus the cache's unused 0.5
    with pytest.raises(ValueError, match=r"256 completions' gradient share .* 16.0 GiB\) until the step, and 2.5 GiB"):
        in_step.check_room(256, 16_777_216, "cuda")


def test_step_schedule_with_training_gradients_asked_for_still_filters(tmp_path):
    """``--iif_store_gradients training`` is what the step schedule stores anyway: asking for it
    changes nothing (it must not turn the round into a record-only one)."""
    plain = test_grpo.build(tmp_path / "step", iif_schedule="step", iif_drop_fraction=1.0, max_steps=2)
    plain.train()
    asked = test_grpo.build(tmp_path / "asked", iif_schedule="step", iif_drop_fraction=1.0, max_steps=2,
                            iif_store_gradients="training")  # fmt: skip
    asked.train()
    expected, got = stored_rounds(tmp_path / "step"), stored_rounds(tmp_path / "asked")
    for k in expected:
        assert np.array_equal(expected[k]["kept"], got[k]["kept"])
        assert torch.isfinite(got[k]["influence"]).all()
    assert any(not expected[k]["kept"].all() for k in expected)
    for name, value in lora_state(plain).items():
        assert torch.equal(lora_state(asked)[name], value), name


@pytest.mark.parametrize(
    ("lora", "message"),
    [({"modules_to_save": ["ln_f"]}, "not a LoRA weight"), ({"lora_dropout": 0.1}, "has dropout on here")],
    ids=["modules-to-save", "dropout"],
)
def test_step_schedule_refused_where_its_shares_are_not_the_whole_story(tmp_path, lora, message):
    """Weights outside the LoRA layout, or dropout in the training forward (the round schedule scores
    without it), would make the step's update differ from the round schedule's: refused at the start."""
    import dataclasses

    from trainer_setup import Setup

    from rlhf_influence import IIFGRPOTrainer

    setup = Setup()
    config = IIFGRPOConfig(**test_grpo.grpo_kwargs(tmp_path, iif_schedule="step"))
    with pytest.raises(ValueError, match=message):
        IIFGRPOTrainer(model=setup.policy, reward_funcs=test_grpo.positive_words, args=config,
                       train_dataset=test_grpo.text_dataset(["a b", "c d"]), processing_class=setup.tokenizer,
                       peft_config=dataclasses.replace(setup.lora, **lora))  # fmt: skip
