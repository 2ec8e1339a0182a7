"""The fit calls its callbacks in a fixed order; extra callbacks run after the built-in ones."""

from __future__ import annotations

import pytest
from helpers import make_dicom2d_dataset
from medxfer import tracking
from medxfer.core.workspace import Workspace
from medxfer.training import checkpoint as C
from medxfer.training.callbacks import Callback, default_callbacks
from medxfer.training.stage import train

OVERRIDES = [
    "epochs=2",
    "stages=[{epoch: 0, groups: 0}, {epoch: 1, groups: all}]",
    "data.size=[32, 32]",
    "data.batch_size=8",
    "weights=none",
    "data.cache=memory",
]


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.checkpointed: list[int] = []

    def on_fit_start(self, fit) -> None:
        self.calls.append("fit_start")

    def on_epoch_start(self, fit, epoch) -> None:
        self.calls.append(f"epoch_start {epoch}")

    def on_step_end(self, fit, loss_sum, seen) -> None:
        if self.calls[-1] != "step":  # one entry per run of steps
            self.calls.append("step")

    def on_validation_start(self, fit) -> None:
        self.calls.append("validation_start")

    def on_epoch_end(self, fit, end) -> None:
        self.calls.append(f"epoch_end {end.epoch}")
        # the built-in callbacks ran first: this epoch is already in last.pt
        self.checkpointed.append(C.load(fit.run_dir / C.LAST)["epoch"])
        assert fit.history[-1] is end.row and end.row["epoch"] == end.epoch

    def on_fit_end(self, fit) -> None:
        self.calls.append("fit_end")

    def on_exception(self, fit, exc) -> None:
        self.calls.append(f"exception {type(exc).__name__}")


@pytest.fixture
def prepared(tmp_path):
    from medxfer.ingest.ingest import ingest
    from medxfer.ingest.split import split

    ds = make_dicom2d_dataset(tmp_path / "d", n_studies=16, plant_phi=False)
    ingest(ds.spec, ds.workspace)
    split(ds.spec, ds.workspace)
    return ds


def test_a_recording_callback_sees_every_hook_in_order(prepared) -> None:
    rec = Recorder()
    res = train(prepared.spec, prepared.workspace, overrides=OVERRIDES, track=False, callbacks=[rec])
    per_epoch = ["epoch_start {e}", "step", "validation_start", "epoch_end {e}"]
    assert rec.calls == ["fit_start", *[c.format(e=e) for e in (0, 1) for c in per_epoch], "fit_end"]
    assert rec.checkpointed == [0, 1] and len(res.main.history) == 2


def test_an_error_in_the_loop_reaches_on_exception_and_no_fit_end(prepared) -> None:
    class Boom(Recorder):
        def on_epoch_end(self, fit, end) -> None:
            super().on_epoch_end(fit, end)
            raise RuntimeError("boom")

    rec = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        train(prepared.spec, prepared.workspace, overrides=OVERRIDES, track=False, callbacks=[rec])
    assert rec.calls[-2:] == ["epoch_end 0", "exception RuntimeError"] and "fit_end" not in rec.calls


def test_built_in_callbacks_log_before_they_checkpoint(tmp_path) -> None:
    """Epoch metrics reach MLflow before the epoch's checkpoint is written: no checkpoint without its metrics."""
    ws = Workspace.for_spec(tmp_path, "x")
    names = [type(cb).__name__ for cb in default_callbacks(ws, tracking.Tracker("", "x", tracking.PHIGuard(), False))]
    assert names == ["ProgressBar", "Tracking", "Checkpoint", "EpochSummary"]


def test_the_epoch_line_fits_80_columns_and_keeps_every_number() -> None:
    from medxfer.training.callbacks import epoch_line

    row = {"epoch": 2, "stage": 0, "train_loss": 0.12834, "val_loss": 0.186, "val_auroc": 0.7831}
    row |= {"val_balanced_accuracy": 0.6882, "epoch_seconds": 12.61, "samples_per_s": 44.2}
    assert epoch_line(row, 16, True) == "epoch 3/16 s0 loss 0.1283/0.1860 auroc 0.783 bacc 0.688 12.6s 44/s *"
    worst = row | {"epoch": 99, "stage": 12, "train_loss": 12.5, "val_loss": 13.5, "epoch_seconds": 9999.9}
    assert len(epoch_line(worst | {"samples_per_s": 99999.0}, 100, True)) <= 80
