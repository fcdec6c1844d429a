"""Are the exact per-record gradients right on this device? The engine against brute-force autograd.

On SmolLM2-135M-Instruct with LoRA r=16 on q, k, v, o (the reviews task's policy; `--model
tiny` for a 2-layer Llama built from a config, which needs no checkpoint), on `--device`:

  float32          per_record_gradients against one autograd.grad per record, 4 records of
                   mixed prompt and response lengths, left padding: relative error per record
                   (pass: < 1e-4, the CPU test's bound)
  bf16 autocast    the same gradients under torch.autocast(bfloat16), against the float32
                   brute force and against the brute force run in bf16 too; influence scores of
                   16 sampled records against float32 ones: Spearman
  bf16 weights     the same with the whole model cast to bfloat16 (ZeRO-3's case)

bf16 has no exact reference: it keeps 8 bits of mantissa, so a gradient through 30 layers
differs from float32 by percents, for the brute force as much as for the engine. A bf16 row
passes when, for every record, the engine's error against float32 is at most 2x the bf16 brute
force's own, and the scores rank like float32 (Spearman >= 0.95): what IIF needs is the ranking.
Prints a table and writes `engine_check.json` to --out. Exits non-zero when a check fails.

    python benchmarks/engine_check.py --device cuda --out $OUT
    python benchmarks/engine_check.py --model tiny --device cpu     # seconds, no checkpoint
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from scipy.stats import spearmanr

from rlhf_influence import (
    LogProbTarget,
    encode_pairs,
    influence_scores,
    per_record_gradients,
    ppo_policy_loss,
    target_gradients,
)

PROMPTS = ["The movie was", "I went to see this film with my brother and", "Its music",
           "After the long opening credits, the first scene"]  # fmt: skip
RESPONSES = [" a quiet surprise.", " we laughed", " sounded like a choir of old friends singing", " opens"]
FLOAT32_BOUND = 1e-4
SPEARMAN_BOUND = 0.95
BF16_FACTOR = 2.0  # engine's bf16 error against float32, at most this times the brute force's in bf16


def load(model_name: str, device: torch.device):
    """(LoRA policy in float32 on ``device``, tokenizer); LoRA B non-zero so both sides have gradients."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_influence.tasks import reviews

    if model_name == "smollm2":
        checkpoint = reviews.smollm2_checkpoint()
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    else:
        from rlhf_influence.tasks.toy import tiny_causal_lm, word_tokenizer

        tokenizer = word_tokenizer()
        model = tiny_causal_lm(len(tokenizer), arch="llama", hidden=64, layers=2, heads=4, seed=0)
    config = reviews.lora_config()
    config.init_lora_weights = False
    if model_name == "tiny":
        from rlhf_influence.tasks.toy import toy_lora_config

        config = toy_lora_config("llama", r=8, init_lora_weights=False)
    torch.manual_seed(0)
    policy = get_peft_model(model, config).to(device)
    policy.eval()
    return policy, tokenizer


