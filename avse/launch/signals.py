"""Stop signals: a scheduler's notice becomes a checkpoint at the next step boundary.

Schedulers stop jobs with SIGTERM (Slurm at preemption and near its time limit, Kubernetes), and
torchrun forwards it to its workers and kills them 30 s later (pytorch/pytorch#61602); `dvc queue
kill` and Ctrl-C send SIGINT; a Slurm job can ask for SIGUSR1 ahead of its time limit
(`--signal`). The first of them asks training to stop at the next optimiser step: every process
stops at the same one (the request travels with the step's own all-reduce), `last.pt` is written
and the command exits with one line. A second signal ends the process at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence

from avse.errors import AvseError

log = logging.getLogger("avse.train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# Set by `avse train` in the environment of the torchrun it starts (`run_passing_stop_signals`).
LAUNCHED_BY_AVSE_TRAIN = "AVSE_LAUNCHED_BY_TRAIN"
# Ctrl-C reaches every process of the terminal's process group, and torchrun forwards the signal it got to its
# workers as well: a worker sees the one notice twice within moments. Only a signal later than this ends it at once.
SAME_NOTICE_SECONDS = 2.0


class StoppedBySignal(AvseError):
    """Training stopped at a step boundary because a stop signal arrived; rerunning resumes."""


class StopSignals:
    """While entered, the stop signals set `received` instead of ending the process (main thread only)."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._at = 0.0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self._at = signal.Signals(signum), now
            log.warning("%s: stopping at the next step boundary with a checkpoint (another signal stops at once)", self.received.name)
        elif now - self._at > SAME_NOTICE_SECONDS:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """For loader workers (`worker_init_fn`): the process that owns them stops them; without this, Ctrl-C (which
    reaches the whole process group) would end each with a KeyboardInterrupt traceback. SIGTERM keeps its default:
    it is how the owner ends its workers when it exits."""
    for signum in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def run_passing_stop_signals(command: Sequence[str]) -> tuple[int, signal.Signals | None]:
    """Run `command` (torchrun) in a session of its own and pass each stop signal this process gets on to its training
    processes; returns its exit status and the first signal passed on.

    In its own session, Ctrl-C reaches only this process, so the training processes see each notice once. torchrun
    itself is left out (on a signal it would end with a traceback of its own): its workers, told by
    `LAUNCHED_BY_AVSE_TRAIN` that this process reports, leave with status 0 once stopped, and torchrun ends quietly.
    """
    import psutil

    child = subprocess.Popen(list(command), start_new_session=True, env=os.environ | {LAUNCHED_BY_AVSE_TRAIN: "1"})
    passed: list[signal.Signals] = []

    def pass_on(signum: int, frame) -> None:
        passed.append(signal.Signals(signum))
        try:
            workers = psutil.Process(child.pid).children()
        except psutil.NoSuchProcess:
            return
        for process in workers or [child]:  # before torchrun has started its workers, torchrun itself
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signum)

    previous = {signum: signal.signal(signum, pass_on) for signum in STOP_SIGNALS}
    try:
        return child.wait(), (passed[0] if passed else None)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
