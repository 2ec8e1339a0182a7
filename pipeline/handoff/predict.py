"""``medxfer predict MODEL_URI INPUT... --out preds.csv [--saliency DIR]``.

The model comes from a registered version (``models:/NAME@alias``, ``models:/NAME/VERSION``), a
training run (``runs:/RUN_ID``: bundled on the fly from its best checkpoint and evaluation), or a
folder holding a bundle (what ``medxfer export`` writes). Every route ends in the same
:class:`medxfer.handoff.bundle.Predictor`, so the preprocessing is the training one.

Inputs are study folders (searched the way ingest searches: same series selection and checks),
DICOM or NIfTI files, or CSVs with a ``path`` column. A NIfTI file given to a DICOM-trained model
(or a DICOM series to a NIfTI-trained one) is read with the same preprocessing; the format is a
container, not a property of the model. Each input that yields no usable study gets a row with a
reason code in ``error``; the batch never fails for one bad input.

``--saliency DIR`` writes a Grad-CAM map (``monai.visualize.GradCAM`` on the model's
``cam_target_layer``; for a fold ensemble the mean of its members' maps) per predicted study, for the positive
class (binary) or the predicted class (multiclass), mapped back through the preprocessing onto the source image
grid: a PNG overlay for 2D, a NIfTI with the source affine for 3D. Files are named by row number
(``0001.png``), never by anything derived from the input.

Output rows carry no input string by default (paths name patients at many sites, and a predictions file is
shared): ``row`` is the row number (1-based, the saliency file's number) and ``input_key`` a pseudonym of the
input string, ``in-`` + HMAC-SHA256 under the workspace's pseudonym key when the workspace has one
(``MEDXFER_PSEUDONYM_KEY`` or an existing key file; none is created), else under a random key made once per
process, so keys then match within one process only. ``echo_input=True`` (``--echo-input``) adds ``input``,
the caller's own strings. ``error`` gives a reason code and a message that never quotes file content.
"""

from __future__ import annotations

import functools
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from medxfer.core.errors import MedxferError, StageError
from medxfer.handoff.bundle import Predictor

# --------------------------------------------------------------------------- any-format predictor


class FlexiblePredictor(Predictor):
    """A Predictor that reads DICOM and NIfTI inputs whatever format the model was trained from."""

    def resolve(self, paths: Sequence[str | Path]) -> list[Any]:
        from medxfer.ingest.ingest import InputItem, resolve_inputs

        spec = self.spec
        own = spec.source.kind
        other_kind = "nifti" if own == "dicom" else "dicom"
        other = spec.model_copy(update={"source": spec.source.model_copy(update={"kind": other_kind})})
        # The code each format reports for "this is not my format" (ingest's reason codes).
        not_format = {"dicom": {"not_dicom"}, "nifti": {"not_nifti"}}
        names = {"dicom": "DICOM", "nifti": "NIfTI"}
        items: list[Any] = []
        for p in paths:
            if not str(p).strip():
                items.append(InputItem(str(p), own, None, "not_found", "empty path"))
                continue
            found = resolve_inputs([Path(p)], spec)
            for it in found:
                if it.reason_code in not_format[own]:
                    retry = resolve_inputs([Path(it.input)], other)
                    # Read as the other format it is usable, or unusable for a reason of its own (a NIfTI file
                    # with NaN voxels): either way that, not "not DICOM", is what the row must say.
                    # A file named as NIfTI (scan.nii.gz) is NIfTI's to refuse: its "not_nifti" or "truncated" is
                    # the real reason then, not "not DICOM" (the adversarial corpus's cut and fake .nii.gz files).
                    named = other_kind == "nifti" and str(it.input).lower().endswith((".nii", ".nii.gz"))
                    real = [r for r in retry if named or r.reason_code not in not_format[other_kind]]
                    if real:
                        for r in real:
                            if r.reason_code is not None:
                                r.message = (
                                    f"a {names[other_kind]} file (the model was trained on {names[own]}): {r.message}"
                                )
                        items.extend(real)
                        continue
                items.append(it)
        return items


def load_predictor(bundle_dir: Path | str, device: str | None = None) -> FlexiblePredictor:
    import torch

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = Predictor.from_dir(bundle_dir, device=dev)
    return FlexiblePredictor(base.model, base.config, base.device, ood=base.ood)


# --------------------------------------------------------------------------- model URI -> bundle


@dataclass
class ModelSource:
    uri: str
    kind: str  # registered | run | folder
    bundle: Path
    name: str | None
    version: str | None


