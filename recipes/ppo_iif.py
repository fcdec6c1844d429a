"""PPO with Iterative Influence-based Filtering (IIF) on a LoRA policy: the main job.

    accelerate launch recipes/ppo_iif.py                       # embedded default, offline, ~2 min on a CPU
    accelerate launch recipes/ppo_iif.py --embedded_task keywords  # the harder embedded task
    accelerate launch recipes/ppo_iif.py --config recipe.yaml  # a real job, flags from YAML
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/ppo_iif.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/tldr \\
        --reward_model_path my/reward-model --lora_r 16 --iif_drop_fraction 1.0

Without --model_name_or_path it runs the embedded default: a tiny GPT-2 policy and value
model built from configs, a word-level tokenizer, template prompts shipped with the package,
the VADER sentiment lexicon as reward, LoRA adapters. It needs no network and ends with the
reward clearly up. `--embedded_task keywords` runs the harder one instead: a tiny GPT-2
pre-trained here for a few seconds on a generated corpus where the rewarded colour words are
rare. Every IIFPPOConfig (and so PPOConfig / TrainingArguments) field is a flag,
plus the dataset, reward and model flags below and TRL's ModelConfig LoRA flags
(--lora_r, --lora_alpha, --lora_target_modules, ...).

Each round's attribution (records, influence, kept flags, metrics) is written to
<output_dir>/attribution as it finishes; Ctrl-C stops cleanly with the rounds so far on disk.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from accelerate import PartialState
from trl import ModelConfig, TrlParser, get_peft_config

from rlhf_influence import IIFPPOConfig, IIFPPOTrainer, default_task, keyword_task
from rlhf_influence.default_task import REWARD_FUNCTIONS, build_default_task, keyword_reward
from rlhf_influence.keyword_task import build_keyword_task
from rlhf_influence.trainer.progress import RoundProgress

DATA_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class RecipeArguments:
    """Data, reward and value model of the job (the policy comes from ModelConfig)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Prompt dataset: a hub name, a local dataset directory, or a .json/.jsonl/.parquet/.csv file."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split with the training prompts."})
    dataset_test_split: str | None = field(
        default=None,
        metadata={
            "help": "Split with held-out prompts for the heldout_return target; without it, "
            "--heldout_size prompts are set aside from the training split."
        },
    )
    heldout_size: int = field(
        default=256, metadata={"help": "Prompts set aside as held-out when there is no test split."}
    )
    prompt_column: str = field(
        default="prompt",
        metadata={
            "help": "Column holding the prompt text (or chat messages, formatted with the chat template)."
        },
    )
    max_prompt_length: int = field(
        default=256, metadata={"help": "Prompts longer than this many tokens are dropped."}
    )
    reward_function: str | None = field(
        default=None,
        metadata={
            "help": "A named Python reward used instead of the --reward_model_path model: 'sentiment' "
            "(VADER lexicon) or 'keywords'.",
            "choices": [*REWARD_FUNCTIONS, "keywords"],
        },
    )
    reward_keywords: list[str] | None = field(
        default=None, metadata={"help": "Words rewarded by --reward_function keywords (one point each)."}
    )
    embedded_task: str = field(
        default="sentiment",
        metadata={
            "help": "Without --model_name_or_path: which embedded task runs. 'sentiment': a tiny GPT-2 from "
            "random weights, VADER sentiment reward. 'keywords': a tiny GPT-2 pre-trained here for a few "
            "seconds on a generated corpus where the rewarded colour words are rare (cached under "
            "$RLHF_INFLUENCE_CACHE or ~/.cache/rlhf_influence); PPO needs many rounds to plateau on it.",
            "choices": ["sentiment", "keywords"],
        },
    )
    value_model_path: str | None = field(
        default=None,
        metadata={
            "help": "Value model to start from; default: the reward model, or the policy with --reward_function."
        },
    )


