"""Run under torchrun by test_training: process $2 never reaches the barrier that the other waits at."""

import sys
import time
from datetime import timedelta

from avse.cli import run_guarded
from avse.training.distributed import barrier, init_distributed

ctx = init_distributed(timedelta(seconds=float(sys.argv[1])))
if ctx.rank == int(sys.argv[2]):
    time.sleep(30)  # hangs as far as the other process can tell; killed with the job
    sys.exit(0)
sys.exit(run_guarded(lambda: barrier(ctx, "while the first evaluated the dev split and wrote checkpoints")))
