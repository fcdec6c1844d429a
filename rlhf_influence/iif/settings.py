"""IIFSettings: the settings of influence-based filtering and of the attribution store.

One dataclass, free of TRL, that every IIF trainer's config takes as a base (``IIFPPOConfig``
today), so the knobs, their help and their checks are written once. Every field is also a
command-line flag through ``HfArgumentParser`` / ``TrlParser``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..engine.checks import finite_number_problem, whole_number_problem
from .kl import KL_CONTROLS
from .target_kinds import TARGET_KINDS, target_kind

SCHEDULES = ("epoch", "round", "step")
TARGETS = tuple(TARGET_KINDS)
HELDOUT_SAMPLING = ("with_rollout", "separate")
SNAPSHOT_DTYPES = ("float32", "bfloat16")
SCORES = ("raw", "adam")
STORED_GRADIENTS = ("snapshot", "training")
RECORD_LOSSES = ("policy", "policy_and_value")
STORE_DIR = "attribution"  # the store's folder under a run's output_dir


@dataclass
class IIFSettings:
    """Iterative Influence-based Filtering (IIF) and its attribution store: what to score against,
    what to drop, how to optimise what is kept, what to store. ``check_iif_settings`` validates."""

    save_final_model: bool = field(
        default=False,
        metadata={
            "help": "At the end of train(), save the trained policy in output_dir as TRL's scripts do (LoRA "
            "adapter and tokenizer, loadable with peft's AutoPeftModelForCausalLM.from_pretrained; PPO's value "
            "model in output_dir/value_model). The recipes switch it on, and save on Ctrl-C/SIGTERM too."
        },
    )
    kl_control: str = field(
        default="fixed",
        metadata={
            "help": "The KL penalty's coefficient (PPO's --kl_coef, GRPO's --beta, its starting value): 'fixed' "
            "(TRL's) or 'adaptive', steered each round toward --kl_target as the paper's code does (Ziegler et "
            "al. 2019: beta *= 1 + clip(KL/target - 1, -0.2, 0.2) * records / --kl_horizon). Logged as "
            "objective/kl_coef, stored with each round, drawn in the report.",
            "choices": list(KL_CONTROLS),
        },
    )
    kl_target: float | None = field(
        default=None,
        metadata={
            "help": "With --kl_control adaptive: the KL to the reference per response (summed over its tokens: "
            "PPO's exact KL over the vocabulary, GRPO's non-negative estimator) to hold. Each embedded task names "
            "one; a job on your own model must give it (the paper: 0.1 with --kl_coef 0.04)."
        },
    )
    kl_horizon: int = field(
        default=10_000,
        metadata={
            "help": "With --kl_control adaptive: the controller's horizon in records (the paper: 10,000)."
        },
    )
    iif_enabled: bool = field(
        default=True,
        metadata={
            "help": "false: plain PPO with no attribution cost (no held-out sampling, no scoring, no store); "
            "the run equals TRL's PPOTrainer. Switch IIF on and off without changing anything else."
        },
    )
    iif_drop_fraction: float = field(
        default=1.0,
        metadata={
            "help": "p in [0, 1]: drop the floor(p * N-) records with the most negative influence, N- being "
            "the number of records with negative influence (the paper's rule; it used 1.0 for RLHF). "
            "0 trains exactly like plain PPO while still scoring and storing the attribution."
        },
    )
    iif_schedule: str = field(
        default="round",
        metadata={
            "help": "'round': score once per rollout round, before the first epoch, as in the paper (the "
            "default); 'epoch': re-score with the current weights before every PPO epoch. Measured in "
            "benchmarks/ on a real LM (SmolLM2-135M, 2 PPO epochs): 'round' costs 1.1-1.2x a plain PPO round "
            "on 2 CPU cores (0.93-0.99x with 4 PPO epochs) and 1.35x on an H100, 'epoch' 1.45-1.6x; 'epoch' "
            "trained no better on any task and made the one collapsed run (benchmarks/README.md). 'step' (GRPO "
            "and RLOO, one optimizer step a generation batch): the round schedule's update without its scoring pass: "
            "the first step trains on every completion, hooks keep each one's exact gradient, and before clipping "
            "and the optimizer step the dropped ones' are taken out of the step's gradient (costs the LoRA weights' "
            "size per completion in device memory until the step; the store's vectors come from that backward).",
            "choices": list(SCHEDULES),
        },
    )
    iif_target: str | None = field(
        default=None,
        metadata={
            "help": "What influence is measured on. 'heldout_return': a return surrogate on held-out prompts "
            "with freshly sampled responses (default when a target_dataset is given); 'buffer_return': "
            "the same surrogate on the round's own records (default otherwise). 'none': record only: no "
            "held-out sampling, no target, no scoring, nothing dropped (whatever iif_drop_fraction says); the store "
            "keeps every round's records, their projected gradients and the round-start snapshot, and `audit`, "
            "`score`, `formation`, `intervene` and `report` score the behaviours you pick after training.",
            "choices": list(TARGETS),
        },
    )
    iif_score: str = field(
        default="raw",
        metadata={
            "help": "'raw': influence is <grad f, -grad loss_i> (the paper's). 'adam': the record's gradient divided "
            "by sqrt(v_hat) + eps, Adam's bias-corrected second moment now, as Adam moves the weights (LESS, "
            "Bergson); the first round, before any step, scores raw. Not under DeepSpeed (its moments are "
            "partitioned). benchmarks/README.md (counterfactual validity) measures both.",
            "choices": list(SCORES),
        },
    )
    iif_num_heldout_prompts: int = field(
        default=32,
        metadata={
            "help": "Held-out prompts sampled per round for the heldout_return target (all processes together)."
        },
    )
    iif_heldout_sampling: str = field(
        default="with_rollout",
        metadata={
            "help": "'with_rollout': the held-out prompts are generated in the same batched call as the round's "
            "prompts (one generation instead of two; on a real LM most of the held-out target's cost); the "
            "round's responses are then a different random draw than TRL's PPOTrainer makes from the same "
            "seed (the same distribution). 'separate': their own generation under their own seed, so that "
            "with iif_drop_fraction=0 training is bit for bit TRL's.",
            "choices": list(HELDOUT_SAMPLING),
        },
    )
    iif_projection_dim: int = field(
        default=0,
        metadata={
            "help": "0: exact influence scores (contracted from layer factors, no [n, D] matrix). k > 0: score "
            "with gradients randomly projected to k per LoRA adapter side."
        },
    )
    iif_projection_seed: int = field(default=0, metadata={"help": "Seed of the random projection."})
    iif_min_keep_fraction: float = field(
        default=0.1,
        metadata={"help": "Never keep fewer than this fraction of a round's records, so no epoch is empty."},
    )
    iif_filter: str = field(
        default="influence",
        metadata={
            "help": "'influence': drop the most harmful records (IIF). 'random': a control that drops as many "
            "records, chosen at random (scores are still computed and stored).",
            "choices": ["influence", "random"],
        },
    )
    iif_keep_steps: bool = field(
        default=False,
        metadata={
            "help": "false: the kept records fill PPO's mini-batches of the usual size, so dropping records "
            "drops optimizer steps (the paper's way, and the only one that saves time). true: keep PPO's "
            "number of mini-batches (num_mini_batches steps an epoch), each smaller, so a round moves the "
            "policy as many steps as PPO's does (benchmarks/README.md: when IIF helps)."
        },
    )
    iif_whiten_after_filter: bool = field(
        default=False,
        metadata={
            "help": "false: advantages are whitened over the whole round before filtering and not again (TRL's "
            "and the paper's way). true: whiten the kept records' advantages anew over the kept records before "
            "each optimisation epoch (scores still use the round's whitening)."
        },
    )
    iif_store: bool = field(
        default=True,
        metadata={
            "help": "Write every round's attribution (records, scores, kept flags, metrics) to iif_store_dir."
        },
    )
    iif_store_projection_dim: int = field(
        default=64,
        metadata={
            "help": "Store each record's gradient at the round start, randomly projected to this size per LoRA "
            "adapter side (r * k floats per adapter side), so targets chosen after training can be scored "
            "(rlhf-influence score). 0: store no gradients."
        },
    )
    iif_store_sketch_dim: int = field(
        default=16384,
        metadata={
            "help": "Fold each record's per-side projected gradient into one vector of this size with a seeded "
            "sparse sign sketch (16384 float16 entries: 32 KiB a record), when it is longer. 0: store the "
            "per-side projection as it is (r * iif_store_projection_dim per adapter side)."
        },
    )
    iif_record_loss: str = field(
        default="policy",
        metadata={
            "help": "Each record's loss that influence differentiates: 'policy' (the trainer's policy loss) or "
            "'policy_and_value' (PPO only, with --value_head shared: plus vf_coef x the record's clipped value "
            "loss, which there reaches the LoRA weights, as the paper's code scores).",
            "choices": list(RECORD_LOSSES),
        },
    )
    iif_store_gradients: str = field(
        default="snapshot",
        metadata={
            "help": "With --iif_target none, where the stored per-record gradients come from. 'snapshot': one "
            "forward and backward over the round's records at the round start (exactly the round-start gradient). "
            "'training': hooks in the optimisation's own backward (PPO's, or TRL's GRPO's), no extra pass: each "
            "record's gradient of its loss the first time it is trained on (PPO's first epoch, GRPO's first "
            "iteration), at the weights it was trained at (the round start for the first step, later ones after "
            "the steps before them), on the scoring's normaliser. Not with fp16. With a target the scoring pass "
            "yields them anyway.",
            "choices": list(STORED_GRADIENTS),
        },
    )
    iif_store_snapshot_dtype: str = field(
        default="float32",
        metadata={
            "help": "Precision of the round-start LoRA weights stored each round (which `score`, `formation` and "
            "`intervene` rebuild the policy from).",
            "choices": list(SNAPSHOT_DTYPES),
        },
    )
    iif_store_optimizer_state: bool = field(
        default=False,
        metadata={
            "help": "Also store Adam's moments of the LoRA weights at each round start (opt-in: twice the "
            "snapshot's size), so that `intervene` and counterfactual re-runs start from the optimizer state the "
            "run had, and Adam-aware scores can be computed after training. Not under DeepSpeed (its moments are "
            "partitioned)."
        },
    )
    iif_store_kl: bool = field(
        default=True,
        metadata={
            "help": "GRPO: store each round's KL to the reference (objective/kl) for the report, the audit and the "
            "frontier. With --beta 0 TRL computes no reference log-probs, so it costs a forward of the reference over "
            "the round's completions, and one of the policy unless the round's first pass trains every completion "
            "at the round-start weights (record only, p=0 or --iif_schedule step, one step a round, no dropout), whose own "
            "forward then gives the policy's log-probs (benchmarks/README.md, 'Record-only runs'); false skips it "
            "(no KL curve). Not with --kl_control adaptive, which steers by it. PPO's exact KL comes from logits "
            "its rollout computes anyway: always stored."
        },
    )
    iif_store_dtype: str = field(
        default="float16",
        metadata={"help": "Precision of the stored gradients.", "choices": ["float16", "float32"]},
    )
    iif_store_dir: str | None = field(
        default=None,
        metadata={"help": "Where the attribution store goes; default: <output_dir>/attribution."},
    )

    @property
    def attribution_dir(self) -> str:
        """Where the attribution store is written (``iif_store_dir`` or <output_dir>/attribution)."""
        return self.iif_store_dir or os.path.join(self.output_dir, STORE_DIR)

    def resolved_target(self, has_target_dataset: bool) -> str:
        """The return target a trainer scores against: ``iif_target``, or by default
        ``heldout_return`` when held-out prompts were given and ``buffer_return`` otherwise."""
        target = self.iif_target or ("heldout_return" if has_target_dataset else "buffer_return")
        if target_kind(target).needs_heldout and not has_target_dataset:
            raise ValueError("iif_target='heldout_return' needs a target_dataset of held-out prompts")
        return target

    def check_iif_settings(self) -> None:
        """Raise ValueError on any IIF setting out of range (a config's ``__post_init__`` calls it)."""
        if self.kl_control not in KL_CONTROLS:
            raise ValueError(f"kl_control must be one of {KL_CONTROLS}, got {self.kl_control!r}")
        if not self.iif_store_kl and self.kl_control == "adaptive":
            raise ValueError("iif_store_kl=false leaves no KL to steer by: kl_control='adaptive' needs it")
        target = self.kl_target
        if self.kl_control == "adaptive" and (
            target is None or finite_number_problem(target, 0.0, low_included=False)
        ):
            raise ValueError(
                f"kl_control='adaptive' needs kl_target, a KL per response > 0 (the paper: 0.1), got {target}"
            )
        if problem := whole_number_problem(self.kl_horizon, 1):
            raise ValueError(f"kl_horizon {problem}")
        if not 0.0 <= self.iif_drop_fraction <= 1.0:
            raise ValueError(f"iif_drop_fraction must be in [0, 1], got {self.iif_drop_fraction}")
        if self.iif_schedule not in SCHEDULES:
            raise ValueError(f"iif_schedule must be one of {SCHEDULES}, got {self.iif_schedule!r}")
        if self.iif_target is not None and self.iif_target not in TARGETS:
            raise ValueError(f"iif_target must be one of {TARGETS} (or unset), got {self.iif_target!r}")
        if self.iif_heldout_sampling not in HELDOUT_SAMPLING:
            raise ValueError(
                f"iif_heldout_sampling must be one of {HELDOUT_SAMPLING}, got {self.iif_heldout_sampling!r}"
            )
        if self.iif_store_optimizer_state and not (self.iif_enabled and self.iif_store):
            raise ValueError("iif_store_optimizer_state stores Adam's moments with each round: it needs iif_enabled=true "
                             "and iif_store=true")  # fmt: skip
        if self.iif_target == "none":
            if self.iif_score != "raw":
                raise ValueError("iif_target='none' scores nothing: iif_score applies only with a target")
            if self.iif_schedule != "round":
                raise ValueError(
                    f"iif_target='none' records once a round and drops nothing: iif_schedule={self.iif_schedule!r} "
                    "applies only with a target (for gradients from the training's backward: iif_store_gradients='training')"
                )
            if self.iif_filter == "random":
                raise ValueError("iif_target='none' drops nothing, so there is no random control: iif_filter='influence'")
            if not self.iif_store or self.iif_store_projection_dim == 0:
                raise ValueError(
                    "iif_target='none' only records the store's gradients: it needs iif_store=true and "
                    "iif_store_projection_dim > 0 (for no attribution at all: iif_enabled=false)"
                )
        if self.iif_record_loss not in RECORD_LOSSES:
            raise ValueError(f"iif_record_loss must be one of {RECORD_LOSSES}, got {self.iif_record_loss!r}")
        if self.iif_store_gradients not in STORED_GRADIENTS:
            raise ValueError(f"iif_store_gradients must be one of {STORED_GRADIENTS}, got {self.iif_store_gradients!r}")
        in_step = self.iif_schedule == "step"  # its stored gradients come from the training's backward anyway
        if self.iif_store_gradients == "training" and (not self.iif_enabled or (self.iif_target != "none" and not in_step)):
            raise ValueError(
                "iif_store_gradients='training' is for record-only runs (iif_target='none'): with a target, the "
                "scoring pass at the round start yields the stored gradients at no extra cost"
            )
        if self.iif_score not in SCORES:
            raise ValueError(f"iif_score must be one of {SCORES}, got {self.iif_score!r}")
        if self.iif_filter not in ("influence", "random"):
            raise ValueError(f"iif_filter must be 'influence' or 'random', got {self.iif_filter!r}")
        if self.iif_num_heldout_prompts < 1:
            raise ValueError(f"iif_num_heldout_prompts must be >= 1, got {self.iif_num_heldout_prompts}")
        if self.iif_projection_dim < 0:
            raise ValueError(
                f"iif_projection_dim must be 0 (exact) or a positive integer, got {self.iif_projection_dim}"
            )
        if self.iif_store_projection_dim < 0:
            raise ValueError(f"iif_store_projection_dim must be >= 0, got {self.iif_store_projection_dim}")
        if self.iif_store_sketch_dim < 0:
            raise ValueError(f"iif_store_sketch_dim must be >= 0, got {self.iif_store_sketch_dim}")
        if self.iif_store_snapshot_dtype not in SNAPSHOT_DTYPES:
            raise ValueError(
                f"iif_store_snapshot_dtype must be float32 or bfloat16, got {self.iif_store_snapshot_dtype!r}"
            )
        if self.iif_store_dtype not in ("float16", "float32"):
            raise ValueError(f"iif_store_dtype must be float16 or float32, got {self.iif_store_dtype!r}")
        if not 0.0 < self.iif_min_keep_fraction <= 1.0:
            raise ValueError(f"iif_min_keep_fraction must be in (0, 1], got {self.iif_min_keep_fraction}")

    def check_kl_coefficient(self, name: str, value: float) -> None:
        """The adaptive controller scales the coefficient ``name`` (PPO's kl_coef, GRPO's beta) from
        its starting ``value``, which must be > 0."""
        if self.kl_control == "adaptive" and not value > 0:
            raise ValueError(
                f"kl_control='adaptive' steers {name} from its starting value: give {name} > 0 (the paper: 0.04), "
                f"got {value}"
            )
