"""PPO's value head on the policy's own LoRA backbone (value_head='shared') against hand-written references."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import brute_force_per_record, rel_err
from trainer_setup import Setup, ppo_kwargs, seed_everything

from rlhf_influence import IIFPPOConfig, IIFPPOTrainer, per_record_gradients
from rlhf_influence.iif.losses import PolicyAndValueNormaliser, PPORecordLoss
from rlhf_influence.iif.records import ScoredRecords
from rlhf_influence.trainer.value_head import SharedValueHead, policy_backbone

ONE_STEP = dict(  # one round, one epoch, one micro-batch: one optimizer step
    total_episodes=8, per_device_train_batch_size=8, gradient_accumulation_steps=1, num_mini_batches=1,
    num_ppo_epochs=1, value_head="shared", iif_enabled=False, vf_coef=0.5, cliprange_value=0.05,
)  # fmt: skip


class KeepsFirstBatch(IIFPPOTrainer):
    """Keeps the first round's rollout batch, as its PPO epoch sees it."""

    def ppo_epoch(self, batch, keep_local, stats, collected=None):
        if not hasattr(self, "first_batch"):
            self.first_batch = copy.deepcopy(batch)
        return super().ppo_epoch(batch, keep_local, stats, collected)


def shared_trainer(tmp_path, trainer_class=IIFPPOTrainer, head_seed: int | None = 3, **overrides):
    """A tiny shared-head PPO trainer; its head set to seeded non-zero weights (a zero head passes
    no value gradient to the backbone at the first step)."""
    setup = Setup()
    seed_everything(0)
    trainer = trainer_class(
        args=IIFPPOConfig(**ppo_kwargs(tmp_path, **overrides)), processing_class=setup.tokenizer,
        model=setup.peft_policy(), ref_model=None, reward_model=setup.reward, train_dataset=setup.train,
        value_model=None, target_dataset=setup.heldout,
    )  # fmt: skip
    if head_seed is not None:
        head = trainer.unwrapped.value_model.score
        generator = torch.Generator().manual_seed(head_seed)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.5)
            head.bias.fill_(0.3)
    return trainer


def reference_ppo_loss(policy, weight, bias, batch, args) -> torch.Tensor:
    """PPO's loss on one micro-batch written out by hand: TRL's clipped policy loss (masked mean over
    the response) + vf_coef x its clipped value loss (masked mean over the response and one more
    position), the values a linear head on the last hidden state of the same forward."""
    ids = batch.query_responses
    mask = ids != 0  # the toy tokenizer pads with id 0
    c = batch.context_length
    out = policy(input_ids=ids.masked_fill(~mask, 0), attention_mask=mask.long(),
                 position_ids=mask.long().cumsum(1) - mask.long(), output_hidden_states=True)  # fmt: skip
    logits = out.logits[:, c - 1 : -1] / (args.temperature + 1e-7)
    logp = torch.log_softmax(logits, -1).gather(-1, batch.responses[..., None]).squeeze(-1)
    values = (out.hidden_states[-1][:, c - 1 : -1] @ weight.T).squeeze(-1) + bias
    policy_positions, value_positions = ~batch.padding_mask, ~batch.padding_mask_p1
    ratio = torch.exp(torch.where(policy_positions, logp - batch.logprobs, 0.0))
    a = batch.advantages
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - args.cliprange, 1 + args.cliprange))
    pg_loss = pg[policy_positions].mean()
    clipped = batch.values + (values - batch.values).clamp(-args.cliprange_value, args.cliprange_value)
    vf = torch.maximum((values - batch.returns) ** 2, (clipped - batch.returns) ** 2)
    vf_loss = 0.5 * vf[value_positions].mean()
    return pg_loss + args.vf_coef * vf_loss


