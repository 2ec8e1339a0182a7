"""The self-contained model bundle: what the MLflow pyfunc, ``predict`` and ``export`` all load.

Layout of a bundle folder (format ``medxfer-bundle/1``)::

    weights.safetensors   the model state dict (safetensors: no pickle); its SHA-256 is in preprocessing.json
    ood.safetensors       OOD statistics fitted on validation features (medxfer.stats.ood), when evaluated;
                          its SHA-256 and threshold are in preprocessing.json ``ood``
    preprocessing.json    everything needed to rebuild the model and preprocess exactly as in training
    evaluation.json       aggregate evaluation (metrics with CIs, calibration, threshold); no per-study data
    model_card.md         human-readable model card (medxfer.evaluation.modelcard)
    model_card.json       the same, machine-readable

``preprocessing.json``::

    format, medxfer_version, run_id,
    model {encoder, num_classes, in_chans, spatial_dims},      -> medxfer.models.factory.create_classifier(...)
          + ensemble_members K for a fold ensemble only       -> medxfer.models.ensemble.FoldEnsemble of K
    ensemble (fold ensembles only: {members, folds, member_run_ids, combine}; weights keys members.{i}.<key>)
    weights {file, sha256},
    task, classes, positive_class, positive_index,
    temperature, bias (added to logits / temperature), calibration_method, threshold (binary; null = argmax),
    threshold_policy, decision_rule,
    input {shape [C, *spatial] or null when native size, dtype, value_range},
    spec    (DataSpec fields: dims, source kind, labels key, series rules, preprocess; local paths
             replaced by "<local path>", no split section),
    recipe  (Recipe fields incl. data.size; a local pretrained-weights path replaced by its kind)
    ood     (null, or {file, sha256, method, threshold, percentile, n_fit, n_components, feature_dim}; a bundle
             without it, e.g. one written before OOD scores existed, predicts with empty ood columns)

It holds no PHI and no source paths: nothing in it comes from the manifest.

Usage (this is the API the pyfunc wrapper and ``medxfer predict`` build on)::

    from medxfer.handoff.bundle import Predictor, write_bundle
    write_bundle(ckpt_dict_or_path, evaluation_dict, "bundle/")          # -> Path("bundle/")
    p = Predictor.from_dir("bundle/", device="cpu")                        # verifies the weights' SHA-256
    df = p.predict(["study_folder/", "scan.nii.gz"], model_name="m", model_version="3")
    # df columns: input, prob_<class> for each class (calibrated), decision (class name),
    #             ood_score (float; NaN without OOD statistics), ood_flag (nullable bool: score > threshold),
    #             model_name, model_version, error (None or "REASON_CODE: message")
    x = p.preprocess("scan.nii.gz")   # torch.Tensor (C, *spatial), exactly the training eval transform
    p.logits(x[None])                  # raw logits (mirrored views averaged when the recipe's evaluation.tta)
    p.probabilities(p.logits(x[None])) # ... with the temperature applied

An input that cannot be read gets a row with ``error`` set and NaN probabilities; a bad input
never raises for the whole batch. A study whose preprocessed tensor or whose logits are not finite gets
``error`` = ``nonfinite_pixels: ...``, NaN probabilities and no decision: NaN compares false with every
threshold, so without this check garbage would come out as a confident-looking negative.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from medxfer.core.errors import MedxferError
from medxfer.core.jsonio import dump_json, medxfer_version

BUNDLE_FORMAT = "medxfer-bundle/1"
WEIGHTS = "weights.safetensors"
PREPROCESSING = "preprocessing.json"
EVALUATION = "evaluation.json"
CARD_MD, CARD_JSON = "model_card.md", "model_card.json"
OOD = "ood.safetensors"
LOCAL = "<local path>"


class BundleError(MedxferError):
    pass


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_bundle(path: Path) -> bool:
    path = Path(path)
    return (path / PREPROCESSING).is_file() and (path / WEIGHTS).is_file()


def find_bundle(root: Path) -> Path | None:
    """The bundle folder at or below `root` (e.g. inside a downloaded MLflow model's artifacts)."""
    root = Path(root)
    if is_bundle(root):
        return root
    for cfg in sorted(root.rglob(PREPROCESSING)):
        if is_bundle(cfg.parent):
            return cfg.parent
    return None


# ---------------------------------------------------------------------------- writing


def _sanitised_spec(spec: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in spec.items() if k not in ("spec_path", "split")}
    if isinstance(out.get("source"), dict):
        out["source"]["root"] = LOCAL
    if isinstance(out.get("labels"), dict):
        out["labels"]["csv"] = LOCAL
    return out


def _sanitised_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    out = dict(recipe)
    w = out.get("weights")
    if w not in (None, "default", "none", "package", "hub"):
        out["weights"] = "file"  # the pretrained file was used for training only; inference loads the bundle
    return out


def _input_size(spec: dict[str, Any], recipe: dict[str, Any]) -> list[int] | None:
    return (recipe.get("data") or {}).get("size") or (spec.get("preprocess") or {}).get("size")


def preprocessing_config(ckpt: dict[str, Any], evaluation: dict[str, Any] | None) -> dict[str, Any]:
    spec = ckpt.get("spec") or {}
    recipe = ckpt.get("recipe") or {}
    args = ckpt.get("model_args") or {}
    classes = list(ckpt.get("classes") or spec.get("classes") or [])
    if not args or not classes:
        raise BundleError("checkpoint lacks model_args or classes; it was not written by medxfer train")
    ev = evaluation or {}
    task = spec.get("task") or ("binary" if len(classes) == 2 else "multiclass")
    pos = spec.get("positive_class") if task == "binary" else None
    threshold = ev.get("threshold")
    if task == "binary" and threshold is None:
        threshold = 0.5  # not evaluated: an uncalibrated default, recorded as such in threshold_policy
    size = _input_size(spec, recipe)
    model = {
        "encoder": args["name"],
        "num_classes": int(args["num_classes"]),
        "in_chans": int(args["in_chans"]),
        "spatial_dims": int(args["spatial_dims"]),
    }
    ens = ckpt.get("ensemble")
    if ens:
        # Only for a fold ensemble: a single model's preprocessing.json keeps exactly its old keys (and bytes).
        model["ensemble_members"] = int(ens["members"])
    cfg = {
        "format": BUNDLE_FORMAT,
        "medxfer_version": medxfer_version(),
        "run_id": ckpt.get("run_id"),
        "model": model,
        "weights": {"file": WEIGHTS, "sha256": None},
        "task": task,
        "classes": classes,
        "positive_class": pos,
        "positive_index": classes.index(pos) if pos in classes else None,
        "temperature": float(ev.get("temperature", 1.0)),
        # Added to logits / temperature (calibration method temperature+bias); absent in older evaluations.
        "bias": [float(b) for b in (ev.get("bias") or [0.0] * len(classes))],
        "calibration_method": (ev.get("calibration") or {}).get("method", "temperature"),
        "threshold": threshold,
        "threshold_policy": ev.get("threshold_policy")
        or {"policy": "default 0.5 (not evaluated)" if task == "binary" else "argmax"},
        "decision_rule": (
            f"'{pos}' when prob_{pos} >= threshold, else the other class"
            if task == "binary"
            else "argmax of the class probabilities"
        ),
        "input": {
            "shape": [int(args["in_chans"]), *size] if size else None,
            "dtype": "float32",
            "value_range": "intensity scaled to about [0, 1]; the model normalises internally",
        },
        "spec": _sanitised_spec(spec),
        "recipe": _sanitised_recipe(recipe),
    }
    if ens:
        cfg["ensemble"] = {
            "members": int(ens["members"]),
            "folds": [int(f) for f in ens.get("folds") or []],
            "member_run_ids": [str(r) for r in ens.get("member_run_ids") or []],
            "combine": "mean of the members' logits, then temperature, bias and threshold as for one model",
        }
    return cfg


def save_safetensors(state: dict[str, Any], path: Path, metadata: dict[str, str]) -> None:
    """safetensors with a canonical header (:func:`medxfer.core.jsonio.canonical_safetensors`), so the same
    weights always give the same file SHA-256."""
    from medxfer.core.jsonio import canonical_safetensors
    from medxfer.core.workspace import atomic_path
    from safetensors.torch import save

    with atomic_path(path) as tmp:
        tmp.write_bytes(canonical_safetensors(save(state, metadata=metadata)))


def write_bundle(
    ckpt: dict[str, Any] | Path | str,
    evaluation: dict[str, Any] | None,
    out_dir: Path | str,
    run_info: dict[str, Any] | None = None,
    ood_stats: Any = None,
) -> Path:
    """Write a bundle folder from a training checkpoint (dict or path) and its evaluation.json dict.

    ``run_info`` feeds the model card (see medxfer.evaluation.modelcard); by default it is derived from the
    checkpoint. ``ood_stats``: the evaluation's ``ood.safetensors`` (a path) or a fitted
    ``medxfer.stats.ood.OODStats``; None writes a bundle without OOD scores. Existing bundle files in `out_dir`
    are replaced.
    """
    import torch
    from medxfer.evaluation.modelcard import build_model_card, run_info_from_checkpoint

    if not isinstance(ckpt, dict):
        from medxfer.training.checkpoint import load

        ckpt = load(Path(ckpt))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = preprocessing_config(ckpt, evaluation)
    # Clone: safetensors refuses tensors that share storage, and a state dict may hold views.
    state = {
        k: v.detach().to("cpu").contiguous().clone() for k, v in ckpt["model"].items() if isinstance(v, torch.Tensor)
    }
    save_safetensors(
        state, out / WEIGHTS, {"format": "pt", "encoder": cfg["model"]["encoder"], "medxfer": BUNDLE_FORMAT}
    )
    cfg["weights"]["sha256"] = sha256_file(out / WEIGHTS)
    cfg["ood"] = _write_ood(ood_stats, out)
    dump_json(cfg, out / PREPROCESSING)
    if evaluation:
        dump_json(evaluation, out / EVALUATION)
    md, card = build_model_card(run_info or run_info_from_checkpoint(ckpt), evaluation or {})
    (out / CARD_MD).write_text(md)
    dump_json(card, out / CARD_JSON)
    return out


def _write_ood(ood_stats: Any, out: Path) -> dict[str, Any] | None:
    """``ood.safetensors`` with the canonical header (same statistics, same SHA-256), and its preprocessing.json
    entry; None (and no file) without statistics."""
    import torch

    if ood_stats is None:
        (out / OOD).unlink(missing_ok=True)
        return None
    if not hasattr(ood_stats, "to_arrays"):
        from medxfer.evaluation.shift import read_ood_stats

        ood_stats = read_ood_stats(Path(ood_stats))
    arrays = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ood_stats.to_arrays().items()}
    save_safetensors(arrays, out / OOD, ood_stats.metadata())
    return {
        "file": OOD,
        "sha256": sha256_file(out / OOD),
        "method": ood_stats.method,
        "threshold": float(ood_stats.threshold),
        "percentile": float(ood_stats.percentile),
        "n_fit": int(ood_stats.n_fit),
        "n_components": ood_stats.n_components,
        "feature_dim": ood_stats.feature_dim,
        "flag_rule": "ood_flag when ood_score > threshold (fitted on validation features; medxfer.stats.ood)",
    }