def resolve_model(model_uri: str, workspace: Path, tmp: Path) -> ModelSource:
    """Find (download or build) the bundle behind a model URI into `tmp`."""
    from medxfer import tracking
    from medxfer.core.workspace import Workspace
    from medxfer.handoff.bundle import find_bundle

    uri = Workspace.for_spec(workspace, "_").tracking_uri
    if model_uri.startswith("models:/"):
        mv = tracking.resolve_model_version(uri, model_uri)
        local = tracking.download_registered_model(uri, model_uri, tmp / "model")
        bundle = find_bundle(local)
        if bundle is None:
            raise StageError(f"{model_uri} is not a medxfer model (no bundle in its files)")
        return ModelSource(model_uri, "registered", bundle, mv["name"], mv["version"])
    if model_uri.startswith("runs:/"):
        from medxfer.handoff.registry import load_run, write_run_bundle

        run_id = model_uri.removeprefix("runs:/").strip("/").split("/")[0]
        ra = load_run(run_id, workspace, tmp, require_evaluation=False)
        if ra.evaluation is None:
            from medxfer.core import ui

            ui.warn(f"run {run_id[:12]} is not evaluated: probabilities are uncalibrated and the threshold is 0.5")
        return ModelSource(model_uri, "run", write_run_bundle(ra, tmp / "bundle"), f"run-{run_id[:12]}", None)
    path = Path(model_uri)
    if path.is_dir():
        bundle = find_bundle(path)
        if bundle is None:
            raise MedxferError(
                f"{path.name}: no medxfer bundle (preprocessing.json + weights.safetensors) in this "
                "folder; pass an exported folder, models:/NAME@alias or runs:/RUN_ID"
            )
        return ModelSource(model_uri, "folder", bundle, *_folder_identity(bundle))
    raise MedxferError(
        f"model {model_uri!r}: expected models:/NAME@alias, models:/NAME/VERSION, runs:/RUN_ID or an exported folder"
    )


def _folder_identity(bundle: Path) -> tuple[str | None, str | None]:
    """Model name/version recorded in an exported bundle's model card, when there is one."""
    import json

    from medxfer.handoff.bundle import CARD_JSON

    for f in (bundle / CARD_JSON, bundle.parent / CARD_JSON):
        if f.is_file():
            try:
                d = json.loads(f.read_text()).get("model_details") or {}
            except ValueError:
                continue
            name, version = d.get("name"), d.get("version")
            return (str(name) if name else None), (str(version) if version is not None else None)
    return None, None


# --------------------------------------------------------------------------- saliency


def _target_class(predictor: Predictor, row: dict[str, Any]) -> int:
    """Binary: the positive class, whatever the decision ("what pushed towards malignant"); a map for the
    negative class mostly shows the absence of evidence. Multiclass: the predicted class."""
    if predictor.positive_index is not None:
        return int(predictor.positive_index)
    classes = predictor.classes
    return classes.index(row["decision"]) if row.get("decision") in classes else 0


