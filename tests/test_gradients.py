"""Exact and projected per-record gradients against independent references."""

from __future__ import annotations

import pytest
import torch
from conftest import brute_force_per_record, record_batch, rel_err, tiny_lora_model, trainable
from peft import LoraConfig
from scipy.stats import spearmanr

from rlhf_influence import (
    RandomProjector,
    ReturnTarget,
    SketchedProjector,
    capture_factors,
    find_lora_layout,
    influence_scores,
    per_record_gradients,
    ppo_policy_loss,
    scores_from_factors,
    target_gradients,
)


def ppo_loss_fn(batch, advantages):
    input_ids, attention_mask, response_mask = batch
    return lambda model: ppo_policy_loss(model, input_ids, attention_mask, response_mask, advantages)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_exact_matches_brute_force_autograd(arch, padding_side):
    model = tiny_lora_model(arch)
    batch = record_batch(6, padding_side=padding_side, seed=1)
    advantages = torch.randn(batch[0].shape, dtype=torch.float64)
    loss_fn = ppo_loss_fn(batch, advantages)

    exact = per_record_gradients(model, loss_fn)
    reference = brute_force_per_record(model, loss_fn)

    assert exact.shape == reference.shape == (6, sum(p.numel() for p in trainable(model)))
    assert exact.dtype == torch.float64
    assert rel_err(exact, reference) < 1e-6
    for i in range(6):  # every record, not just the batch as a whole
        assert rel_err(exact[i], reference[i]) < 1e-6


def test_layout_follows_named_parameters_order():
    model = tiny_lora_model("llama")
    layout = find_lora_layout(model)
    expected = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(layout.param_names) == expected
    assert layout.num_params == sum(p.numel() for p in trainable(model))
    assert len(layout) == 2 * 2 * 7  # A and B, 2 layers, 7 projections


def test_padding_side_does_not_change_gradients():
    model = tiny_lora_model("qwen2")
    left = record_batch(4, [3, 2, 4, 5], [4, 3, 2, 3], padding_side="left", seed=3)
    right = record_batch(4, [3, 2, 4, 5], [4, 3, 2, 3], padding_side="right", seed=3)
    # Same tokens per record: build advantages per response token in each layout.
    adv_left = torch.zeros(left[0].shape, dtype=torch.float64)
    adv_right = torch.zeros(right[0].shape, dtype=torch.float64)
    values = torch.randn(int(left[2].sum()), dtype=torch.float64)
    adv_left[left[2]] = values
    adv_right[right[2]] = values
    assert torch.equal(left[0][left[1].bool()], right[0][right[1].bool()])
    g_left = per_record_gradients(model, ppo_loss_fn(left, adv_left))
    g_right = per_record_gradients(model, ppo_loss_fn(right, adv_right))
    assert rel_err(g_left, g_right) < 1e-6


def test_does_not_touch_param_grad_and_makes_one_backward():
    model = tiny_lora_model("gpt2")
    batch = record_batch(4)
    advantages = torch.randn(batch[0].shape, dtype=torch.float64)
    for p in trainable(model):
        p.grad = torch.full_like(p, 7.0)
    calls = {"forward": 0}
    handle = model.register_forward_hook(lambda *a: calls.__setitem__("forward", calls["forward"] + 1))
    per_record_gradients(model, ppo_loss_fn(batch, advantages))
    handle.remove()
    assert calls["forward"] == 1
    assert all(torch.all(p.grad == 7.0) for p in trainable(model))


def test_scaled_loss_scales_gradient_and_zero_advantage_gives_zero():
    model = tiny_lora_model("llama")
    batch = record_batch(5, seed=2)
    advantages = torch.randn(batch[0].shape, dtype=torch.float64)
    advantages[3] = 0.0  # record 3: zero advantage everywhere
    base = ppo_loss_fn(batch, advantages)
    scale = torch.tensor([1.0, 3.0, -2.0, 1.0, 0.5], dtype=torch.float64)
    g = per_record_gradients(model, base)
    g_scaled = per_record_gradients(model, lambda m: base(m) * scale)
    assert torch.all(g[3] == 0)
    # 1e-6, not 1e-12: Llama's RMSNorm computes in float32 even in a float64 model.
    assert rel_err(g_scaled, g * scale[:, None]) < 1e-6
    assert g[0].norm() > 0


