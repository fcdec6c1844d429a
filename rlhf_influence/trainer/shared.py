"""What both IIF trainers hand the attribution store, written once: the manifest's common part,
the round-start adapter, the files that rebuild the policy, the records' tensors gathered over
processes, and the records table's attribution columns."""

from __future__ import annotations

import math
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object
from torch import nn

from ..engine.errors import NoLoraError
from ..engine.influence import adam_preconditioner
from ..engine.lora import LoraLayout, canonical_name, find_lora_layout
from ..iif.algorithms import get_algorithm
from ..iif.influence_filter import InfluenceFilter, Scoring
from ..iif.records import ScoredRecords
from ..iif.settings import IIFSettings
from ..store import AttributionStore, RunManifest, StoredGradients, TrainingSettings, schema

# Base models up to this size are copied into the store (tiny and test models); larger ones are
# referenced by name, as loaded.
BASE_MODEL_STORE_LIMIT = 64 * 2**20


def replay_optimizer(args: IIFSettings) -> str:
    """How the audit's replay of a round optimises, in words (the manifest records it for the reader)."""
    if args.iif_store_optimizer_state:
        return "AdamW (re-runs start from the run's stored round-start moments)"
    return "AdamW (re-runs start from fresh moments)"


@contextmanager
def own_random_stream(device: torch.device, seed: int | None = None):
    """Random draws inside (seeded with ``seed`` if given) leave training's stream, on the CPU and
    on this GPU, as it was."""
    devices = [device.index if device.index is not None else 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def heldout_rows(dataset, round_index: int, num_prompts: int, accelerator) -> list[dict]:
    """This process's share of round ``round_index``'s held-out prompts (``num_prompts`` over all
    processes), taken in order from ``dataset`` and cycling through it."""
    world, rank = accelerator.num_processes, accelerator.process_index
    per_process = max(1, num_prompts // world)
    first = (round_index - 1) * per_process * world + rank * per_process
    return [dataset[(first + j) % len(dataset)] for j in range(per_process)]


def heldout_seed(seed: int, round_index: int, process_index: int) -> int:
    """The seed a round's held-out target samples under on one process, apart from training's."""
    return (seed * 1_000_003 + round_index * 7919 + process_index) % (2**63)


def check_optimizer_state_access(args: IIFSettings, accelerator, optimizer=None) -> None:
    """The settings that read Adam's moments (``iif_score='adam'``, ``iif_store_optimizer_state``)
    need torch's Adam or AdamW (without amsgrad: ``optimizer``, or ``args.optim`` where the optimizer
    is made later) and its moments whole, which DeepSpeed's partitioned optimizer does not give; the
    gradients taken from the training's backward need it free of fp16's loss scale."""
    if args.iif_enabled and getattr(args, "fp16", False):  # both ways of reading the backward's gradients
        if args.iif_store_gradients == "training":
            raise ValueError("iif_store_gradients='training' reads the backward's gradients, which fp16's loss "
                             "scaling scales and skips: use bf16 or float32, or iif_store_gradients='snapshot'")  # fmt: skip
        if args.iif_schedule == "step":
            raise ValueError("iif_schedule='step' edits the step's gradient, which fp16's loss scaling scales and "
                             "skips: use bf16 or float32, or iif_schedule='round'")  # fmt: skip
    wanted = [name for name, on in (("iif_score='adam'", args.iif_score == "adam"),
                                    ("iif_store_optimizer_state", args.iif_store_optimizer_state)) if on]  # fmt: skip
    if not wanted:
        return
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        raise ValueError(
            f"{' and '.join(wanted)} need the optimizer's whole moments; under DeepSpeed they are partitioned: "
            "run with DDP or one process"
        )
    inner = getattr(optimizer, "optimizer", optimizer)
    if inner is not None:
        adam = isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))
        if not adam or any(group.get("amsgrad") for group in inner.param_groups):
            raise ValueError(f"{' and '.join(wanted)} read Adam's moments: the optimizer must be torch's Adam or AdamW "
                             f"without amsgrad, got {type(inner).__name__}")  # fmt: skip
    else:
        optim = getattr(getattr(args, "optim", "adamw_torch"), "value", getattr(args, "optim", "adamw_torch"))
        if not str(optim).startswith("adamw_torch"):
            raise ValueError(f"{' and '.join(wanted)} read Adam's moments: --optim must be adamw_torch or "
                             f"adamw_torch_fused (torch's AdamW), got {optim}")  # fmt: skip