# The embedded runs: the default task's settings (rlhf_influence.default_task), and what the
# keyword task changes in them (rlhf_influence.keyword_task).
_PER_ROUND = default_task.TRAINING_DEFAULTS["per_device_train_batch_size"]
EMBEDDED_DEFAULTS = {
    "output_dir": "runs/ppo_iif",
    **default_task.TRAINING_DEFAULTS,
    "total_episodes": _PER_ROUND * default_task.ROUNDS,
    "iif_num_heldout_prompts": default_task.HELDOUT_PROMPTS,
    "report_to": "none",
    "save_strategy": "no",
    "logging_steps": 1,
    "seed": 0,
}
EMBEDDED_TASK_DEFAULTS = {
    "sentiment": {},
    "keywords": {
        "output_dir": "runs/ppo_iif_keywords",
        **keyword_task.TRAINING_OVERRIDES,
        "total_episodes": _PER_ROUND * keyword_task.ROUNDS,
    },
}


def fail(message: str) -> None:
    """A clear one-line error and a non-zero exit, before any training."""
    print(f"ppo_iif.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse(argv: list[str] | None):
    try:
        return _parse(argv)
    except ValueError as exc:  # unknown flags, bad values (HfArgumentParser raises, not exits)
        fail(f"{exc}. See --help.")


def _parse(argv: list[str] | None):
    parser = TrlParser((RecipeArguments, IIFPPOConfig, ModelConfig))
    cuda = torch.cuda.is_available()
    # LoRA is what IIF scores; bf16 only where the hardware has it (PPOConfig turns it on everywhere).
    parser.set_defaults(use_peft=True, use_cpu=not cuda, bf16=cuda and torch.cuda.is_bf16_supported())
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    if model_args.model_name_or_path is None:  # embedded default: its own defaults, flags still win
        parser.set_defaults(**{**EMBEDDED_DEFAULTS, **EMBEDDED_TASK_DEFAULTS[script_args.embedded_task]})
        script_args, training_args, model_args = parser.parse_args_and_config(argv)
    return script_args, training_args, model_args


def load_prompts(script_args: RecipeArguments, tokenizer, seed: int):
    """(train, held-out) datasets with an input_ids column, from any `datasets` source."""
    from datasets import load_dataset

    name = script_args.dataset_name
    try:
        suffix = os.path.splitext(name)[1].lower()
        if os.path.isfile(name) and suffix in DATA_FILE_FORMATS:
            data = load_dataset(DATA_FILE_FORMATS[suffix], data_files={script_args.dataset_train_split: name})
        else:
            data = load_dataset(name, script_args.dataset_config)
    except Exception as exc:
        fail(f"cannot load dataset {name!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    if script_args.dataset_train_split not in data:
        fail(f"dataset {name!r} has no split {script_args.dataset_train_split!r} (it has {sorted(data)})")
    train = data[script_args.dataset_train_split]
    if script_args.prompt_column not in train.column_names:
        fail(
            f"dataset {name!r} has no column {script_args.prompt_column!r}; its columns are {train.column_names}. "
            "Choose one with --prompt_column."
        )
    if script_args.dataset_test_split:
        if script_args.dataset_test_split not in data:
            fail(f"dataset {name!r} has no split {script_args.dataset_test_split!r} (it has {sorted(data)})")
        heldout = data[script_args.dataset_test_split]
    else:
        if len(train) <= script_args.heldout_size:
            fail(f"{len(train)} prompts cannot spare --heldout_size {script_args.heldout_size} held-out ones")
        parts = train.train_test_split(test_size=script_args.heldout_size, seed=seed)
        train, heldout = parts["train"], parts["test"]

    column = script_args.prompt_column

    def tokenise(row):
        prompt = row[column]
        if isinstance(prompt, list):  # chat messages
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        else:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, "length": len(ids)}

    def prepare(ds):
        ds = ds.map(tokenise, remove_columns=[c for c in ds.column_names if c != column])
        return ds.filter(lambda row: 0 < row["length"] <= script_args.max_prompt_length)

    return prepare(train), prepare(heldout)


def load_real_job(script_args: RecipeArguments, training_args: IIFPPOConfig, model_args: ModelConfig):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if not model_args.use_peft:
        fail(
            "IIF scores LoRA adapters: keep --use_peft (the default) and set --lora_r / --lora_target_modules"
        )
    if script_args.dataset_name is None:
        fail("a real job needs --dataset_name (a hub name, a dataset directory or a data file)")
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)

    def load(kind, path, what, **kwargs):
        try:
            return kind.from_pretrained(path, revision=model_args.model_revision, **kwargs)
        except Exception as exc:
            fail(f"cannot load the {what} from {path!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}")

    tokenizer = load(AutoTokenizer, model_args.model_name_or_path, "tokenizer", padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    policy = load(
        AutoModelForCausalLM,
        model_args.model_name_or_path,
        "policy",
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
    )
    if script_args.reward_function == "keywords":
        reward = keyword_reward(script_args.reward_keywords or [])
    elif script_args.reward_function is not None:
        reward = REWARD_FUNCTIONS[script_args.reward_function]
    else:  # PPOConfig's --reward_model_path
        reward = load(
            AutoModelForSequenceClassification,
            training_args.reward_model_path,
            "reward model",
            num_labels=1,
            dtype=dtype,
        )
    value_path = script_args.value_model_path or (
        training_args.reward_model_path
        if script_args.reward_function is None
        else model_args.model_name_or_path
    )
    value_model = load(
        AutoModelForSequenceClassification, value_path, "value model", num_labels=1, dtype=dtype
    )
    train, heldout = load_prompts(script_args, tokenizer, training_args.seed)
    peft_config = get_peft_config(model_args)
    modules = peft_config.target_modules
    if isinstance(modules, str) and modules != "all-linear" and re.fullmatch(r"[\w.]+", modules):
        # TRL turns a single --lora_target_modules value into a string, which PEFT reads as a
        # regex over full module names (so "c_attn" would match nothing): make it a name list.
        peft_config.target_modules = {modules}
    return tokenizer, policy, value_model, reward, train, heldout, peft_config


def sparkline(values: list[float]) -> str:
    blocks = "▁▂▃▄▅▆▇█"
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(blocks[min(7, int((v - lo) / span * 8))] for v in values)


def summarise(history: list[dict], training_args: IIFPPOConfig) -> None:
    rewards = [row["objective/scores"] for row in history]
    if not rewards:
        return
    k = max(1, len(rewards) // 5)
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    kept = sum(row.get("iif/kept_fraction", 1.0) for row in history) / len(history)
    print(f"\nmean reward per round: {sparkline(rewards)}")
    print(f"  first {k} rounds {first:+.3f} -> last {k} rounds {last:+.3f}; mean kept fraction {kept:.2f}")
    print(f"run directory: {os.path.abspath(training_args.output_dir)}")
    print(f"attribution:   {os.path.abspath(training_args.attribution_dir)}")
    print(f"audit it:      rlhf-influence audit {training_args.output_dir}")


def main(argv: list[str] | None = None) -> int:
    script_args, training_args, model_args = parse(argv)
    if model_args.model_name_or_path is None:
        if script_args.embedded_task == "keywords":
            task = build_keyword_task(seed=training_args.seed)
        else:
            task = build_default_task(seed=training_args.seed)
        tokenizer, policy, value_model, reward = task.tokenizer, task.policy, task.value_model, task.reward
        train, heldout, peft_config = task.train_dataset, task.heldout_dataset, task.lora_config
    else:
        tokenizer, policy, value_model, reward, train, heldout, peft_config = load_real_job(
            script_args, training_args, model_args
        )
    world = PartialState().num_processes
    per_round = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world
    if len(train) < per_round:
        fail(f"{len(train)} training prompts are fewer than one round's batch of {per_round} records")
    if (
        training_args.iif_store
        and os.path.isdir(training_args.attribution_dir)
        and os.listdir(training_args.attribution_dir)
    ):
        fail(f"{training_args.attribution_dir} already holds a run; choose another --output_dir")
    target = heldout if (training_args.iif_target or "heldout_return") == "heldout_return" else None

    trainer = IIFPPOTrainer(
        args=training_args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=reward,
        train_dataset=train.select_columns(["input_ids"]),
        value_model=value_model,
        target_dataset=None if target is None else target.select_columns(["input_ids"]),
        peft_config=peft_config,
    )
    progress = RoundProgress()
    if not training_args.disable_tqdm:
        from transformers.trainer_callback import ProgressCallback

        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(progress)
    try:
        trainer.train()
    except KeyboardInterrupt:
        if trainer.accelerator.is_main_process:
            done = trainer.store.rounds() if trainer.store else []
            print(
                f"\ninterrupted: {len(done)} complete round(s) are on disk in {training_args.attribution_dir}"
            )
        return 130
    if trainer.accelerator.is_main_process:
        summarise(trainer.iif_history, training_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