def test_lora_dropout_uses_post_dropout_inputs():
    model = tiny_lora_model("llama", lora_dropout=0.3)
    model.train()  # the tiny Llama has no other dropout: LoRA's is the only random op
    batch = record_batch(4, seed=5)
    advantages = torch.randn(batch[0].shape, dtype=torch.float64)
    loss_fn = ppo_loss_fn(batch, advantages)
    torch.manual_seed(123)
    exact = per_record_gradients(model, loss_fn)
    reference = brute_force_per_record(model, loss_fn, seed=123)  # same dropout masks
    assert rel_err(exact, reference) < 1e-6
    torch.manual_seed(123)
    model.eval()
    no_dropout = per_record_gradients(model, loss_fn)
    assert rel_err(no_dropout, reference) > 1e-3  # dropout really was active


def test_multiple_adapters_only_active_one():
    model = tiny_lora_model("gpt2")
    model.add_adapter(
        "other", LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False, fan_in_fan_out=True)
    )
    model.to(torch.float64)
    model.set_adapter("default")
    model.eval()
    layout = find_lora_layout(model)
    assert all(".other" not in name for name in layout.param_names)
    batch = record_batch(4, seed=6)
    advantages = torch.randn(batch[0].shape, dtype=torch.float64)
    loss_fn = ppo_loss_fn(batch, advantages)
    assert rel_err(per_record_gradients(model, loss_fn), brute_force_per_record(model, loss_fn)) < 1e-6


def test_lora_bias_is_included():
    model = tiny_lora_model("llama", lora_bias=True)
    layout = find_lora_layout(model)
    assert any(name.endswith("lora_B.default.bias") for name in layout.param_names)
    batch = record_batch(4, seed=7)
    advantages = torch.randn(batch[0].shape, dtype=torch.float64)
    loss_fn = ppo_loss_fn(batch, advantages)
    assert rel_err(per_record_gradients(model, loss_fn), brute_force_per_record(model, loss_fn)) < 1e-6


def test_module_called_twice_sums_contributions():
    model = tiny_lora_model("gpt2")
    batch = record_batch(3, seed=8)
    adv1 = torch.randn(batch[0].shape, dtype=torch.float64)
    adv2 = torch.randn(batch[0].shape, dtype=torch.float64)

    def two_passes(m):
        return ppo_loss_fn(batch, adv1)(m) + ppo_loss_fn(batch, adv2)(m)

    assert rel_err(per_record_gradients(model, two_passes), brute_force_per_record(model, two_passes)) < 1e-6


def test_target_gradient_matches_autograd():
    model = tiny_lora_model("qwen2")
    heldout = record_batch(3, seed=9, padding_side="left")
    target = ReturnTarget.from_heldout(*heldout, torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64))
    grad = target_gradients(model, target)
    ref = torch.autograd.grad(target(model).sum(), trainable(model))
    assert rel_err(grad, torch.cat([g.flatten() for g in ref])) < 1e-10
    two = target_gradients(model, [target, target])
    assert two.shape == (2, grad.shape[0])


def test_exact_influence_equals_dot_with_brute_force_gradients():
    model = tiny_lora_model("llama")
    batch = record_batch(6, seed=10)
    advantages = torch.randn(batch[0].shape, dtype=torch.float64)
    loss_fn = ppo_loss_fn(batch, advantages)
    targets = torch.randn(3, find_lora_layout(model).num_params, dtype=torch.float64)
    scores = influence_scores(model, loss_fn, targets)
    reference = -brute_force_per_record(model, loss_fn) @ targets.T
    assert scores.shape == (6, 3)
    assert rel_err(scores, reference) < 1e-8
    single = influence_scores(model, loss_fn, targets[1])
    assert single.shape == (6,)
    assert rel_err(single, reference[:, 1]) < 1e-8


