"""The training call that Ctrl-C and SIGTERM stop cleanly (the rounds so far kept), and the
summary at the end."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from contextlib import contextmanager

from ..trainer.checkpoint import CheckpointError, complete_checkpoints, resolve_checkpoint
from ..trainer.rewards import RewardError
from .errors import fail, one_line


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


def train(trainer, training_args, progress, history: Callable[[], list[dict]] | None = None) -> int:
    """Train with ``progress`` as the progress bar (unless --disable_tqdm); Ctrl-C or SIGTERM stop
    with the complete rounds on disk (exit status 128 + the signal); at the end, the summary of
    ``history()`` (default: the trainer's ``iif_history``). Returns the exit status."""
    if not training_args.disable_tqdm:
        from transformers.trainer_callback import ProgressCallback

        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(progress)
    stop = StopSignal()
    resume = training_args.resume_from_checkpoint
    try:
        checkpoint = resolve_checkpoint(training_args.output_dir, resume)
        with stop.on_sigterm():
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except (CheckpointError, RewardError) as exc:  # a reward that returned what cannot be one: rounds so far kept
        fail(one_line(exc))
    except KeyboardInterrupt:
        saved = None
        if training_args.save_final_model:  # the policy as the signal found it
            with stop.on_sigterm():
                saved = trainer.save_final_model()
        if trainer.accelerator.is_main_process:
            done = trainer.store.rounds() if trainer.store else []
            print(
                f"\n{stop.name}: {len(done)} complete round(s) are on disk in {training_args.attribution_dir}"
            )
            if saved is not None:
                print(f"the policy as it was when stopped is saved in {os.path.abspath(saved)}")
            latest = complete_checkpoints(training_args.output_dir)
            if latest:
                print(f"continue the run with --resume_from_checkpoint true (from {latest[-1].name})")
        return 128 + stop.number
    if trainer.accelerator.is_main_process:
        summarise(history() if history is not None else trainer.iif_history, training_args)
    end_processes(trainer.accelerator)
    return 0


def end_processes(accelerator) -> None:
    """At the end of a run on several processes: wait for all, then take the process group down
    before the interpreter exits (left to exit, gloo's threads can abort a process: 'terminate
    called without an active exception', seen once on 2 CPU processes under load)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        accelerator.wait_for_everyone()
        dist.destroy_process_group()


def sparkline(values: list[float]) -> str:
    blocks = "▁▂▃▄▅▆▇█"
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(blocks[min(7, int((v - lo) / span * 8))] for v in values)


def summarise(history: list[dict], training_args) -> None:
    """Reward per round (a sparkline, first rounds against last), kept fraction, where things are."""
    rewards = [row["objective/scores"] for row in history]
    if not rewards:
        return
    k = max(1, len(rewards) // 5)
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    kept = sum(row.get("iif/kept_fraction", 1.0) for row in history) / len(history)
    print(f"\nmean reward per round: {sparkline(rewards)}")
    print(f"  first {k} rounds {first:+.3f} -> last {k} rounds {last:+.3f}; mean kept fraction {kept:.2f}")
    print(f"run directory: {os.path.abspath(training_args.output_dir)}")
    if training_args.save_final_model:
        print(f"trained model: {os.path.abspath(training_args.output_dir)} (LoRA adapter and tokenizer; load it "
              "with peft.AutoPeftModelForCausalLM.from_pretrained)")  # fmt: skip
    if not (training_args.iif_enabled and training_args.iif_store):
        print("attribution:   none stored (--iif_enabled false or --iif_store false)")
        return
    print(f"attribution:   {os.path.abspath(training_args.attribution_dir)}")
    print(f"audit it:      rlhf-influence audit {training_args.output_dir}")