def test_shared_head_step_equals_a_hand_written_reference(tmp_path):
    trainer = shared_trainer(tmp_path, KeepsFirstBatch, **ONE_STEP)
    wrapper = trainer.unwrapped
    head, policy = wrapper.value_model, wrapper.policy
    # one backbone: the head reads the policy's own body, and nothing but LoRA and the head trains
    assert isinstance(head, SharedValueHead) and head.backbone is policy_backbone(policy)
    trained = [n for n, p in wrapper.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trained if not n.startswith("value_model.")) and len(trained) > 2
    assert [n for n in trained if n.startswith("value_model.")] == ["value_model.score.weight", "value_model.score.bias"]
    assert sum(p.numel() for p in head.parameters()) == policy.config.hidden_size + 1

    initial_policy = copy.deepcopy(policy)
    weight, bias = head.score.weight.detach().clone(), head.score.bias.detach().clone()
    seed_everything(0)
    trainer.train()
    batch = trainer.first_batch
    assert batch.values.abs().sum() > 0  # the rollout's values came from the head

    # the rollout's values: the head on the policy's last hidden state, adapter active
    ref_policy = copy.deepcopy(initial_policy).eval()
    with torch.no_grad():
        ids = batch.query_responses
        mask = ids != 0
        hidden = ref_policy(input_ids=ids.masked_fill(~mask, 0), attention_mask=mask.long(),
                            position_ids=mask.long().cumsum(1) - mask.long(), output_hidden_states=True).hidden_states[-1]  # fmt: skip
        values = ((hidden @ weight.T).squeeze(-1) + bias)[:, batch.context_length - 1 : -1]
    torch.testing.assert_close(batch.values, values.masked_fill(batch.padding_mask_p1, 0), atol=1e-5, rtol=1e-5)

    # the step's gradient (Adam's first moment after one step is (1 - beta1) x it) against autograd
    w = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True)
    loss = reference_ppo_loss(ref_policy, w, b, batch, trainer.args)
    lora = {n: p for n, p in ref_policy.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, [*lora.values(), w, b])
    expected = dict(zip([*(f"policy.{n}" for n in lora), "value_model.score.weight", "value_model.score.bias"], grads, strict=True))
    state = trainer.optimizer.state
    beta1 = trainer.optimizer.param_groups[0]["betas"][0]
    for name, param in wrapper.named_parameters():
        if param.requires_grad:
            got = state[param]["exp_avg"] / (1 - beta1)
            torch.testing.assert_close(got, expected[name], atol=1e-6, rtol=1e-4, msg=name)
    # the value loss reached the LoRA weights: their gradient is not the policy loss's alone
    trainer.args.vf_coef = 0.0
    policy_grads = torch.autograd.grad(reference_ppo_loss(ref_policy, w, b, batch, trainer.args), [*lora.values()])
    difference = sum(float((g - p).norm()) for g, p in zip(grads, policy_grads, strict=False))
    assert difference > 1e-4 * sum(float(g.norm()) for g in policy_grads)


def records_with_values(trainer, batch) -> ScoredRecords:
    return batch.scored_records(trainer.processing_class.pad_token_id)


def test_record_loss_with_value_term_matches_brute_force_and_sums_to_the_step_loss(tmp_path):
    trainer = shared_trainer(tmp_path, KeepsFirstBatch, **ONE_STEP)
    policy = copy.deepcopy(trainer.unwrapped.policy)
    seed_everything(0)
    trainer.train()
    batch = trainer.first_batch
    args = trainer.args
    head = copy.deepcopy(trainer.unwrapped.value_model)
    with torch.no_grad():  # back to the weights the batch was sampled with is not needed: any weights do
        head.score.weight.mul_(1.5)
    records = records_with_values(trainer, batch)
    loss = PPORecordLoss(clip_range=args.cliprange, temperature=args.temperature + 1e-7, value_coef=args.vf_coef,
                         clip_range_value=args.cliprange_value, value_head=head)  # fmt: skip
    n = len(records)
    normaliser = loss.normaliser(float(records.num_tokens().sum()), n, n, float(records.num_value_tokens().sum()))
    assert isinstance(normaliser, PolicyAndValueNormaliser)

    # the records' losses under the micro-batch's own normalisers sum to PPO's step loss
    total = loss(policy, records, normaliser).sum()
    reference = reference_ppo_loss(policy, head.score.weight, head.score.bias, batch, args)
    torch.testing.assert_close(total, reference, atol=1e-6, rtol=1e-5)

    # each record's gradient over the LoRA weights, from one backward, equals autograd per record
    def fn(model):
        return loss(model, records, normaliser)

    exact = per_record_gradients(policy, fn)
    brute = brute_force_per_record(policy, fn)
    assert rel_err(exact, brute) < 1e-5
    policy_loss = PPORecordLoss(clip_range=args.cliprange, temperature=args.temperature + 1e-7)
    policy_only = per_record_gradients(policy, lambda m: policy_loss(m, records, normaliser.policy))
    assert rel_err(policy_only, exact) > 1e-3  # the value term changes the records' gradients


def test_iif_with_the_value_term_runs_and_says_so(tmp_path):
    trainer = shared_trainer(tmp_path, value_head="shared", iif_enabled=True, iif_record_loss="policy_and_value", iif_drop_fraction=1.0,
                             iif_target="buffer_return", iif_schedule="round")  # fmt: skip
    assert trainer.iif.loss.with_value and trainer.iif.loss.value_head is trainer.unwrapped.value_model
    seed_everything(0)
    trainer.train()
    training = trainer.store.manifest.training
    assert (training.value_head, training.record_loss) == ("shared", "policy_and_value")
    scores = torch.tensor(trainer.store.read_records(1).to_pydict()["influence"])
    assert torch.isfinite(scores).all() and (scores != 0).any()
    from rlhf_influence.audit.intervention import RoundReplay
    from rlhf_influence.audit.rescore import SnapshotScorer
    from rlhf_influence.store import StoreError

    with pytest.raises(StoreError, match="value_head shared"):
        RoundReplay(SnapshotScorer(trainer.store.path), 1)
    from rlhf_influence.audit.jumps import audit_run

    assert audit_run(trainer.store.path).to_json()["record_loss"] == "policy_and_value"


