"""A compact progress bar for IIF runs: one bar over rounds with reward, kept fraction and KL."""

from __future__ import annotations

from tqdm.auto import tqdm
from transformers import TrainerCallback


class RoundProgress(TrainerCallback):
    """Shows rounds done, mean reward, kept fraction and KL; remembers each round's metrics."""

    def __init__(self) -> None:
        self.bar = None
        self.history: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, desc="IIF-PPO rounds", unit="round", dynamic_ncols=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "objective/scores" not in logs:
            return
        self.history.append(dict(logs))
        if self.bar is not None:
            self.bar.set_postfix(
                reward=f"{logs['objective/scores']:+.3f}",
                kept=f"{logs.get('iif/kept_fraction', 1.0):.2f}",
                kl=f"{logs.get('objective/kl', 0.0):.3f}",
                refresh=False,
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