def score_preconditioner(args: IIFSettings, policy: nn.Module, optimizer, layout: LoraLayout) -> torch.Tensor | None:
    """Adam's preconditioner of the policy's LoRA weights now, in the layout's order, for
    ``iif_score='adam'``; None for raw scores and before the optimizer's first step."""
    if args.iif_score != "adam" or optimizer is None:
        return None
    states, group = lora_adam_state(policy, optimizer)
    missing = [name for name in layout.param_names if "exp_avg_sq" not in states[name][1]]
    if len(missing) == len(layout.param_names):
        return None  # no step taken yet
    if missing:
        raise ValueError(f"the optimizer keeps no second moment for the LoRA weight {missing[0]} (it trains no gradient?): "
                         "iif_score='adam' cannot precondition it")  # fmt: skip
    v = torch.cat([states[name][1]["exp_avg_sq"].flatten() for name in layout.param_names]).float()
    step = float(states[layout.param_names[0]][1]["step"])
    return adam_preconditioner(v, step, group["betas"][1], group["eps"])


def open_store(args: IIFSettings, accelerator) -> AttributionStore | None:
    """The run's attribution store (None when IIF or storing is off); the main process removes
    the half-written rounds a killed run left, and says so."""
    if not (args.iif_store and args.iif_enabled):
        return None
    store = AttributionStore(args.attribution_dir)
    if accelerator.is_main_process:
        removed = store.remove_stale_temporaries()
        if removed:
            warnings.warn(
                f"removed {len(removed)} half-written round(s) that a killed run left in {store.path}: "
                + ", ".join(removed),
                stacklevel=3,
            )
    return store


def gathered_state_dict(module: nn.Module, select=lambda name, param: True) -> dict[str, torch.Tensor]:
    """``module``'s state dict on the CPU with its parameters whole (gathered where ZeRO-3 shards
    them: every process must call it), restricted to the parameters ``select(name, param)`` keeps
    (buffers are kept with all parameters only)."""
    params = [(name, p) for name, p in module.named_parameters() if select(name, p)]
    every = len(params) == len(list(module.parameters()))
    sharded = [p for _, p in params if hasattr(p, "ds_id")]
    gather = nullcontext()
    if sharded:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(sharded, modifier_rank=None)
    with gather:
        state = {name: p.detach().to("cpu", copy=True) for name, p in params}
    if every:  # the buffers, and the second names of tied parameters (a copy of the gathered one)
        name_of = {id(p): name for name, p in module.named_parameters()}
        for key, value in module.state_dict(keep_vars=True).items():
            if key in state:
                continue
            tied = name_of.get(id(value))
            state[key] = state[tied].clone() if tied in state else value.detach().to("cpu", copy=True)
    return state


