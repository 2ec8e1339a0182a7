"""Train, and SIGKILL this process right after epoch N's checkpoint: the kill point of the kill-and-resume tests.

    python tests/training/kill_train.py N SPEC WORKSPACE [OVERRIDE ...]

Runs under ``torchrun`` too: rank 0 kills itself once it has logged and saved epoch N (the other ranks are then
blocked in the next epoch's first collective, and torchrun ends them), so the checkpoint is always whole.

Environment hooks for the elastic-restart tests (``torchrun --max-restarts``, tests/training/test_multinode.py):

- ``KILL_TRAIN_RANK=R``: rank R kills itself instead of rank 0;
- ``KILL_TRAIN_STEP=S``: it dies mid-epoch, after S optimiser steps of epoch N, instead of at its end;
- ``KILL_TRAIN_ONCE=FILE``: only the first worker to get there dies (it creates FILE first); the group torchrun
  restarts trains on (a restart may hand rank R to the other node), and a run that then ends exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from medxfer.config.spec import load_spec
from medxfer.training.callbacks import Callback, EpochEnd
from medxfer.training.stage import train


class KillAfter(Callback):
    """Runs after the built-in callbacks, so epoch N is logged and checkpointed before the kill."""

    def __init__(self, epochs: int, rank: int = 0, step: int | None = None, once: Path | None = None):
        self.epochs, self.rank, self.step, self.once = epochs, rank, step, once
        self.epoch, self.steps = -1, 0

    def _die(self, fit) -> None:
        if fit.d.rank != self.rank:
            return
        if self.once is not None:
            try:
                self.once.open("x").close()  # exclusive create: exactly one worker of the job ever dies
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)

    def on_epoch_start(self, fit, epoch: int) -> None:
        self.epoch, self.steps = epoch, 0

    def on_step_end(self, fit, loss_sum, seen: int) -> None:
        self.steps += 1
        if self.step is not None and self.epoch + 1 == self.epochs and self.steps == self.step:
            self._die(fit)

    def on_epoch_end(self, fit, end: EpochEnd) -> None:
        if self.step is None and end.epoch + 1 == self.epochs:
            self._die(fit)


if __name__ == "__main__":
    n, spec, workspace, *overrides = sys.argv[1:]
    step = os.environ.get("KILL_TRAIN_STEP")
    once = Path(os.environ["KILL_TRAIN_ONCE"]) if os.environ.get("KILL_TRAIN_ONCE") else None
    kill = KillAfter(int(n), int(os.environ.get("KILL_TRAIN_RANK", "0")), int(step) if step else None, once)
    res = train(load_spec(Path(spec)), Path(workspace), overrides=overrides, callbacks=[kill])
    if once is not None and once.exists():  # killed once, restarted by torchrun, finished
        if res.rank == 0:
            print(json.dumps(res.summary()))  # what `medxfer train --json` prints
        sys.exit(0)
    sys.exit(f"kill_train: the run ended before epoch {n}")
