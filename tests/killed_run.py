"""Run a recipe and SIGKILL it in the middle of a round, for the resume tests.

    python tests/killed_run.py ppo|grpo|rloo ROUND RECIPE_FLAGS...

PPO: killed in ROUND's second PPO epoch (after the first epoch's optimizer steps). GRPO and RLOO: killed
after ROUND's first optimizer step (a round is two or more steps: --num_iterations 2).
Nothing is cleaned up: the process dies as a preempted job does.
"""

from __future__ import annotations

import os
import signal
import sys

from recipe_loading import load_recipe


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    algorithm, kill_round, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if algorithm == "ppo":
        from rlhf_influence import IIFPPOTrainer

        epochs: list[int] = []
        original = IIFPPOTrainer.ppo_epoch

        def ppo_epoch(self, *args, **kwargs):
            epochs.append(self.state.global_step + 1)  # the round this epoch belongs to
            if epochs.count(kill_round) == 2:
                kill()
            return original(self, *args, **kwargs)

        IIFPPOTrainer.ppo_epoch = ppo_epoch
    else:
        from rlhf_influence.trainer.group import GroupIIFTrainer

        original = GroupIIFTrainer.training_step

        def training_step(self, *args, **kwargs):
            output = original(self, *args, **kwargs)
            if self._rounds == kill_round:  # one step of the round done, its others not
                kill()
            return output

        GroupIIFTrainer.training_step = training_step
    sys.exit(load_recipe(algorithm).main(argv))


if __name__ == "__main__":
    main()