def test_save_final_model_writes_the_head(tmp_path):
    from safetensors.torch import load_file

    trainer = shared_trainer(tmp_path, **ONE_STEP)
    seed_everything(0)
    trainer.train()
    trainer.save_final_model()
    saved = load_file(tmp_path / "value_head.safetensors")
    head = trainer.unwrapped.value_model
    assert torch.equal(saved["score.weight"], head.score.weight.detach())
    assert (tmp_path / "adapter_model.safetensors").is_file() and not (tmp_path / "value_model").exists()


@pytest.mark.parametrize(
    "overrides, value_model, message",
    [
        ({"iif_record_loss": "policy_and_value"}, True, "needs value_head='shared'"),
        ({"value_head": "shared"}, True, "pass value_model=None"),
        ({"value_head": "separate"}, False, "pass value_model"),
        ({"value_head": "shared", "iif_target": "none", "iif_store_gradients": "training"}, False, "not available with value_head='shared'"),
        ({"value_head": "both"}, False, "value_head must be one of"),
    ],
)  # fmt: skip
def test_value_settings_refused_in_one_line(tmp_path, overrides, value_model, message):
    setup = Setup()
    with pytest.raises(ValueError, match=message):
        IIFPPOTrainer(
            args=IIFPPOConfig(**ppo_kwargs(tmp_path, **overrides)), processing_class=setup.tokenizer,
            model=setup.peft_policy(), ref_model=None, reward_model=setup.reward, train_dataset=setup.train,
            value_model=setup.value if value_model else None, target_dataset=setup.heldout,
        )  # fmt: skip


def test_grpo_has_no_value_term(tmp_path):
    from rlhf_influence import IIFGRPOConfig

    with pytest.raises(ValueError, match="GRPO has no value loss"):
        IIFGRPOConfig(output_dir=str(tmp_path), iif_record_loss="policy_and_value", use_cpu=True, bf16=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_job_memory_estimate_counts_what_the_models_hold(dtype):
    """The estimate from a config on the meta device against the models built for real: their
    parameter bytes, LoRA's trainable parameters and the value model's, each trained with Adam."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from rlhf_influence.launch.memory import ppo_job_memory

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True)  # fmt: skip
    policy = LlamaForCausalLM(config).to(dtype)
    bytes_of = lambda model: sum(p.numel() * p.element_size() for p in model.parameters())  # noqa: E731
    lora = get_peft_model(policy, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    adapter = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    classifier_config = LlamaConfig(**{**config.to_dict(), "num_labels": 1})
    value = AutoModelForSequenceClassification.from_config(classifier_config).to(dtype)
    for setting, value_bytes in (("separate", 4 * bytes_of(value)), ("shared", 4 * 4 * (64 + 1))):
        job = ppo_job_memory(config, dtype, value_head=setting, lora_r=4)
        assert job.policy_weights == bytes_of(lora.get_base_model()) - adapter * 4  # the base alone
        assert job.lora == adapter * 4 * 4  # float32 weights, gradients, two moments
        assert job.value == value_bytes and job.reward_model == bytes_of(value)
        assert job.total == job.policy_weights + job.lora + job.value + job.reward_model


@pytest.mark.parametrize("given, settled", [(True, "separate"), (False, "shared")])
def test_auto_settles_on_what_was_given(tmp_path, given, settled):
    setup = Setup()
    trainer = IIFPPOTrainer(
        args=IIFPPOConfig(**ppo_kwargs(tmp_path, value_head="auto")), processing_class=setup.tokenizer,
        model=setup.peft_policy(), ref_model=None, reward_model=setup.reward, train_dataset=setup.train,
        value_model=setup.value if given else None, target_dataset=setup.heldout,
    )  # fmt: skip
    assert trainer.args.value_head == settled
    assert isinstance(trainer.unwrapped.value_model, SharedValueHead) == (settled == "shared")
    assert trainer._manifest().training.value_head == settled


def test_a_checkpoint_from_before_the_value_head_resumes_only_with_a_value_model(tmp_path):
    """Checkpoints hold the settled value_head; one written before the setting existed trained TRL's
    separate value model, whatever the setting's own default ('auto') is."""
    from rlhf_influence.trainer.checkpoint import CheckpointError, CheckpointInfo, check_resumable

    def info(**settings) -> CheckpointInfo:
        return CheckpointInfo(format_version=1, algorithm="ppo", round=2, global_step=2, output_dir=str(tmp_path),
                              num_processes=1, seed=0, base_model="m", lora="x", settings={"learning_rate": 1e-3, **settings},
                              stored_rounds=None, last_round_digest=None)  # fmt: skip

    older = info()
    check_resumable(older, info(value_head="separate", iif_record_loss="policy"), tmp_path)
    with pytest.raises(CheckpointError, match="--value_head None, this run has shared"):
        check_resumable(older, info(value_head="shared", iif_record_loss="policy"), tmp_path)
