"""Train, and SIGKILL this process right after epoch N's checkpoint: the kill point of the kill-and-resume tests.

    python tests/training/kill_train.py N SPEC WORKSPACE [OVERRIDE ...]

Runs under ``torchrun`` too: rank 0 kills itself once it has logged and saved epoch N (the other ranks are then
blocked in the next epoch's first collective, and torchrun ends them), so the checkpoint is always whole.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from medxfer.config.spec import load_spec
from medxfer.training.callbacks import Callback, EpochEnd
from medxfer.training.stage import train


class KillAfter(Callback):
    """Runs after the built-in callbacks, so epoch N is logged and checkpointed before the kill."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_epoch_end(self, fit, end: EpochEnd) -> None:
        if end.epoch + 1 == self.epochs and fit.d.main:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    n, spec, workspace, *overrides = sys.argv[1:]
    train(load_spec(Path(spec)), Path(workspace), overrides=overrides, callbacks=[KillAfter(int(n))])
    sys.exit(f"kill_train: the run ended before epoch {n}")