def test_projection_is_seeded_and_equals_projecting_exact_gradients():
    model = tiny_lora_model("llama")
    batch = record_batch(4, seed=11)
    advantages = torch.randn(batch[0].shape, dtype=torch.float64)
    loss_fn = ppo_loss_fn(batch, advantages)
    layout = find_lora_layout(model)
    projector = RandomProjector(dim=8, seed=3)
    projected = per_record_gradients(model, loss_fn, projector)
    assert projected.shape == (4, projector.output_size(layout))
    assert projected.shape[1] < layout.num_params
    # Built from factors; equals projecting the brute-force gradients with the same matrices.
    reference = RandomProjector(dim=8, seed=3).project(layout, brute_force_per_record(model, loss_fn))
    assert rel_err(projected, reference) < 1e-8
    again = per_record_gradients(model, loss_fn, RandomProjector(dim=8, seed=3))
    other = per_record_gradients(model, loss_fn, RandomProjector(dim=8, seed=4))
    assert torch.equal(projected, again)
    assert rel_err(other, projected) > 0.05


def test_sketch_folds_the_per_side_projection_and_is_seeded():
    model = tiny_lora_model("llama")
    batch = record_batch(4, seed=11)
    advantages = torch.randn(batch[0].shape, dtype=torch.float64)
    loss_fn = ppo_loss_fn(batch, advantages)
    layout = find_lora_layout(model)
    side = RandomProjector(dim=8, seed=3).output_size(layout)
    sketch = SketchedProjector(dim=side // 4, side_dim=8, seed=3)
    folded = per_record_gradients(model, loss_fn, sketch)
    assert folded.shape == (4, side // 4) == (4, sketch.output_size(layout))
    # Built from factors; equals sketching the brute-force gradients: a fixed signed sum of the
    # per-side projection's entries, each entry in exactly one bucket
    exact = brute_force_per_record(model, loss_fn)
    assert rel_err(folded, SketchedProjector(dim=side // 4, side_dim=8, seed=3).project(layout, exact)) < 1e-8
    per_side = RandomProjector(dim=8, seed=3).project(layout, exact)
    buckets, signs = sketch._hash(side, folded.device, folded.dtype)
    by_hand = torch.zeros_like(folded)
    for j in range(side):
        by_hand[:, buckets[j]] += signs[j] * per_side[:, j]
    assert rel_err(folded, by_hand) < 1e-10
    assert not torch.equal(
        folded, per_record_gradients(model, loss_fn, SketchedProjector(side // 4, 8, seed=4))
    )
    # a per-side projection no longer than the sketch is stored as it is
    assert rel_err(per_record_gradients(model, loss_fn, SketchedProjector(side, 8, seed=3)), per_side) < 1e-8


def test_sketched_inner_products_are_unbiased():
    model = tiny_lora_model("llama", config=None)
    batch = record_batch(4, seed=12)
    advantages = torch.randn(batch[0].shape, dtype=torch.float64)
    factors = capture_factors(model, ppo_loss_fn(batch, advantages))
    exact = factors.gradients()
    gram = exact @ exact.T
    side = RandomProjector(dim=4).output_size(factors.layout)
    draws = [factors.gradients(SketchedProjector(dim=side // 8, side_dim=4, seed=s)) for s in range(400)]
    samples = torch.stack([g @ g.T for g in draws])
    mean, stderr = samples.mean(0), samples.std(0) / 400**0.5
    z = (mean - gram).abs() / stderr
    assert float(z.max()) < 4.5, z
    assert rel_err(mean, gram) < 0.1


@pytest.mark.parametrize("orthogonal", [True, False])
def test_projected_inner_products_are_unbiased(orthogonal):
    model = tiny_lora_model("llama", config=None)
    batch = record_batch(4, seed=12)
    advantages = torch.randn(batch[0].shape, dtype=torch.float64)
    factors = capture_factors(model, ppo_loss_fn(batch, advantages))
    exact = factors.gradients()
    gram = exact @ exact.T
    samples = torch.stack(
        [
            (g @ g.T)
            for g in (
                factors.gradients(RandomProjector(dim=4, seed=s, orthogonal=orthogonal)) for s in range(400)
            )
        ]
    )
    mean, stderr = samples.mean(0), samples.std(0) / 400**0.5
    z = (mean - gram).abs() / stderr
    assert float(z.max()) < 4.5, z  # 16 entries, each within 4.5 standard errors
    assert rel_err(mean, gram) < 0.05


def test_projected_influence_ranks_agree_with_exact():
    """Spearman >= 0.95 at the default dim, on a model wider than it (the projection compresses)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = tiny_lora_model("llama", config=config, dtype=torch.float32, r=8)
    g = torch.Generator().manual_seed(0)
    n, width = 64, 24
    input_ids = torch.randint(1, 256, (n, width), generator=g)
    attention_mask = torch.ones(n, width, dtype=torch.long)
    response_mask = torch.zeros(n, width, dtype=torch.bool)
    response_mask[:, 8:] = True
    advantages = torch.randn(n, 1, generator=g) + 0.3 * torch.randn(n, width, generator=g)
    heldout_ids = torch.randint(1, 256, (16, width), generator=g)
    target = ReturnTarget.from_heldout(
        heldout_ids, attention_mask[:16], response_mask[:16], torch.randn(16, generator=g)
    )
    layout = find_lora_layout(model)
    target_grad = target_gradients(model, target, layout=layout)[None]
    factors = capture_factors(
        model,
        lambda m: ppo_policy_loss(m, input_ids, attention_mask, response_mask, advantages),
        layout=layout,
    )
    exact = scores_from_factors(factors, target_grad)[:, 0]
    projector = RandomProjector()  # the default dim
    assert projector.dim == 256
    assert projector.output_size(layout) < layout.num_params / 2
    rhos = [
        spearmanr(
            exact.numpy(), scores_from_factors(factors, target_grad, RandomProjector(seed=s))[:, 0].numpy()
        ).statistic
        for s in range(5)
    ]
    # The projection is random: the mean over seeds meets 0.95 and no seed falls far below it.
    assert sum(rhos) / len(rhos) >= 0.95, rhos
    assert min(rhos) >= 0.9, rhos


def test_activation_checkpointing():
    model = tiny_lora_model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # transformers checkpoints only in training mode; the tiny Llama has no dropout
    batch = record_batch(4, seed=13)
    advantages = torch.randn(batch[0].shape, dtype=torch.float64)
    loss_fn = ppo_loss_fn(batch, advantages)
    reference = brute_force_per_record(model, loss_fn)
    assert reference.norm() > 0
    assert rel_err(per_record_gradients(model, loss_fn), reference) < 1e-6


def test_reentrant_checkpointing_is_refused():
    from rlhf_influence import UnsupportedLoraError

    model = tiny_lora_model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    model.train()
    batch = record_batch(4, seed=13)
    loss_fn = ppo_loss_fn(batch, torch.randn(batch[0].shape, dtype=torch.float64))
    with pytest.raises(UnsupportedLoraError, match="use_reentrant': False"):
        per_record_gradients(model, loss_fn)


def test_training_capture_equals_brute_force_and_leaves_the_step_alone(arch):
    """Factors kept from an ordinary loss.backward() (the training's own) give every record's exact
    gradient; the weights' .grad is what the backward alone gives."""
    from rlhf_influence.engine.capture import TrainingCapture

    model = tiny_lora_model(arch)
    batch = record_batch(5, padding_side="left", seed=2)
    advantages = torch.randn(batch[0].shape, dtype=torch.float64)
    loss_fn = ppo_loss_fn(batch, advantages)
    reference = brute_force_per_record(model, loss_fn)
    plain = torch.autograd.grad(loss_fn(model).sum(), trainable(model))

    capture = TrainingCapture(find_lora_layout(model))
    with capture.recording(5):
        (loss_fn(model).sum() / 2).backward()  # e.g. accelerate's division by 2 accumulation steps
    captured = capture.factors(scale=2.0).gradients()
    assert rel_err(captured, reference) < 1e-6
    for p, g in zip(trainable(model), plain, strict=True):
        assert torch.allclose(p.grad * 2, g)
    projector = RandomProjector(8, seed=3)
    assert rel_err(capture.factors(scale=2.0).gradients(projector), projector.project(find_lora_layout(model), reference)) < 1e-6
