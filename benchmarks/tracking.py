"""Benchmark 5: MLflow tracking overhead, training wall time with tracking on vs off. Target <= 2%.

"On" is ``pipeline.train.train`` as shipped: sqlite store in the workspace, params, per-epoch
metrics, artifacts (recipe, curves, best checkpoint), system metrics. ``pipeline.train`` has no
switch to turn tracking off, so "off" replaces ``pipeline.tracking.Tracker`` in the benchmark's own
process with a no-op that hands out a run id and logs nothing (train.py itself is unchanged).
Arms alternate on/off in fresh processes and fresh workspaces; medians count.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks import common, fixtures

TITLE = "Tracking overhead: training wall time with MLflow on vs off"
NAME = "tracking"
TARGET = 1.02

# (demo studies per split, epochs, repeats of each arm) per size
_PLAN = {"tiny": (24, 1, 1), "quick": (120, 3, 2), "full": (None, 3, 3)}


def _no_tracking() -> None:
    import uuid

    from pipeline import tracking

    class NoTracker(tracking.Tracker):
        """Logs nothing; only hands out a run id (the run folder is named after it)."""

        def __init__(self, tracking_uri: str, experiment: str, guard: Any, enabled: bool = True,
                     system_metrics: bool = True):
            self.uri, self.experiment, self.guard = tracking_uri, experiment, guard
            self.enabled, self.system_metrics, self.run_id, self._monitor, self._client = False, False, None, None, None

        def start(self, run_name: str, tags: Any, parent_run_id: str | None = None) -> str:
            self.run_id = uuid.uuid4().hex
            return self.run_id

    tracking.Tracker = NoTracker  # pipeline.train looks it up as tracking.Tracker at call time


def arm(kind: str, limit: int | None, epochs: int, tracked: bool, tag: str) -> dict[str, Any]:
    from pipeline.spec import load_spec
    from pipeline.train import train

    if not tracked:
        _no_tracking()
    spec, ws_root = fixtures.prepare(kind, limit)
    run_ws = fixtures.fresh_workspace(spec, ws_root, f"tracking-{tag}")
    t0 = time.perf_counter()
    res = train(load_spec(spec.spec_path), run_ws, overrides=[f"epochs={epochs}"], device="cpu")
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "train_wall_s": res.main.wall_s, "epochs": epochs,
            "epoch_s": [h["epoch_seconds"] for h in res.main.history]}


def run(size: str = "full") -> dict[str, Any]:
    result = common.new_result(NAME, TITLE, size)
    common.require("pipeline.train", "the training stage (pipeline.train)")
    limit, epochs, repeats = _PLAN[size]
    t0 = time.perf_counter()
    fixtures.prepare("breast", limit)
    walls: dict[bool, list[float]] = {True: [], False: []}
    details = []
    for r in range(repeats):
        for tracked in ((True, False) if r % 2 == 0 else (False, True)):
            # Always isolated: the "off" arm replaces a module attribute for the rest of its process.
            m = common.run_isolated("benchmarks.tracking:arm", kind="breast", limit=limit, epochs=epochs,
                                    tracked=tracked, tag=f"{r}-{int(tracked)}")
            walls[tracked].append(m["wall_s"])
            details.append({"tracked": tracked, **m})
    on, off = common.median(walls[True]), common.median(walls[False])
    ctx = {"set": "2D BreastMNIST DICOM", "epochs": epochs, "repeats": repeats}
    result["rows"] = [{**ctx, "arm": "tracking off (no-op tracker)", "median_wall_s": off, "ratio": 1.0},
                      {**ctx, "arm": "MLflow on (sqlite, as shipped)", "median_wall_s": on, "ratio": on / off}]
    result["ratios"]["tracked / untracked wall time"] = common.ratio_entry(on / off, TARGET, higher_is_better=False)
    result["details"] = details
    result["notes"].append("pipeline.train has no tracking-off switch; the off arm swaps pipeline.tracking.Tracker "
                           "for a no-op inside the benchmark process (train.py unchanged)")
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


if __name__ == "__main__":
    import sys

    r = run(sys.argv[1] if len(sys.argv) > 1 else "quick")
    common.write_result(r)
    common.print_result(r)
