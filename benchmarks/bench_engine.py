"""Engine benchmark: per-record LoRA gradients and influence scoring against the physical floor.

For each batch size and sequence length, on one model, it times (median of repeats) and
measures the peak memory of:

  floor       one plain forward + backward of the batch's summed PPO loss (LoRA weight grads)
  exact       per_record_gradients(model, loss_fn) -> [n, D]
  projected   per_record_gradients(model, loss_fn, RandomProjector(dim)) -> [n, D']
  scoring     exact influence on a target, contracted from the factors (no [n, D])
  loop        peer: one forward + backward per record (LESS-style), -> [n, D]
  vmap        peer: torch.func.vmap(grad) over records (TRAK/dattri-style), -> [n, D]

Times are printed in ms and as a ratio to the floor measured in the same run. Peak memory is
the largest increase over the memory in use before the call (CUDA: allocator peak; CPU:
heap bytes in use, sampled every millisecond).

    python benchmarks/bench_engine.py                 # the default grid
    python benchmarks/bench_engine.py --batch-sizes 8 --seq-lens 8 --hidden 32   # smoke
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil
import torch
from rich.console import Console
from rich.table import Table

from rlhf_influence import (
    RandomProjector,
    capture_factors,
    find_lora_layout,
    per_record_gradients,
    ppo_policy_loss,
    scores_from_factors,
    target_gradients,
)
from rlhf_influence.engine.targets import ReturnTarget
from rlhf_influence.tasks.toy import tiny_causal_lm, toy_lora_config

METHODS = ("floor", "exact", "projected", "scoring", "loop", "vmap")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
    )]  # fmt: skip


def _heap_in_use() -> int:
    """Bytes malloc has handed out and not taken back (glibc), whatever the OS still maps."""
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.mallinfo2.restype = _MallInfo2
except (OSError, AttributeError):  # not glibc: fall back to the resident set size
    _LIBC = None


class PeakMemory:
    """Peak memory increase (bytes) while the block runs.

    CUDA: the allocator's peak. CPU: bytes in use by malloc (glibc's mallinfo2, else the RSS),
    sampled every millisecond, so a spike shorter than that can be missed.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def _read(self) -> int:
        return _heap_in_use() if _LIBC is not None else self._proc.memory_info().rss

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._proc = psutil.Process()
            self._base = self._read()
            self._max = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._read())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self._read()) - self._base