def load_ood(bundle_dir: Path, cfg: dict[str, Any], verify: bool = True) -> Any:
    """The bundle's OOD statistics, or None for a bundle without them; a listed file that is missing or altered
    refuses, as the weights do."""
    entry = cfg.get("ood")
    if not entry:
        return None
    from medxfer.evaluation.shift import read_ood_stats

    path = Path(bundle_dir) / entry.get("file", OOD)
    if not path.is_file():
        raise BundleError(f"bundle {Path(bundle_dir).name}: {path.name} (OOD statistics) missing; re-export it")
    if verify and entry.get("sha256") and sha256_file(path) != entry["sha256"]:
        raise BundleError(
            f"bundle {Path(bundle_dir).name}: {path.name} does not match the SHA-256 in {PREPROCESSING}; "
            "the file was changed or truncated"
        )
    try:
        return read_ood_stats(path)
    except Exception as exc:
        raise BundleError(f"bundle {Path(bundle_dir).name}: {path.name} cannot be read ({type(exc).__name__})") from exc


# ---------------------------------------------------------------------------- loading and predicting


def load_config(bundle_dir: Path) -> dict[str, Any]:
    path = Path(bundle_dir) / PREPROCESSING
    if not path.is_file():
        raise BundleError(f"{Path(bundle_dir).name}: not a medxfer bundle ({PREPROCESSING} missing)")
    cfg = json.loads(path.read_text())
    if cfg.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{PREPROCESSING}: unsupported bundle format {cfg.get('format')!r} (this medxfer reads {BUNDLE_FORMAT})"
        )
    return cfg


