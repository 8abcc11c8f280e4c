"""On PYTHONPATH in a stop-signal test: every Python process it starts loads this. In training processes (`avse train`,
torchrun's workers), once optimiser step $AVSE_TEST_MARK_STEP is done, the first process writes $AVSE_TEST_MARKER and every
later step takes half a second longer, so that the test can send its signal from outside while training is mid-epoch."""

import importlib.abc
import importlib.util
import os
import sys
import time

MARK_STEP = int(os.environ.get("AVSE_TEST_MARK_STEP", "0"))


class _SlowStepsAfterTheMark(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "avse.training.loop":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            module.optimizer_step = _slowed(module.optimizer_step)

        spec.loader.exec_module = exec_module
        return spec


def _slowed(optimizer_step):
    steps = 0

    def step(*args, **kwargs):
        nonlocal steps
        verdict = optimizer_step(*args, **kwargs)
        steps += 1
        if steps == MARK_STEP and os.environ.get("RANK", "0") == "0":
            with open(os.environ["AVSE_TEST_MARKER"], "w") as marker:
                marker.write(str(steps))
        if steps >= MARK_STEP:
            time.sleep(0.5)
        return verdict

    return step


if MARK_STEP:
    sys.meta_path.insert(0, _SlowStepsAfterTheMark())