def measure(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak bytes) of ``fn`` after one warm-up call."""
    fn()
    times, peak = [], 0
    for _ in range(repeats):
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        del out
        peak = max(peak, mem.peak)
    return statistics.median(times), peak


def build(args, device, dtype):
    from peft import get_peft_model

    if args.model == "smollm2":  # the reviews task's policy: LoRA r=16 on q, k, v, o
        from transformers import AutoModelForCausalLM

        from rlhf_influence.tasks import reviews

        model = AutoModelForCausalLM.from_pretrained(reviews.smollm2_checkpoint(), dtype=dtype)
        config = reviews.lora_config(r=args.rank)
        config.init_lora_weights = False
        args.arch, args.vocab = "llama", model.config.vocab_size
        args.hidden, args.layers = model.config.hidden_size, model.config.num_hidden_layers
    else:
        model = tiny_causal_lm(
            args.vocab,
            arch=args.arch,
            hidden=args.hidden,
            layers=args.layers,
            heads=args.heads,
            max_positions=max(args.seq_lens) + 8,
            seed=0,
            dtype=dtype,
        )
        config = toy_lora_config(args.arch, r=args.rank, init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(model, config).to(device=device, dtype=dtype)
    model.eval()
    return model


def batch_of(n: int, seq: int, vocab: int, device, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (n, seq), generator=g)
    attention_mask = torch.ones(n, seq, dtype=torch.long)
    prompt = seq // 2
    for i in range(n):  # left padding of varied length, as PPO rollouts have
        pad = int(torch.randint(0, prompt - 1, (1,), generator=g))
        attention_mask[i, :pad] = 0
    response_mask = torch.zeros(n, seq, dtype=torch.bool)
    response_mask[:, prompt:] = True
    advantages = torch.randn(n, seq, generator=g)
    return [t.to(device) for t in (input_ids, attention_mask, response_mask)] + [advantages.to(device, dtype)]


def per_record_loop(model, params, batch):
    """Peer: LESS-style, each record alone through forward and backward."""
    input_ids, attention_mask, response_mask, advantages = batch
    n = input_ids.shape[0]
    normaliser = response_mask.sum()
    rows = []
    for i in range(n):
        sl = slice(i, i + 1)
        loss = ppo_policy_loss(
            model, input_ids[sl], attention_mask[sl], response_mask[sl], advantages[sl], normaliser=normaliser
        )[0]
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def vmap_grads(model, names, params, batch):
    """Peer: torch.func.vmap(grad) over records (TRAK/dattri-style).

    transformers builds attention masks with data-dependent Python control flow, which vmap
    cannot trace, so the peer gets the records' 4-D additive masks and positions precomputed.
    """
    from torch.func import functional_call, grad, vmap

    input_ids, attention_mask, response_mask, advantages = batch
    n, seq = input_ids.shape
    normaliser = response_mask.sum()
    frozen = {k: v for k, v in model.named_parameters() if not v.requires_grad}
    frozen.update(dict(model.named_buffers()))
    keep = attention_mask.bool()
    allowed = (
        torch.tril(torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device))[None] & keep[:, None, :]
    )
    allowed |= torch.eye(seq, dtype=torch.bool, device=input_ids.device)[None]
    dtype = params[0].dtype
    additive = torch.zeros(n, 1, seq, seq, dtype=dtype, device=input_ids.device)
    additive.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    positions = (keep.long().cumsum(1) - 1).clamp_min(0)

    def one(trainable, ids, mask, pos, resp, adv):
        inputs = {"input_ids": ids[None], "attention_mask": mask[None], "position_ids": pos[None]}
        logits = functional_call(model, {**frozen, **trainable}, (), inputs).logits[0, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[1:, None])[:, 0]
        return -(logp * adv[1:] * resp[1:]).sum() / normaliser

    trainable = dict(zip(names, params, strict=True))
    grads = vmap(grad(one), in_dims=(None, 0, 0, 0, 0, 0))(
        trainable, input_ids.masked_fill(~keep, 0), additive, positions, response_mask, advantages
    )
    return torch.cat([grads[k].flatten(1) for k in names], dim=1)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = build(args, device, dtype)
    layout = find_lora_layout(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    projector = RandomProjector(dim=args.proj_dim, seed=0)
    rows = []
    for seq in args.seq_lens:
        for n in args.batch_sizes:
            batch = batch_of(n, seq, args.vocab, device, dtype)
            heldout = batch_of(min(n, 16), seq, args.vocab, device, dtype, seed=1)
            target = ReturnTarget.from_heldout(*heldout[:3], heldout[3][:, -1])
            v = target_gradients(model, target, layout=layout)[None]

            def loss_fn(m, batch=batch):
                return ppo_policy_loss(m, *batch)

            def floor(batch=batch):
                loss_fn(model).sum().backward()
                for p in params:
                    p.grad = None

            work = {
                "floor": floor,
                "exact": lambda: per_record_gradients(model, loss_fn, layout=layout),
                "projected": lambda: per_record_gradients(model, loss_fn, projector, layout=layout),
                "scoring": lambda v=v: scores_from_factors(capture_factors(model, loss_fn, layout=layout), v),
                "loop": lambda batch=batch: per_record_loop(model, params, batch),
                "vmap": lambda batch=batch: vmap_grads(model, names, params, batch),
            }
            row = {"n": n, "seq": seq}
            for method in METHODS:
                if method in ("loop", "vmap") and args.no_peers:
                    row[method] = "skipped (--no-peers)"
                    continue
                repeats = 1 if method == "loop" and n >= 64 else args.repeats
                try:
                    row[method] = measure(work[method], device, repeats)
                except Exception as exc:  # a peer that cannot run is reported, not hidden
                    row[method] = f"cannot run: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
            rows.append(row)
            print_row(row)
    return rows


def fmt(value, floor) -> tuple[str, str]:
    if isinstance(value, str):
        return value, ""
    seconds, peak = value
    return f"{seconds * 1e3:.0f} ms ({seconds / floor[0]:.2f}x)", f"{peak / 2**20:.0f}"


def print_row(row: dict) -> None:
    floor = row["floor"]
    cells = [fmt(row[m], floor) for m in METHODS]
    print(
        f"n={row['n']:4d} T={row['seq']:3d}  "
        + "  ".join(f"{m}: {t}" for m, (t, _) in zip(METHODS, cells, strict=True)),
        flush=True,
    )


def table(rows: list[dict], args) -> Table:
    t = Table(
        title=f"per-record LoRA gradients and scoring, {args.model} {args.arch} h={args.hidden} L={args.layers} "
        f"r={args.rank} "
        f"{args.dtype} on {args.device} (time, ratio to floor; peak MiB)"
    )
    t.add_column("n x T")
    for m in METHODS:
        t.add_column(m, justify="right")
        t.add_column("MiB", justify="right")
    for row in rows:
        cells = []
        for m in METHODS:
            cells.extend(fmt(row[m], row["floor"]))
        t.add_row(f"{row['n']} x {row['seq']}", *cells)
    return t


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[16, 64])
    parser.add_argument(
        "--model",
        choices=["tiny", "smollm2"],
        default="tiny",
        help="tiny: built from --arch/--hidden/--layers/--heads/--vocab; smollm2: SmolLM2-135M-Instruct "
        "(the reviews task's checkpoint, LoRA r=--rank on q, k, v, o; the size flags are ignored)",
    )
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--proj-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-peers", action="store_true", help="skip the per-record loop and vmap peers")
    parser.add_argument("--out", type=Path, help="also write the rows to OUT.json and the table to OUT.md")
    args = parser.parse_args(argv)
    console = Console(width=200)
    cpu = platform.processor() or platform.machine()
    device_name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{cpu}, {os.cpu_count()} cores"
    )
    console.print(f"torch {torch.__version__}, {device_name}, {torch.get_num_threads()} threads")
    rows = run(args)
    console.print(table(rows, args))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        setting = {k: v for k, v in vars(args).items() if k != "out"}
        record = {"device": device_name, "torch": torch.__version__, "settings": setting, "rows": rows}
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=2))
        with args.out.with_suffix(".md").open("w") as f:
            Console(file=f, width=250, color_system=None).print(table(rows, args))


if __name__ == "__main__":
    main()
