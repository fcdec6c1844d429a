"""RunManifest: written and read in one place, reading every manifest written so far."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_influence.store import (
    FORMAT_VERSION,
    AttributionStore,
    RunManifest,
    StoredGradients,
    StoreError,
    TrainingSettings,
)

ROOT = Path(__file__).resolve().parents[1]

# What IIFPPOTrainer._manifest() wrote before keep_steps, whiten_after_filter, training, sketch_dim
# and algorithm were recorded.
OLD_MANIFEST = {
    "distributed_type": "NO",
    "drop_fraction": 1.0,
    "filter": "influence",
    "format": "rlhf-influence attribution store",
    "format_version": 1,
    "lora_adapters": 8,
    "lora_parameters": 1024,
    "min_keep_fraction": 0.1,
    "mixed_precision": "no",
    "num_ppo_epochs": 2,
    "num_processes": 1,
    "projection_dim": 0,
    "projection_seed": 0,
    "records_per_round": 8,
    "schedule": "round",
    "snapshot_dtype": "float32",
    "stored_gradients": {
        "dim": 64,
        "dtype": "float16",
        "projection": "one-sided per LoRA adapter side, orthogonal",
        "seed": 0,
        "size": 2048,
    },
    "target": "buffer_return",
    "temperature": 0.7000001,
}


def toy_manifest(**changes) -> RunManifest:
    """A manifest for stores written by hand in tests (the required fields, plus ``changes``)."""
    fields = dict(
        schedule="round",
        drop_fraction=1.0,
        min_keep_fraction=0.1,
        projection_dim=0,
        projection_seed=0,
        num_processes=1,
        records_per_round=6,
        lora_parameters=0,
        lora_adapters=0,
    )
    return RunManifest(**{**fields, **changes})


def full_manifest() -> RunManifest:
    return toy_manifest(
        algorithm="ppo",
        target="buffer_return",
        filter="random",
        keep_steps=True,
        whiten_after_filter=True,
        distributed_type="MULTI_GPU",
        mixed_precision="bf16",
        num_ppo_epochs=4,
        temperature=0.7000001,
        training=TrainingSettings(
            learning_rate=3e-4,
            per_device_train_batch_size=4,
            pad_token_id=2,
            optimizer="AdamW (re-runs start from fresh moments)",
            num_ppo_epochs=4,
            mini_batch_size=8,
            cliprange=0.2,
        ),
        stored_gradients=StoredGradients(
            projection="one-sided per LoRA adapter side, orthogonal, then a sparse sign sketch of the whole vector",
            dim=64,
            sketch_dim=16384,
            seed=3,
            dtype="float16",
            size=16384,
        ),
        snapshot_dtype="bfloat16",
    )


def test_round_trip():
    manifest = full_manifest()
    data = json.loads(json.dumps(manifest.to_json()))
    assert data["format"] == "rlhf-influence attribution store" and data["format_version"] == FORMAT_VERSION
    assert data["training"]["cliprange"] == 0.2 and data["training"]["loss_type"] is None
    assert RunManifest.from_json(data) == manifest
    grpo = toy_manifest(
        algorithm="grpo",
        group_size=4,
        training=TrainingSettings(
            algorithm="grpo", learning_rate=1e-5, per_device_train_batch_size=8, pad_token_id=0, optimizer="AdamW",
            loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28, beta=0.0, num_iterations=1,
            steps_per_generation=2, gradient_accumulation_steps=2, max_completion_length=16, num_generations=4,
        ),
    )  # fmt: skip
    assert RunManifest.from_json(json.loads(json.dumps(grpo.to_json()))) == grpo


def test_store_writes_and_reads_it(tmp_path):
    store = AttributionStore(tmp_path / "attribution")
    manifest = full_manifest()
    store.write_manifest(manifest)
    assert store.manifest == manifest
    assert AttributionStore.open(tmp_path).manifest == manifest
    assert not list(store.path.glob(".manifest.json.tmp-*"))
    with pytest.raises(TypeError, match="takes a RunManifest"):
        store.write_manifest({"target": "heldout_return"})
    with pytest.raises(StoreError, match="no manifest read or written yet"):
        AttributionStore(tmp_path / "other").manifest  # noqa: B018


def test_old_manifests_read_with_the_defaults_readers_used():
    manifest = RunManifest.from_json(OLD_MANIFEST)
    assert manifest.algorithm == "ppo" and manifest.group_size is None
    assert manifest.keep_steps is False and manifest.whiten_after_filter is False
    assert manifest.training is None
    assert manifest.stored_gradients == StoredGradients(
        projection="one-sided per LoRA adapter side, orthogonal", dim=64, sketch_dim=None, seed=0,
        dtype="float16", size=2048,
    )  # fmt: skip
    assert manifest.target == "buffer_return" and manifest.temperature == 0.7000001
    older = {k: v for k, v in OLD_MANIFEST.items() if k not in ("target", "temperature", "distributed_type",
                                                                 "mixed_precision", "snapshot_dtype", "filter")}  # fmt: skip
    manifest = RunManifest.from_json({**older, "stored_gradients": None, "unknown_newer_key": [1]})
    assert (manifest.target, manifest.temperature, manifest.filter) == ("heldout_return", 1.0, "influence")
    assert (manifest.distributed_type, manifest.mixed_precision) == (None, None)
    assert manifest.snapshot_dtype == "float32" and manifest.stored_gradients is None
    # a manifest kept with the GPU benchmark's results (training settings, no sketch, no snapshot dtype)
    kept = json.loads((ROOT / "benchmarks/results/reviews_gpu_bf16/manifest_iif_round.json").read_text())
    manifest = RunManifest.from_json(kept)
    assert manifest.training.algorithm == "ppo" and manifest.training.cliprange == 0.2
    assert manifest.stored_gradients.sketch_dim is None and manifest.mixed_precision == "bf16"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"schedule": 3}, "the field 'schedule' holds 3, not text"),
        ({"num_processes": "1"}, "the field 'num_processes' holds '1', not an integer"),
        ({"num_processes": True}, "the field 'num_processes' holds True, not an integer"),
        ({"keep_steps": 1}, "the field 'keep_steps' holds 1, not true/false"),
        ({"drop_fraction": None}, "the field 'drop_fraction' holds None, not a number"),
        ({"algorithm": "dpo"}, "the field 'algorithm' holds 'dpo', not 'ppo' or 'grpo'"),
        ({"stored_gradients": {**OLD_MANIFEST["stored_gradients"], "dim": 6.5}}, "'stored_gradients.dim' holds 6.5"),
        ({"stored_gradients": [64]}, "the field 'stored_gradients' holds [64], not an object or null"),
        ({"training": {"learning_rate": 1e-3}}, "lacks the field 'training.per_device_train_batch_size'"),
        ({"training": {"learning_rate": 1e-3, "per_device_train_batch_size": 4, "pad_token_id": 0,
                       "optimizer": "AdamW", "num_ppo_epochs": 1, "mini_batch_size": 4}},
         "a PPO run lacks the field 'training.cliprange'"),
        ({"lora_adapters": None}, "the field 'lora_adapters' holds None, not an integer"),
        ({"format_version": 99}, "has format version 99; this rlhf-influence reads up to 1"),
        ({"format_version": "1"}, "has format version '1'"),
    ],
)  # fmt: skip
def test_wrong_types_name_the_field(change, message):
    with pytest.raises(StoreError, match=r"manifest\.json") as info:
        RunManifest.from_json({**OLD_MANIFEST, **change}, source="run/attribution/manifest.json")
    assert message in str(info.value)
    missing = {k: v for k, v in OLD_MANIFEST.items() if k != "records_per_round"}
    with pytest.raises(StoreError, match="lacks the field 'records_per_round'"):
        RunManifest.from_json(missing)
    with pytest.raises(StoreError, match="a JSON list, not an object"):
        RunManifest.from_json([OLD_MANIFEST])


def test_a_toy_run_records_its_training_settings(tmp_path):
    from trainer_setup import Setup, ppo_kwargs, seed_everything

    from rlhf_influence import IIFPPOConfig, IIFPPOTrainer

    setup = Setup()
    seed_everything(0)
    trainer = IIFPPOTrainer(
        args=IIFPPOConfig(**ppo_kwargs(tmp_path, total_episodes=8, iif_target="buffer_return")),
        processing_class=setup.tokenizer, model=setup.peft_policy(), ref_model=None,
        reward_model=setup.reward, train_dataset=setup.train, value_model=setup.value,
    )  # fmt: skip
    trainer.train()
    store = AttributionStore.open(trainer.store.path)
    manifest = store.manifest
    assert manifest.algorithm == "ppo" and manifest.group_size is None
    assert manifest.training.algorithm == "ppo"
    assert manifest.training.num_ppo_epochs == manifest.num_ppo_epochs == 2
    assert manifest.training.cliprange == trainer.args.cliprange and manifest.training.loss_type is None
    assert manifest.records_per_round == 8 and manifest.target == "buffer_return"
    assert manifest.stored_gradients.dim == 64 and manifest.stored_gradients.sketch_dim == 16384
    data = json.loads((store.path / "manifest.json").read_text())
    assert (
        RunManifest.from_json(data) == manifest
        and data["training"]["pad_token_id"] == setup.tokenizer.pad_token_id
    )
