"""The fold ensemble as one tracked run: what ``run --auto`` registers after its arm race.

``create_ensemble_run`` takes the winner's fold runs (one trained per cross-validation fold), builds ONE checkpoint
(:func:`medxfer.training.checkpoint.ensemble_checkpoint`: a :class:`medxfer.models.ensemble.FoldEnsemble` that
averages the members' logits) and opens a new MLflow run in the spec's experiment that evaluate, register,
predict and export treat as any trained run. The run holds:

- ``checkpoints/best.pt`` (and ``<workspace>/<spec>/runs/<run_id>/best.pt``): the ensemble checkpoint;
- ``oof/oof_predictions.csv``: the out-of-fold logits (``study_key``, ``fold``, ``logit_0..``), from which evaluate
  fits calibration and threshold (:mod:`medxfer.evaluation.evaluate`);
- ``auto/race.json``: the race that chose the arm (what the model card renders);
- tags as a training run's (``medxfer.role=main``, ``medxfer.encoder``, ``medxfer.spec``) plus
  ``medxfer.ensemble=K``, ``medxfer.auto=1``, ``medxfer.ensemble_folds`` and ``medxfer.member_run_ids``.

Every string passes the training run's PHI guard; the OOF table holds pseudonymous study keys and numbers only.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from medxfer import tracking
from medxfer.config.spec import DataSpec
from medxfer.core import ui
from medxfer.core.errors import DataError, MedxferError, StageError
from medxfer.core.workspace import Workspace
from medxfer.training import checkpoint as ckpt_io

OOF_FILE = "oof/oof_predictions.csv"
RACE_FILE = "auto/race.json"
TAG_ENSEMBLE, TAG_AUTO = "medxfer.ensemble", "medxfer.auto"


def check_oof(oof: Any, n_classes: int, folds: list[int] | None = None, what: str = "the out-of-fold table") -> Any:
    """The OOF table with its columns in order (study_key as str, fold as int, logit_0..); refused (DataError,
    naming `what`) when it cannot be one, or when `folds` is given and it has a fold no member was validated on."""
    cols = ["study_key", "fold", *[f"logit_{i}" for i in range(n_classes)]]
    missing = [c for c in cols if c not in oof.columns]
    if missing:
        raise DataError(
            f"{what} lacks {', '.join(missing)}; it needs study_key, fold and "
            f"logit_0..logit_{n_classes - 1} (raw logits), one row per non-test study"
        )
    out = oof[cols].copy()
    out["study_key"] = out["study_key"].astype(str)
    dup = int(out["study_key"].duplicated().sum())
    if dup:
        raise DataError(f"{what} repeats {dup} study_key(s); it needs one row per non-test study")
    fold = out["fold"].to_numpy(dtype=np.float64)
    if not (np.isfinite(fold) & (fold == np.round(fold))).all():
        raise DataError(f"{what} has a fold that is not a whole number; it needs each study's k-fold number")
    out["fold"] = fold.astype(int)
    if not np.isfinite(out[cols[2:]].to_numpy(dtype=np.float64)).all():
        raise DataError(f"{what} has non-finite logits; the fold model that wrote them diverged")
    extra = sorted(set(out["fold"].tolist()) - set(folds)) if folds is not None else []
    if extra:
        raise DataError(f"{what} has fold(s) {extra} that no member was validated on ({folds})")
    return out


def create_ensemble_run(
    spec: DataSpec,
    workspace: Path,
    member_run_ids: list[str],
    oof: Any,
    race: dict,
    parent_run_id: str | None = None,
) -> str:
    """Register the fold models `member_run_ids` as one tracked run (the fold ensemble); returns its run id.

    `oof`: pandas DataFrame with ``study_key``, ``fold`` (int), ``logit_0`` .. ``logit_{C-1}``: raw logits of the fold
    model that did NOT train on the study, one row per non-test study. `race`: the arm race dict (stored as is).
    `parent_run_id`: the ``run --auto`` run to nest under, if any.
    """
    from medxfer.core.jsonio import dump_json, json_safe
    from medxfer.ingest import manifest

    if not member_run_ids:
        raise MedxferError("a fold ensemble needs at least one fold run")
    ws = Workspace.for_spec(workspace, spec.name)
    with tempfile.TemporaryDirectory(prefix="medxfer-ensemble-") as tmp_s:
        members = [ckpt_io.load(ckpt_io.best_path(ws, rid, Path(tmp_s))) for rid in member_run_ids]
    folds = [m.get("fold") for m in members]
    if any(f is None for f in folds):
        bad = [rid for rid, f in zip(member_run_ids, folds, strict=True) if f is None]
        raise MedxferError(
            f"run(s) {', '.join(bad)} were not trained on a k-fold split (no fold); a fold ensemble needs one run "
            "per fold of `split: {folds: k}`"
        )
    ckpt = ckpt_io.ensemble_checkpoint(members, [int(f) for f in folds], list(member_run_ids))
    del members
    oof = check_oof(oof, len(spec.classes), ckpt["ensemble"]["folds"])
    k = int(ckpt["ensemble"]["members"])

    tables = manifest.join(ws, select_fold=False)
    guard = tracking.PHIGuard.for_training(spec, tables.manifest["files"], pseudonym_map=ws.pseudonym_map)
    tracker = tracking.Tracker(
        ws.tracking_uri, spec.name, guard, system_metrics=False, spool=tracking.Spool.for_workspace(ws.root)
    )
    encoder = ckpt["model_args"]["name"]
    tags = {
        tracking.TAG_ROLE: "main",
        "medxfer.encoder": encoder,
        TAG_ENSEMBLE: str(k),
        TAG_AUTO: "1",
        "medxfer.ensemble_folds": ",".join(str(f) for f in ckpt["ensemble"]["folds"]),
        "medxfer.member_run_ids": ",".join(ckpt["ensemble"]["member_run_ids"]),
    }
    run_id = tracker.start(
        f"{spec.name}-{encoder}-ensemble{k}", tags, parent_run_id=parent_run_id, entry_point="medxfer run --auto"
    )
    if run_id is None:
        raise StageError("the tracking store gave no run id for the fold ensemble; check the MLflow server")
    status = "failed"
    try:
        ckpt["run_id"] = run_id
        run_dir = ws.run_dir(run_id)
        ckpt_io.atomic_save(ckpt, run_dir / ckpt_io.BEST)
        tracker.describe(
            f"Fold ensemble of {k} `{encoder}` models (folds {ckpt['ensemble']['folds']}), chosen by "
            f"`medxfer run --auto`: the mean of the members' logits. Calibration and threshold come from the "
            f"out-of-fold predictions of {len(oof)} non-test studies ({OOF_FILE})."
        )
        tracker.log_params(
            {"ensemble.members": str(k), "ensemble.folds": tags["medxfer.ensemble_folds"], "encoder": encoder}
        )
        safe = ckpt_io.for_tracking(ckpt)
        guard.check_tree("checkpoint", {key: v for key, v in safe.items() if key != "model"})
        with tempfile.TemporaryDirectory(prefix="medxfer-ensemble-") as tmp_s:
            ckpt_io.atomic_save(safe, Path(tmp_s) / ckpt_io.BEST)
            tracker.log_file(Path(tmp_s) / ckpt_io.BEST, "checkpoints")
        oof_path = run_dir / OOF_FILE
        oof_path.parent.mkdir(parents=True, exist_ok=True)
        oof.to_csv(oof_path, index=False)
        tracker.log_file(oof_path, str(Path(OOF_FILE).parent), text=True)
        guard.check_tree("race", json_safe(race))  # exactly what dump_json writes; checked before it is written
        race_path = dump_json(race, run_dir / RACE_FILE)
        tracker.log_file(race_path, str(Path(RACE_FILE).parent), text=True)
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        tracker.end(status)
    ui.info(f"fold ensemble of {k} models (folds {ckpt['ensemble']['folds']}) tracked as run {run_id}")
    return run_id
