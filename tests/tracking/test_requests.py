"""How many calls a run makes to the tracking store: against a basic-auth server every one costs a password hash.

Counted on a real sqlite store through MlflowClient's own methods (every REST request of an http store is one of
them), so the count holds for the team server too (benchmarks/tracking.py measures that one).
"""

from __future__ import annotations

import collections
import time

import pytest
from medxfer import tracking as T
from medxfer.tracking import spool as sp
from medxfer.tracking import tracker as tracker_mod

COUNTED = ("get_run", "log_batch", "get_experiment_by_name", "set_experiment_tag", "create_run")


@pytest.fixture
def calls(monkeypatch) -> collections.Counter:
    """Every call of the counted MlflowClient methods, from any client and thread (MLflow's monitor makes its own)."""
    from mlflow.tracking import MlflowClient

    seen: collections.Counter = collections.Counter()
    for name in COUNTED:
        orig = getattr(MlflowClient, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            seen[_name] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(MlflowClient, name, counted)
    return seen


def test_system_metrics_ride_on_the_runs_own_batches(tmp_path, monkeypatch, calls) -> None:
    """MLflow's monitor made a get_run and a log_batch per sample; queued, the samples go with the epoch's batch."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MEDXFER_SYSTEM_METRICS", "1")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tr = T.Tracker(uri, "demo", T.PHIGuard())
    run_id = tr.start("demo-tiny", {T.TAG_ROLE: "main"})
    time.sleep(0.6)  # ~10 samples
    tr.log_epoch(1, {"train/loss": 1.0})
    time.sleep(0.3)
    tr.end("finished")

    assert calls["get_run"] == 0  # no status poll per sample
    assert calls["log_batch"] == 2  # the epoch's metrics, the final status tag: each with the samples queued so far
    hist = MlflowClient(uri).get_metric_history(run_id, "system/cpu_utilization_percentage")
    steps = sorted(m.step for m in hist)
    assert len(steps) >= 5 and steps == list(range(len(steps)))  # every sample, MLflow's step count
    assert tr._monitor is None and not tr._system


def test_a_long_epoch_still_sends_its_samples(tmp_path, monkeypatch) -> None:
    """No batch for a while (a long 3D epoch): the monitor sends what waited SYSTEM_METRICS_MAX_DELAY_S itself."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MEDXFER_SYSTEM_METRICS", "1")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")
    monkeypatch.setattr(tracker_mod, "SYSTEM_METRICS_MAX_DELAY_S", 0.2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tr = T.Tracker(uri, "demo", T.PHIGuard())
    run_id = tr.start("demo-tiny", {})
    deadline = time.monotonic() + 10
    while not MlflowClient(uri).get_metric_history(run_id, "system/cpu_utilization_percentage"):
        assert time.monotonic() < deadline, "no system metrics reached the store while the run logged nothing"
        time.sleep(0.1)
    tr.end("finished")


def test_start_of_run_makes_one_lookup_and_batches_the_description_with_the_params(tmp_path, calls) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for run in range(2):
        calls.clear()
        tr = T.Tracker(uri, "demo", T.PHIGuard(), system_metrics=False)
        run_id = tr.start("demo-tiny", {T.TAG_ROLE: "main"})
        tr.describe_experiment("**demo**: binary classification")
        with tr.batched():
            tr.describe("run note")
            tr.log_params({f"p{i}": i for i in range(130)})
        tr.end("finished")
        assert calls["get_experiment_by_name"] == 1  # start() and the description share one lookup
        assert calls["set_experiment_tag"] == (1 if run == 0 else 0)  # unchanged description: not sent again
        assert calls["log_batch"] == 3  # 130 params + the note in 2 calls (100 params a call), then the status
    got = MlflowClient(uri).get_run(run_id)
    assert len(got.data.params) == 130 and got.data.tags[T.TAG_NOTE] == "run note"
    assert MlflowClient(uri).get_experiment_by_name("demo").tags[T.TAG_NOTE].startswith("**demo**")


def test_batch_calls_keep_mlflows_limits() -> None:
    calls = sp.batch_calls(list(range(2500)), list(range(130)), list(range(3)))
    assert [tuple(map(len, c)) for c in calls] == [(897, 100, 3), (970, 30, 0), (633, 0, 0)]
    assert all(len(m) + len(p) + len(t) <= sp.MAX_ENTITIES_PER_CALL for m, p, t in calls)
    assert sp.batch_calls([], [], []) == []
