"""Run under torchrun by test_reliability: the train command, with rank 1 dying after optimiser step
$AVSE_TEST_CRASH_AT_STEP of the first attempt (torchrun's TORCHELASTIC_RESTART_COUNT is 0)."""

import os
import sys

from avse import cli
from avse.training import loop

CRASH_AT_STEP = int(os.environ["AVSE_TEST_CRASH_AT_STEP"])
DOOMED = os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"


def dying_after(optimizer_step):
    steps = 0

    def step(*args, **kwargs):
        nonlocal steps
        applied = optimizer_step(*args, **kwargs)
        steps += 1
        if DOOMED and steps == CRASH_AT_STEP:
            os._exit(1)  # as a crash: no cleanup, no goodbye to the other rank
        return applied

    return step


loop.optimizer_step = dying_after(loop.optimizer_step)
sys.exit(cli.main(["train"]))