def brute_force(model, loss_fn) -> torch.Tensor:
    """One autograd.grad per record over the trainable parameters, [n, D] in float32."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(loss_fn(model).shape[0]):
        grads = torch.autograd.grad(loss_fn(model)[i], params)
        rows.append(torch.cat([g.float().flatten() for g in grads]))
    return torch.stack(rows)


def rel_errors(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [float((x.float() - y).norm() / y.norm()) for x, y in zip(a, b, strict=True)]


def mixed_batch(tokenizer, device):
    input_ids, attention_mask, response_mask = encode_pairs(tokenizer, PROMPTS, RESPONSES)
    advantages = torch.randn(input_ids.shape, generator=torch.Generator().manual_seed(1))
    return [t.to(device) for t in (input_ids, attention_mask, response_mask, advantages)]


def sampled_batch(policy, tokenizer, device, n: int = 16):
    """n records sampled from the policy on review openings, one advantage per record."""
    from rlhf_influence.tasks import reviews

    prompts = (reviews.review_openings()[0] * 2)[:n]
    query = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
    torch.manual_seed(3)
    with torch.no_grad():
        out = policy.generate(**query, max_new_tokens=12, do_sample=True, pad_token_id=tokenizer.pad_token_id)
    responses = tokenizer.batch_decode(out[:, query["input_ids"].shape[1] :], skip_special_tokens=True)
    responses = [r if r.strip() else " and" for r in responses]
    input_ids, attention_mask, response_mask = encode_pairs(tokenizer, prompts, responses)
    advantages = torch.randn(n, 1, generator=torch.Generator().manual_seed(2)).expand(input_ids.shape)
    return [t.to(device) for t in (input_ids, attention_mask, response_mask, advantages.contiguous())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="folder for engine_check.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.model == "tiny":  # a word-level vocabulary: the review openings are mostly <unk>, as meant
        warnings.filterwarnings("ignore", message=".*unknown to the tokenizer")
    start = time.perf_counter()
    policy, tokenizer = load(args.model, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.model} on {name}, torch {torch.__version__}; loaded in {time.perf_counter() - start:.1f} s")

    batch = mixed_batch(tokenizer, device)

    def loss_fn(model, batch=batch):
        return ppo_policy_loss(model, *batch)

    reference = brute_force(policy, loss_fn)
    results: dict = {"model": args.model, "device": name, "torch": torch.__version__, "checks": {}}
    half = copy.deepcopy(policy).to(torch.bfloat16)
    modes = {
        "float32": (policy, torch.autocast(device.type, enabled=False)),
        "bf16 autocast": (policy, torch.autocast(device.type, dtype=torch.bfloat16)),
        "bf16 weights": (half, torch.autocast(device.type, enabled=False)),
    }
    sampled = sampled_batch(policy, tokenizer, device)

    def sampled_loss(model, batch=sampled):
        return ppo_policy_loss(model, *batch)

    target = LogProbTarget.from_text(
        tokenizer, ["The acting in this film"], [" was wonderful and the story moved me"], device=device
    )
    exact_scores = influence_scores(policy, sampled_loss, target_gradients(policy, target)).float().cpu()
    failed = []
    for mode, (model, context) in modes.items():
        with context:
            engine = per_record_gradients(model, loss_fn)
            same_precision = reference if mode == "float32" else brute_force(model, loss_fn)
            scores = influence_scores(model, sampled_loss, target_gradients(model, target)).float().cpu()
        errors = rel_errors(engine, reference)
        errors_same = rel_errors(engine, same_precision)
        floor = rel_errors(same_precision, reference)
        rho = float(spearmanr(exact_scores.numpy(), scores.numpy()).statistic)
        if mode == "float32":
            ok = max(errors) < FLOAT32_BOUND
        else:  # the engine adds no error of its own beyond bf16's, and ranks like float32
            ok = (
                all(e <= BF16_FACTOR * f for e, f in zip(errors, floor, strict=True))
                and rho >= SPEARMAN_BOUND
            )
        results["checks"][mode] = {
            "relative_errors_vs_float32_brute_force": errors,
            "relative_errors_vs_same_precision_brute_force": errors_same,
            "same_precision_brute_force_vs_float32": floor,
            "spearman_vs_float32": rho,
            "pass": ok,
        }
        if not ok:
            failed.append(mode)
    print(
        "\n| mode | engine vs float32 brute force | engine vs brute force in the same mode | brute force in the "
        "mode vs float32 | Spearman of 16 scores vs float32 | pass |"
    )
    print("|---|---|---|---|---|---|")
    for mode, check in results["checks"].items():
        cells = [", ".join(f"{e:.1e}" for e in check[key]) for key in (
            "relative_errors_vs_float32_brute_force", "relative_errors_vs_same_precision_brute_force",
            "same_precision_brute_force_vs_float32")]  # fmt: skip
        bound = (
            f"error < {FLOAT32_BOUND:g}"
            if mode == "float32"
            else f"error <= {BF16_FACTOR:g} x the mode's own, rho >= {SPEARMAN_BOUND}"
        )
        rho = "- (the reference)" if mode == "float32" else f"{check['spearman_vs_float32']:.4f}"
        print(f"| {mode} | {' | '.join(cells)} | {rho} | "
              f"{'yes' if check['pass'] else 'NO'} ({bound}) |")  # fmt: skip
    results["seconds"] = time.perf_counter() - start
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "engine_check.json").write_text(json.dumps(results, indent=2))
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