def saliency_map(
    predictor: Predictor, files: list[str], source_kind: str, class_idx: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grad-CAM for one study on the source grid: (cam in [0, 1], source image, source 4x4 affine).

    The preprocessing is run with MONAI's metadata tracking and the CAM (computed at the model's input
    size) is pushed back through the inverse of the spatial steps (fit, spacing, RAS reorientation).
    """
    import torch
    from medxfer.data.transforms import deterministic_transforms
    from monai.data import MetaTensor
    from monai.transforms import Compose
    from monai.visualize import GradCAM

    det = deterministic_transforms(predictor.spec, predictor.recipe)
    spatial = Compose(list(det.transforms)[:-1])  # everything but the MetaTensor -> plain tensor step
    data = spatial({"files": list(files), "source_kind": source_kind})
    img = data["image"]
    x = img.as_tensor()[None].to(predictor.device, dtype=torch.float32).requires_grad_(True)
    # A fold ensemble's map is the mean of its members' maps (each normalised to [0, 1] by GradCAM): the ensemble
    # logit's gradient at member i's feature map is member i's own gradient / K, so each member's CAM is what the
    # ensemble's CAM at that layer would be, at one forward pass per member instead of K.
    members = list(getattr(predictor.model, "members", None) or [predictor.model])
    with torch.enable_grad():
        cams = [GradCAM(nn_module=m, target_layers=m.cam_target_layer)(x, class_idx=class_idx) for m in members]
    cam = cams[0] if len(cams) == 1 else torch.stack(cams).mean(0)
    cam_t = MetaTensor(cam[0].detach().cpu().float(), meta=dict(img.meta))  # meta carries the affine
    cam_t.applied_operations = list(img.applied_operations)
    back = spatial.inverse({"image": cam_t})["image"]
    src, affine = _read_source(files, source_kind)
    cam_src = np.asarray(back.detach().cpu().numpy()[0] if hasattr(back, "detach") else back[0], dtype=np.float32)
    if cam_src.shape != src.shape:  # the inverse is exact for resize/crop/pad/spacing; guard the odd case
        cam_src = _resize(cam_src, src.shape)
    return np.clip(np.nan_to_num(cam_src), 0.0, 1.0), src, affine


def _read_source(files: list[str], source_kind: str) -> tuple[np.ndarray, np.ndarray]:
    from medxfer.data.transforms import read_study

    arr, affine = read_study(files, source_kind)
    return np.asarray(arr, dtype=np.float32), np.asarray(affine, dtype=np.float64)


def _resize(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    mode = "bilinear" if a.ndim == 2 else "trilinear"
    t = torch.from_numpy(np.ascontiguousarray(a))[None, None]
    return F.interpolate(t, size=tuple(shape), mode=mode, align_corners=False)[0, 0].numpy()


def write_saliency(out_dir: Path, index: int, predictor: Predictor, item: Any, row: dict[str, Any]) -> str:
    """One Grad-CAM file for a predicted row; returns its file name (relative to `out_dir`)."""
    from medxfer.io import nifti
    from medxfer.stats import plots

    classes = predictor.classes
    k = _target_class(predictor, row)
    cam, src, affine = saliency_map(predictor, item.files, item.source_kind, k)
    p = row.get(f"prob_{classes[k]}")
    title = f"#{index:04d}  Grad-CAM for '{classes[k]}'" + (
        f"  (p={p:.3f}; decision: {row.get('decision')})" if p is not None and not math.isnan(p) else ""
    )
    if src.ndim == 2:
        name = f"{index:04d}.png"
        plots.overlay_plot(src, cam, out_dir / name, title)
    else:
        name = f"{index:04d}.nii.gz"
        nifti.write_volume(out_dir / name, cam.astype(np.float32), affine=affine)
    return name


# --------------------------------------------------------------------------- the stage


@dataclass
class PredictResult:
    model_uri: str
    model_name: str | None
    model_version: str | None
    out: Path
    n_rows: int
    n_errors: int
    decisions: dict[str, int]
    errors: dict[str, int]
    saliency_dir: Path | None = None
    n_saliency: int = 0
    saliency_failed: int = 0
    threshold: float | None = None
    ood_flagged: int | None = None  # rows whose ood_score is above the bundle's threshold; None: no OOD statistics
    ood_threshold: float | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "model_uri": self.model_uri,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "out": str(self.out),
            "n_rows": self.n_rows,
            "n_predicted": self.n_rows - self.n_errors,
            "n_errors": self.n_errors,
            "ood_flagged": self.ood_flagged,
            "ood_threshold": self.ood_threshold,
            "decisions": self.decisions,
            "errors_by_reason": self.errors,
            "threshold": self.threshold,
            "saliency_dir": str(self.saliency_dir) if self.saliency_dir else None,
            "n_saliency": self.n_saliency,
            "saliency_failed": self.saliency_failed,
        }

    def table(self) -> tuple[str, list[tuple[str, str]]]:
        who = self.model_name or self.model_uri
        rows = [
            ("model", f"{who}" + (f" v{self.model_version}" if self.model_version else "")),
            ("studies", f"{self.n_rows - self.n_errors} predicted, {self.n_errors} unusable"),
        ]
        if self.decisions:
            rows.append(("decisions", ", ".join(f"{k} {v}" for k, v in self.decisions.items())))
        if self.threshold is not None:
            rows.append(("threshold", f"{self.threshold:.4f}"))
        if self.errors:
            rows.append(("unusable", ", ".join(f"{k} {v}" for k, v in self.errors.items())))
        if self.saliency_dir is not None:
            rows.append(
                (
                    "saliency",
                    f"{self.n_saliency} map(s) in {self.saliency_dir}"
                    + (f", {self.saliency_failed} failed" if self.saliency_failed else ""),
                )
            )
        if self.ood_flagged is not None:
            rows.append(("OOD flagged", f"{self.ood_flagged} (ood_score > {self.ood_threshold:.2f}, from validation)"))
        rows.append(("written", str(self.out)))
        return "predict", rows


def predict(
    model_uri: str,
    inputs: list[Path],
    out: Path,
    saliency: Path | None = None,
    workspace: Path = Path("medxfer-work"),
    device: str | None = None,
    echo_input: bool = False,
) -> PredictResult:
    from medxfer.core import ui

    if not inputs:
        raise MedxferError("no inputs: give study folders, DICOM/NIfTI files, or a CSV with a 'path' column")
    with tempfile.TemporaryDirectory(prefix="medxfer-predict-") as tmp:
        src = resolve_model(model_uri, workspace, Path(tmp))
        predictor = load_predictor(src.bundle, device=device)
        items = predictor.resolve([str(p) for p in inputs])
        ui.info(
            f"predicting {len(items)} stud{'y' if len(items) == 1 else 'ies'} with {src.name or model_uri}"
            + (f" v{src.version}" if src.version else "")
        )
        # Predictor.predict resolves again; hand it the resolved inputs so both passes see the same studies.
        df = _predict_items(predictor, items, src)
        if saliency is not None:
            saliency.mkdir(parents=True, exist_ok=True)
            names, failed = [], 0
            for i, (item, row) in enumerate(
                ui.progress(
                    list(zip(items, df.to_dict("records"), strict=True)), total=len(items), description="saliency"
                ),
                start=1,
            ):
                if isinstance(row.get("error"), str) or not item.files:
                    names.append(None)
                    continue
                try:
                    names.append(write_saliency(saliency, i, predictor, item, row))
                except Exception as exc:  # a map is a bonus: report, keep the predictions
                    failed += 1
                    names.append(None)
                    ui.warn(f"row {i}: no saliency map ({type(exc).__name__})")
            df["saliency"] = names
        out.parent.mkdir(parents=True, exist_ok=True)
        df = shareable_output(df, input_pseudonymizer(workspace), echo_input)
        df.to_csv(out, index=False)
    errs = df["error"].dropna()
    codes: dict[str, int] = {}
    for e in errs:
        code = str(e).split(":", 1)[0]
        codes[code] = codes.get(code, 0) + 1
    decisions = {str(k): int(v) for k, v in df["decision"].dropna().value_counts().items()}
    n_sal = int(df["saliency"].notna().sum()) if "saliency" in df else 0
    return PredictResult(
        model_uri,
        src.name,
        src.version,
        out,
        len(df),
        int(len(errs)),
        decisions,
        codes,
        saliency,
        n_sal,
        (failed if saliency is not None else 0),
        predictor.threshold,
        None if predictor.ood is None else int(df["ood_flag"].fillna(False).astype(bool).sum()),
        None if predictor.ood is None else float(predictor.ood.threshold),
    )


class _Resolved(FlexiblePredictor):
    """Feeds already-resolved items to Predictor.predict (which otherwise resolves its `paths`)."""

    def __init__(self, base: Predictor, items: list[Any]):
        super().__init__(base.model, base.config, base.device, ood=base.ood)
        self._items = items

    def resolve(self, paths: Sequence[str | Path]) -> list[Any]:
        return self._items


def _predict_items(predictor: Predictor, items: list[Any], src: ModelSource):
    return _Resolved(predictor, items).predict(
        [it.input for it in items], model_name=src.name, model_version=src.version, progress=True
    )


# --------------------------------------------------------------------------- output columns


def input_pseudonymizer(workspace: Path | None = None) -> Any:
    """The key for ``input_key``: the workspace's (environment or existing key file), else a per-process one."""
    import os

    from medxfer.core.workspace import Workspace
    from medxfer.io.phi import KEY_ENV, Pseudonymizer, existing_key

    key = None
    if workspace is not None:
        key = existing_key(Workspace.for_spec(workspace, "_").key_file)
    elif os.environ.get(KEY_ENV):
        key = os.environ[KEY_ENV].encode()
    if key is None:
        return _process_pseudonymizer()
    return Pseudonymizer(key, remember=False)


@functools.cache
def _process_pseudonymizer() -> Any:
    """One random key per process: input keys match across calls of one process, never across processes."""
    from medxfer.io.phi import Pseudonymizer

    return Pseudonymizer.ephemeral()


def shareable_output(df: Any, pseudo: Any, echo_input: bool = False) -> Any:
    """Predictions as they leave medxfer: ``row`` and ``input_key`` first, ``input`` only when echoed."""
    out = df.copy()
    keys = [pseudo.input_key(str(v)) for v in out["input"]]
    inputs = out.pop("input")
    out.insert(0, "row", list(range(1, len(out) + 1)))
    out.insert(1, "input_key", keys)
    if echo_input:
        out.insert(2, "input", inputs)
    return out