def adapter_snapshot(policy: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The policy's trainable LoRA weights now (gathered under ZeRO-3), on the CPU, in ``dtype``."""
    lora = gathered_state_dict(policy, lambda name, p: p.requires_grad and "lora_" in name)
    return {canonical_name(name): t.to(dtype).contiguous() for name, t in lora.items()}


OPTIMIZER_HYPERPARAMETERS = ("lr", "beta1", "beta2", "eps", "weight_decay")


def lora_adam_state(policy: nn.Module, optimizer) -> tuple[dict[str, tuple[nn.Parameter, dict]], dict]:
    """Each trainable LoRA weight of ``policy`` by canonical name, with the optimizer's state of it (empty
    before its first step), and the parameter group they train in (lr, betas, eps, weight decay)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    group_of = {id(p): group for group in inner.param_groups for p in group["params"]}
    states, group = {}, None
    for name, param in policy.named_parameters():
        if not (param.requires_grad and "lora_" in name):
            continue
        if id(param) not in group_of:
            raise ValueError(f"the optimizer does not train the LoRA weight {name}")
        group = group_of[id(param)]
        states[canonical_name(name)] = (param, inner.state.get(param) or {})
    if group is None:
        raise ValueError("the policy has no trainable LoRA weights")
    return states, group


def optimizer_moments(policy: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    """Adam's state for the policy's trainable LoRA weights now, on the CPU in float32: each
    weight's ``exp_avg/<name>`` and ``exp_avg_sq/<name>`` (zeros before the first step), the
    ``step`` count and the ``hyperparameters`` (:data:`OPTIMIZER_HYPERPARAMETERS`, the learning
    rate as scheduled now). What a replay of the round starts its optimizer from, and what an
    Adam-aware score preconditions with (``iif_store_optimizer_state``)."""
    states, group = lora_adam_state(policy, optimizer)
    moments: dict[str, torch.Tensor] = {}
    step = 0.0
    for name, (param, state) in states.items():
        for moment in ("exp_avg", "exp_avg_sq"):
            value = state.get(moment)
            if value is not None and value.shape != param.shape:
                raise ValueError(f"the optimizer's {moment} of {name} is sharded ({tuple(value.shape)}): "
                                 "iif_store_optimizer_state needs whole moments (no DeepSpeed)")  # fmt: skip
            moments[f"{moment}/{name}"] = (
                torch.zeros(param.shape) if value is None else value.detach().to("cpu", torch.float32, copy=True)
            )
        if "step" in state:
            step = float(state["step"])
    beta1, beta2 = group["betas"]
    moments["step"] = torch.tensor([step], dtype=torch.float64)
    moments["hyperparameters"] = torch.tensor(
        [group["lr"], beta1, beta2, group["eps"], group["weight_decay"]], dtype=torch.float64
    )
    return moments


def model_files(policy: nn.Module, tokenizer, adapter_name: str | None) -> dict:
    """What the store keeps so that a round's snapshot can be rebuilt after training."""
    base = policy.get_base_model()
    reference = getattr(base.config, "_name_or_path", "") or None
    sharded = any(hasattr(p, "ds_id") for p in base.parameters())
    size = sum(p.numel() * p.element_size() for p in base.parameters())
    small = not sharded and size <= BASE_MODEL_STORE_LIMIT
    return {
        "tokenizer": tokenizer,
        "peft_config": policy.peft_config[adapter_name or "default"],
        "base_model": base if small else None,
        "base_model_reference": reference,
    }


def attribution_columns(scorings: list[Scoring], records_per_process: int) -> dict[str, list]:
    """The records table's attribution columns over all processes' records (global order): the
    first scoring's influence, rank and kept flag, every scoring's, and the decision per process."""
    influence = [s.scores.tolist() for s in scorings]
    kept = [s.decision.keep.tolist() for s in scorings]
    n = len(influence[0])
    first = torch.tensor(influence[0])
    rank = torch.empty(n, dtype=torch.long)
    rank[torch.argsort(-torch.nan_to_num(first, nan=-math.inf), stable=True)] = torch.arange(1, n + 1)
    return {
        "record": list(range(n)),
        "process": [i // records_per_process for i in range(n)],
        "influence": influence[0],
        "rank": rank.tolist(),
        "kept": kept[0],
        "influence_by_scoring": [list(x) for x in zip(*influence, strict=True)],
        "kept_by_scoring": [list(x) for x in zip(*kept, strict=True)],
        "kept_on_each_process": scorings[0].keep_by_process.T.tolist(),
    }


def run_manifest(
    args: IIFSettings,
    iif: InfluenceFilter,
    accelerator,
    training: TrainingSettings,
    *,
    records_per_round: int,
    keep_steps: bool,
    whiten_after_filter: bool = False,
    num_ppo_epochs: int | None = None,
    group_size: int | None = None,
) -> RunManifest:
    """The run's manifest: the filter's settings, the processes, the LoRA layout, the stored
    gradients' projection, and the algorithm's ``training`` settings (what a replay needs)."""
    projector = iif.store_projector
    stored = None
    if projector is not None:
        stored = StoredGradients(
            projection="one-sided per LoRA adapter side, orthogonal"
            + (", then a sparse sign sketch of the whole vector" if iif.store_folds else ""),
            dim=args.iif_store_projection_dim,
            sketch_dim=args.iif_store_sketch_dim or None,
            seed=projector.seed,
            dtype=args.iif_store_dtype,
            size=projector.output_size(iif.layout),
            taken="training" if args.iif_schedule == "step" else args.iif_store_gradients,
        )
    return RunManifest(
        algorithm=training.algorithm,
        target=iif.target,
        schedule=args.iif_schedule,
        drop_fraction=args.iif_drop_fraction if iif.scorer.kind.scores else 0.0,
        filter=args.iif_filter,
        min_keep_fraction=args.iif_min_keep_fraction,
        keep_steps=keep_steps,
        whiten_after_filter=whiten_after_filter,
        projection_dim=args.iif_projection_dim,
        projection_seed=args.iif_projection_seed,
        num_processes=accelerator.num_processes,
        distributed_type=str(accelerator.distributed_type.value),
        mixed_precision=str(accelerator.mixed_precision),
        records_per_round=records_per_round,
        num_ppo_epochs=num_ppo_epochs,
        lora_parameters=iif.layout.num_params,
        lora_adapters=len(iif.layout),
        temperature=iif.scorer.temperature,
        training=training,
        stored_gradients=stored,
        snapshot_dtype=args.iif_store_snapshot_dtype,
        optimizer_state=args.iif_store_optimizer_state,
        score=args.iif_score,
        group_size=group_size,
    )


def gather_records(accelerator, records: ScoredRecords, pad_token_id: int) -> dict[str, torch.Tensor]:
    """The records' stored tensors (token ids, masks, sampling log-probs, advantages, groups) over
    all processes, each padded to one width as :data:`~rlhf_influence.store.schema.STORED_PADDING` says."""
    gathered = {}
    stored = schema.records_to_stored(records)
    for name, local in stored.items():
        local = local.to(accelerator.device)
        if local.dim() > 1:
            pad, first = schema.STORED_PADDING.get(name, (0, False))
            pad = pad_token_id if pad is None else pad
            local = accelerator.pad_across_processes(local, dim=1, pad_index=pad, pad_first=first)
        gathered[name] = accelerator.gather(local).cpu()
    # the left padding the gathering added to this process's prompts: where the model's own
    # positions (GRPO) would otherwise shift, a replay starts each row's positions that much earlier
    added = gathered["queries"].shape[1] - stored["queries"].shape[1]
    offset = torch.full((len(records),), added, dtype=torch.int64, device=accelerator.device)
    if records.position_offset is not None:
        offset += records.position_offset.to(offset.device)
    gathered["position_offset"] = accelerator.gather(offset).cpu()
    return gathered


@dataclass
class StoredRound:
    """One round as a trainer hands it to the store: this process's part, gathered by :func:`write_round`."""

    index: int
    algorithm: str  # whose spec names the columns (AlgorithmSpec.record_columns)
    prompts: list[str]  # this process's records, decoded
    responses: list[str]
    columns: dict[str, torch.Tensor]  # per-record values of this process's records [n]: reward, advantages...
    scorings: list[Scoring]  # the round's scorings (the first keeps the projected gradients)
    records: ScoredRecords  # this process's records
    metrics: dict[str, float]
    snapshot: dict[str, torch.Tensor] | None  # the round-start LoRA weights
    target: ScoredRecords | None = None  # the held-out target's records (None: the buffer target)
    target_rewards: torch.Tensor | None = None  # [M] the held-out completions' rewards, all processes
    optimizer: dict[str, torch.Tensor] | None = None  # the round-start Adam state (optimizer_moments)


def write_round(
    store: AttributionStore,
    accelerator,
    pad_token_id: int,
    round_: StoredRound,
    manifest: Callable[[], RunManifest],
    files: Callable[[], dict],
) -> None:
    """Gather a round over processes and write it (the main process writes; every process must
    call this, at the same point): its records table, metrics, token tensors, projected gradients,
    round-start adapter and held-out target; the manifest and model files with the first round."""
    acc = accelerator
    prompts, responses = gather_object(round_.prompts), gather_object(round_.responses)
    own = get_algorithm(round_.algorithm).record_columns
    if sorted(round_.columns) != sorted(own):
        raise ValueError(f"a {round_.algorithm} round's own record columns are {sorted(own)}, got {sorted(round_.columns)}")
    columns = {k: acc.gather(v.to(acc.device)).cpu().tolist() for k, v in round_.columns.items()}
    projected = round_.scorings[0].projected
    if projected is not None:
        projected = acc.gather(projected.to(acc.device)).cpu()
    tensors = {schema.BATCH: gather_records(acc, round_.records, pad_token_id)}
    if round_.target is not None:
        tensors[schema.TARGET] = {
            **gather_records(acc, round_.target, pad_token_id),
            "last_token_advantages": acc.gather(round_.target.sequence_advantages().float()).cpu(),
            "scores": round_.target_rewards.float().cpu(),
        }
    if not acc.is_main_process:
        return
    table = {
        **attribution_columns(round_.scorings, len(round_.records)),
        "prompt": prompts,
        "response": responses,
        **columns,
    }
    missing = {*schema.RECORD_COLUMNS, *schema.ATTRIBUTION_COLUMNS} - set(table)
    if missing:
        raise ValueError(f"the records table lacks the store's columns {sorted(missing)}")
    if projected is not None:
        tensors[schema.GRADIENTS] = {"projected": projected}
    if round_.snapshot is not None:
        tensors[schema.ADAPTER] = round_.snapshot
    if round_.optimizer is not None:
        tensors[schema.OPTIMIZER] = round_.optimizer
    if not (store.path / schema.MANIFEST_FILE).exists():
        store.write_manifest(manifest())
        store.write_model_files(files())
    store.write_round(round_.index, table, round_.metrics, tensors)


class PhaseTimer:
    """Wall time per named phase of a round, logged as time/<phase>_seconds."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[phase] += time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{phase}_seconds": value for phase, value in self.seconds.items()}


def check_policy_has_lora(model: nn.Module, peft_config) -> None:
    """A TypeError or NoLoraError unless the policy will carry LoRA adapters for IIF to score."""
    if peft_config is not None:
        from peft import LoraConfig

        if not isinstance(peft_config, LoraConfig):
            raise TypeError(
                f"IIF scores LoRA adapters: peft_config must be a peft.LoraConfig, got {type(peft_config).__name__}"
            )
        return
    try:
        find_lora_layout(model)
    except NoLoraError as exc:
        raise NoLoraError(
            f"IIF scores the policy's LoRA weights, but the policy has none: {exc} Or pass peft_config=LoraConfig(...)."
        ) from None