def build_model(cfg: dict[str, Any]):
    """The architecture from preprocessing.json, randomly initialised (weights come from the safetensors): one
    classifier, or a FoldEnsemble of ``model.ensemble_members`` of them (keys ``members.{i}.<key>``)."""
    from medxfer.models.ensemble import one_or_ensemble
    from medxfer.models.factory import create_classifier

    m = cfg["model"]
    return one_or_ensemble(
        lambda: create_classifier(
            m["encoder"],
            num_classes=m["num_classes"],
            in_chans=m["in_chans"],
            spatial_dims=m["spatial_dims"],
            weights=None,
        ),
        m.get("ensemble_members"),
    )


def _medxfer_cause(exc: BaseException) -> MedxferError | None:
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, MedxferError):
            return e
        e = e.__cause__
    return None


class Predictor:
    """A loaded bundle: preprocessing, model, temperature and threshold together."""

    def __init__(self, model: Any, config: dict[str, Any], device: str = "cpu", ood: Any = None):
        self.model = model
        self.config = config
        self.device = device
        self.ood = ood  # medxfer.stats.ood.OODStats or None (no ood_score/ood_flag values)
        self._spec = None
        self._recipe = None
        self._inference_model: Any = None

    @classmethod
    def from_dir(cls, bundle_dir: Path | str, device: str = "cpu", verify: bool = True) -> Predictor:
        from safetensors.torch import load_file

        bundle_dir = Path(bundle_dir)
        cfg = load_config(bundle_dir)
        wpath = bundle_dir / cfg["weights"]["file"]
        if not wpath.is_file():
            raise BundleError(f"bundle {bundle_dir.name}: {cfg['weights']['file']} missing")
        if verify and cfg["weights"].get("sha256") and sha256_file(wpath) != cfg["weights"]["sha256"]:
            raise BundleError(
                f"bundle {bundle_dir.name}: {WEIGHTS} does not match the SHA-256 in {PREPROCESSING}; "
                "the file was changed or truncated"
            )
        model = build_model(cfg)
        model.load_state_dict(load_file(str(wpath), device="cpu"), strict=True)
        model.to(device).eval()
        return cls(model, cfg, device, ood=load_ood(bundle_dir, cfg, verify))

    @property
    def inference_model(self) -> Any:
        """``model`` with the test-time mirroring the bundle was evaluated with (recipe ``evaluation.tta``)."""
        if self._inference_model is None:
            from medxfer.data.transforms import inference_model

            self._inference_model = inference_model(self.model, self.spec, self.recipe)
        return self._inference_model

    # -- facts
    @property
    def classes(self) -> list[str]:
        return list(self.config["classes"])

    @property
    def temperature(self) -> float:
        return float(self.config["temperature"])

    @property
    def threshold(self) -> float | None:
        return self.config.get("threshold")

    @property
    def positive_index(self) -> int | None:
        return self.config.get("positive_index")

    @property
    def spec(self):
        if self._spec is None:
            from medxfer.config.spec import DataSpec

            self._spec = DataSpec.model_validate(self.config["spec"])
        return self._spec

    @property
    def recipe(self):
        if self._recipe is None:
            from medxfer.config.recipe import recipe_from_dict

            self._recipe = recipe_from_dict(self.config["recipe"])
        return self._recipe

    # -- steps
    def resolve(self, paths: Sequence[str | Path]) -> list[Any]:
        """Studies found in the inputs, the way ingest finds them (medxfer.ingest.ingest.resolve_inputs)."""
        from medxfer.ingest.ingest import resolve_inputs

        return resolve_inputs([Path(p) for p in paths], self.spec)

    def load(self, files: list[str], source_kind: str):
        from medxfer.data.transforms import load_inference_tensor

        return load_inference_tensor(files, source_kind, self.spec, self.recipe)

    def preprocess(self, path: str | Path):
        """The model input (C, *spatial) for one study (a DICOM series folder or file, or a NIfTI file)."""
        items = self.resolve([path])
        ok = [it for it in items if it.reason_code is None]
        if len(ok) != 1:
            bad = next((it for it in items if it.reason_code), None)
            why = f"{bad.reason_code}: {bad.message}" if bad and not ok else f"{len(ok)} studies found"
            raise BundleError(f"preprocess needs exactly one readable study ({why}); use predict() for folders")
        return self.load(ok[0].files, ok[0].source_kind)

    def logits(self, batch) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.inference_model(batch.to(self.device, dtype=torch.float32)).float().cpu().numpy()

    def logits_and_features(self, batch) -> tuple[np.ndarray, np.ndarray | None]:
        """(raw logits as `logits`, the penultimate features OOD scores use, averaged over the same views)."""
        import torch
        from medxfer.models.classifier import logits_and_features

        with torch.inference_mode():
            z, f = logits_and_features(self.inference_model, batch.to(self.device, dtype=torch.float32))
        return z.float().cpu().numpy(), None if f is None else f.float().cpu().numpy()

    def ood_scores(self, features: np.ndarray | None) -> np.ndarray | None:
        """OOD score per row, or None without statistics (a bundle written before them) or features."""
        if self.ood is None or features is None:
            return None
        return self.ood.score(features)

    @property
    def bias(self) -> np.ndarray | None:
        b = self.config.get("bias")
        return None if b is None else np.asarray(b, dtype=np.float64)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        from medxfer.stats.calibration import calibrated_softmax

        return calibrated_softmax(np.asarray(logits, dtype=np.float64), self.temperature, self.bias)

    def decide(self, prob: np.ndarray) -> list[str]:
        classes = self.classes
        pos, thr = self.positive_index, self.threshold
        if pos is None or thr is None or len(classes) != 2:
            return [classes[i] for i in prob.argmax(axis=1)]
        other = classes[1 - pos]
        return [classes[pos] if p >= thr else other for p in prob[:, pos]]

    def predict(
        self,
        paths: Sequence[str | Path],
        model_name: str | None = None,
        model_version: str | None = None,
        batch_size: int = 8,
        progress: bool = False,
    ):
        """One row per study found (or per unusable input); see the module docstring for the columns."""
        import pandas as pd
        import torch
        from medxfer.core import ui

        rows: list[dict[str, Any]] = []
        pending: list[tuple[int, Any]] = []  # (row index, tensor) waiting for a forward pass

        def flush() -> None:
            if not pending:
                return
            # Studies resized to the recipe size stack; native-size inputs may not, so group by shape.
            by_shape: dict[tuple[int, ...], list[tuple[int, Any]]] = {}
            for i, x in pending:
                by_shape.setdefault(tuple(x.shape), []).append((i, x))
            for group in by_shape.values():
                logits, feats = self.logits_and_features(torch.stack([x for _, x in group]))
                prob = self.probabilities(logits)
                finite = np.isfinite(logits).all(axis=1) & np.isfinite(prob).all(axis=1)
                scores = self.ood_scores(feats)
                for j, ((i, _), p, d, ok) in enumerate(zip(group, prob, self.decide(prob), finite, strict=True)):
                    if not ok:
                        rows[i]["error"] = "nonfinite_pixels: the model output (logits) is NaN/Inf for this input"
                        continue
                    rows[i].update({f"prob_{c}": float(v) for c, v in zip(self.classes, p, strict=True)})
                    rows[i].update(decision=d, error=None)
                    if scores is not None:
                        rows[i].update(ood_score=float(scores[j]), ood_flag=bool(scores[j] > self.ood.threshold))
            pending.clear()

        items = self.resolve(paths)
        for it in ui.progress(items, total=len(items), description="predict", enabled=progress):
            row = {
                "input": it.input,
                **{f"prob_{c}": math.nan for c in self.classes},
                "decision": None,
                "ood_score": math.nan,
                "ood_flag": None,
                "model_name": model_name,
                "model_version": None if model_version is None else str(model_version),
                "error": None,
            }
            rows.append(row)
            if it.reason_code is not None:
                row["error"] = f"{it.reason_code}: {it.message}"
                continue
            try:
                x = self.load(it.files, it.source_kind)
            except Exception as exc:
                known = _medxfer_cause(exc)  # MONAI wraps reader errors in RuntimeError("applying transform")
                if known is not None:  # PHI-free by contract: the message can be shown
                    row["error"] = f"{getattr(known, 'code', None) or 'unreadable'}: {known}"
                else:  # library errors may quote file paths: report the type only
                    row["error"] = f"unreadable: could not load the study ({type(exc).__name__})"
                continue
            if not bool(torch.isfinite(x).all()):
                bad = int((~torch.isfinite(x)).sum())
                row["error"] = f"nonfinite_pixels: {bad} NaN/Inf value(s) in the preprocessed input"
                continue
            pending.append((len(rows) - 1, x))
            if len(pending) >= batch_size:
                flush()
        flush()
        columns = [
            "input",
            *[f"prob_{c}" for c in self.classes],
            "decision",
            "ood_score",
            "ood_flag",
            "model_name",
            "model_version",
            "error",
        ]
        df = pd.DataFrame(rows, columns=columns)
        # Nullable: an empty cell (no statistics, or no prediction), never a False that claims "in distribution".
        df["ood_flag"] = df["ood_flag"].astype("boolean")
        df["ood_score"] = df["ood_score"].astype("float64")
        return df
