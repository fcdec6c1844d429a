"""The attribution store's format, written down once: names, the records table, the round tensors.

Layout::

    RUN/attribution/
      manifest.json              the run: format version, target, schedule, projection, training settings
      model.json, tokenizer/, adapter/, base_model/   what rebuilds a round's policy
      round_000001/
        records.parquet          one row per record (RECORD_COLUMNS and the optional columns below)
        metrics.json             the round's logged metrics
        gradients.safetensors    "projected" [N, D']: each record's stored gradient
        adapter.safetensors      the LoRA weights at the round start
        optimizer.safetensors    Adam's round-start moments (iif_store_optimizer_state)
        batch.safetensors        the records' tensors (records_to_stored), padded as STORED_PADDING says
        target.safetensors       the held-out target's records, with their rewards (heldout_return)

The writer (:class:`~rlhf_influence.store.writer.AttributionStore`) writes and reads exactly this;
the trainers hand it a round, the audit reads it back, neither names a file.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from ..iif.records import ScoredRecords
from ..iif.settings import STORE_DIR as STORE_DIR  # the store's folder in a run (the settings' default)

MANIFEST_FILE = "manifest.json"
MODEL_INFO_FILE = "model.json"
RECORDS_FILE = "records.parquet"
METRICS_FILE = "metrics.json"
ROUND_PREFIX = "round_"
TEMPORARY_PREFIXES = (f".{ROUND_PREFIX}", f".{MANIFEST_FILE}.tmp-")  # names written before their rename

# The round's tensor files (``<name>.safetensors``).
GRADIENTS, ADAPTER, OPTIMIZER, BATCH, TARGET = "gradients", "adapter", "optimizer", "batch", "target"


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


# The records table's columns every reader relies on: (type test, what it should be).
RECORD_COLUMNS = {
    "record": (pa.types.is_integer, "integers"),
    "prompt": (_is_text, "text"),
    "response": (_is_text, "text"),
    "reward": (pa.types.is_floating, "floats"),
    "influence": (pa.types.is_floating, "floats"),
    "kept": (pa.types.is_boolean, "true/false"),
}
# The columns beside them: the attribution ones every trainer writes (the decision per scoring
# and per process), and each algorithm's own (``AlgorithmSpec.record_columns``: reward, advantages,
# sampling log-prob, group).
ATTRIBUTION_COLUMNS = (
    "process",  # the process that sampled the record
    "rank",  # 1 = most helpful
    "influence_by_scoring",  # one entry per scoring of the round (per epoch, or once)
    "kept_by_scoring",
    "kept_on_each_process",  # each process's decision, for checking
)

# Named tensors the readers need in each round file, with their number of dimensions.
TENSOR_DIMS = {GRADIENTS: {"projected": 2}, BATCH: {"queries": 2, "responses": 2, "advantages": 2}}

# How each stored ``batch``/``target`` tensor is padded to one width across processes:
# (value, on the left). None stands for the tokenizer's pad token id.
STORED_PADDING = {
    "queries": (None, True),
    "prompt_mask": (0, True),
    "responses": (None, False),
    "completion_mask": (0, False),
    "padding_mask": (1, False),
    "advantages": (0.0, False),
    "logprobs": (1.0, False),
    "ref_logprobs": (1.0, False),
}


def records_to_stored(records: ScoredRecords) -> dict[str, torch.Tensor]:
    """The ``batch`` tensors of one process's records (the trainer gathers them over processes,
    padding each as :data:`STORED_PADDING` says)."""
    c = records.context_length
    stored = {
        "queries": records.input_ids[:, :c].to(torch.int32),
        "responses": records.input_ids[:, c:].to(torch.int32),
        "padding_mask": (~records.response_mask[:, c:]).to(torch.uint8),
        "prompt_mask": records.attention_mask[:, :c].to(torch.uint8),
        "completion_mask": records.attention_mask[:, c:].to(torch.uint8),
        "advantages": records.advantages[:, c:].float(),
    }
    if records.old_logprobs is not None:
        stored["logprobs"] = records.old_logprobs[:, c:].float()
    if records.ref_logprobs is not None:
        stored["ref_logprobs"] = records.ref_logprobs[:, c:].float()
    if records.group is not None:
        stored["group"] = records.group.to(torch.int64)
    if records.position_offset is not None:
        stored["position_offset"] = records.position_offset.to(torch.int64)
    return stored


def records_from_stored(
    tensors: dict[str, torch.Tensor], pad_token_id: int, positions_from_mask: bool = True
) -> ScoredRecords:
    """The records of a stored round. ``positions_from_mask``: the algorithm's position convention
    (``AlgorithmSpec.positions_from_mask``). Stores written before the attention masks were kept
    take TRL's PPO convention: every non-pad token is attended."""
    queries, responses = tensors["queries"].long(), tensors["responses"].long()
    c = queries.shape[1]
    input_ids = torch.cat([queries, responses], dim=1)
    response_mask = torch.nn.functional.pad(tensors["padding_mask"] == 0, (c, 0), value=False)
    if "prompt_mask" in tensors:
        attention_mask = torch.cat([tensors["prompt_mask"], tensors["completion_mask"]], dim=1).bool()
    else:
        attention_mask = input_ids != pad_token_id

    def aligned(name: str) -> torch.Tensor | None:
        return torch.nn.functional.pad(tensors[name].float(), (c, 0)) if name in tensors else None

    return ScoredRecords(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        advantages=aligned("advantages"),
        context_length=c,
        old_logprobs=aligned("logprobs"),
        ref_logprobs=aligned("ref_logprobs"),
        group=tensors["group"].long() if "group" in tensors else None,
        positions_from_mask=positions_from_mask,
        position_offset=tensors["position_offset"].long() if "position_offset" in tensors else None,
    )
