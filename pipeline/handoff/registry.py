"""``medxfer register RUN_ID --name NAME`` and ``medxfer promote NAME VERSION --alias ALIAS``.

Registration turns an evaluated training run into an MLflow pyfunc model version:

- the model is logged as *code* (``pipeline/handoff/pyfunc_model.py``, MLflow "models from code"); its
  artifacts are the medxfer bundle (:mod:`medxfer.handoff.bundle`: weights as safetensors with their
  SHA-256, ``preprocessing.json`` with classes, temperature, threshold and the training
  preprocessing, ``evaluation.json``, the model card). Loading it runs our code on those files and
  never unpickles an object;
- input: a DataFrame with a ``path`` column (DICOM series folder, DICOM file or NIfTI file); output:
  one row per study with calibrated ``prob_<class>``, ``decision``, ``model_name``,
  ``model_version`` and ``error`` (unreadable inputs get an error row, never a failed batch);
- the version is reserved before the files are written, so the model knows its own version and the
  model card names it;
- version tags: test metrics with CIs, threshold and temperature, spec/labelled-content/split hashes, git
  commit, pretrained-weight source, the recipe's promotion floors; alias ``candidate``;
- the model card is also attached to the training run (``model_card/``).

Everything sent to MLflow passes the run's PHI guard (see :mod:`medxfer.tracking.guard`).

The registration guard (:func:`registration_warnings`): a version whose validation AUROC 95% CI includes 0.5, whose
temperature fit ended on a bound, or whose test decisions all fall in one class is registered *without* the
``candidate`` alias, with a ``medxfer.warning`` tag that says why. ``--force`` sets the alias anyway and records the
override (tag ``medxfer.forced``). A registered version stays reviewable either way.

Promotion sets any alias but first checks the recipe's promotion floors (recorded on the version
at registration) against the version's test metrics, and refuses with the reason when one fails.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medxfer import tracking
from medxfer.config.spec import modality_label
from medxfer.core import ui
from medxfer.core.errors import MedxferError, StageError
from medxfer.core.workspace import Workspace
from medxfer.stats.calibration import at_bound

CANDIDATE = "candidate"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
# The model example MLflow stores with the model: a made-up relative path, never a real study.
INPUT_EXAMPLE_PATH = "study_0001/"
METRIC_TAGS = ("auroc", "auprc", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "ece", "brier")
# Promotion floor (recipe.promotion key) -> the version tag it is compared with.
FLOORS = {"min_auroc_ci_low": ("test_auroc_ci_low", "test AUROC 95% CI lower bound")}
FLOOR_TAG = "floor."
_NAME_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


class PromotionRefused(StageError):
    """A promotion floor is not met; the message lists each failed check."""


def _check_name(name: str) -> str:
    if not _NAME_OK.fullmatch(name or ""):
        raise MedxferError(f"model name {name!r}: use letters, digits, '-', '_' or '.' (it becomes a models:/ URI)")
    return name


def _uri(workspace: Path) -> str:
    # The store is shared by every spec in a workspace; the name part does not matter here.
    return Workspace.for_spec(workspace, "_").tracking_uri


# --------------------------------------------------------------------------- the run -> a bundle


@dataclass
class RunArtifacts:
    """What registration and ``predict runs:/...`` need from a finished training run."""

    run: dict[str, Any]
    ws: Workspace
    ckpt: dict[str, Any]
    evaluation: dict[str, Any] | None
    ood_stats: Path | None = None  # the evaluation's ood.safetensors (medxfer.evaluation.shift), when fitted


def load_run(run_id: str, workspace: Path, tmp: Path, require_evaluation: bool = True) -> RunArtifacts:
    """The run's facts, best checkpoint and evaluation: local workspace copies first, else MLflow artifacts."""
    from medxfer.training.checkpoint import load

    uri = _uri(workspace)
    run = tracking.get_run(uri, run_id)
    ws = Workspace.for_spec(workspace, run["tags"].get(tracking.TAG_SPEC) or run["experiment"])
    ckpt_path = ws.run_dir(run_id) / "best.pt"
    if not ckpt_path.is_file():
        ckpt_path = tracking.download_run_artifact(uri, run_id, "checkpoints/best.pt", tmp / "ckpt")
        if ckpt_path is None:
            raise StageError(
                f"run {run_id}: no best checkpoint (neither in the workspace nor as the run's "
                "checkpoints/best.pt artifact); did training finish?"
            )
    evaluation = None
    ev_path = ws.run_dir(run_id) / "evaluation.json"
    if not ev_path.is_file():
        ev_path = tracking.download_run_artifact(uri, run_id, "evaluation/evaluation.json", tmp / "ev")
    if ev_path is not None and ev_path.is_file():
        evaluation = json.loads(ev_path.read_text())
    if require_evaluation and (evaluation is None or run["tags"].get("medxfer.evaluated") != "true"):
        raise StageError(
            f"run {run_id} has not been evaluated: registration needs its test metrics, calibration "
            f"and threshold. Run `medxfer evaluate {run_id}` first"
        )
    return RunArtifacts(run, ws, load(ckpt_path), evaluation, _ood_file(uri, run_id, ws, evaluation, tmp))


def _ood_file(uri: str, run_id: str, ws: Workspace, evaluation: dict[str, Any] | None, tmp: Path) -> Path | None:
    """The OOD statistics the evaluation fitted (local run folder, else the run's artifact), checked against the
    SHA-256 evaluation.json recorded; None when it fitted none."""
    import hashlib

    entry = (evaluation or {}).get("ood") or {}
    if not entry.get("file"):
        return None
    path: Path | None = ws.run_dir(run_id) / "evaluation" / entry["file"]
    if not path.is_file():
        path = tracking.download_run_artifact(uri, run_id, f"evaluation/{entry['file']}", tmp / "ood")
    if path is None or not path.is_file():
        ui.warn(f"run {run_id[:12]}: its OOD statistics are missing; the model will leave ood_score empty")
        return None
    if entry.get("sha256") and hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
        ui.warn(f"run {run_id[:12]}: {entry['file']} does not match evaluation.json; re-run `medxfer evaluate`")
        return None
    return path


def _ingest_facts(ws: Workspace) -> dict[str, Any] | None:
    if not ws.ingest_report.is_file():
        return None
    r = json.loads(ws.ingest_report.read_text())
    return {
        "n_studies": r.get("n_studies"),
        "n_rejected": r.get("n_rejects"),
        "reject_reasons": r.get("rejects_by_reason"),
        "modalities": r.get("modalities"),
    }


def card_run_info(ra: RunArtifacts, model_name: str | None = None, model_version: str | None = None) -> dict[str, Any]:
    """The model card's run metadata (medxfer.evaluation.modelcard), PHI-free: pseudonymous facts only."""
    from medxfer.core.jsonio import medxfer_version
    from medxfer.evaluation.modelcard import run_info_from_checkpoint

    extra: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "medxfer_version": medxfer_version(),
        "ingest": _ingest_facts(ra.ws),
    }
    if ra.ws.split_report.is_file():
        extra["split_report"] = json.loads(ra.ws.split_report.read_text())
    info = run_info_from_checkpoint(ra.ckpt, tags=ra.run["tags"], extra=extra)
    info["git_commit"] = training_commit(ra)
    return info


def training_commit(ra: RunArtifacts) -> str | None:
    """The commit the model was *trained* at (train logs it as a param); registration time is the fallback."""
    return (
        ra.run["params"].get("git.commit")
        or ra.run["tags"].get("medxfer.git_commit")
        or ra.run["tags"].get("mlflow.source.git.commit")
        or tracking.git_commit()
    )


def write_run_bundle(
    ra: RunArtifacts, out: Path, model_name: str | None = None, model_version: str | None = None
) -> Path:
    from medxfer.handoff.bundle import write_bundle

    return write_bundle(
        ra.ckpt, ra.evaluation, out, run_info=card_run_info(ra, model_name, model_version), ood_stats=ra.ood_stats
    )


def _guard(ra: RunArtifacts) -> tracking.PHIGuard:
    """The training run's guard: the spec's paths, source path parts and original identifiers."""
    from medxfer.config.spec import DataSpec
    from medxfer.ingest.manifest import read_manifest

    spec = DataSpec.model_validate({k: v for k, v in ra.ckpt["spec"].items() if k != "spec_path"})
    files = list(read_manifest(ra.ws.manifest, columns=["files"])["files"]) if ra.ws.manifest.is_file() else []
    return tracking.PHIGuard.for_training(spec, files, pseudonym_map=ra.ws.pseudonym_map)


# --------------------------------------------------------------------------- register


SIGNIFICANT = 4  # digits a version tag shows: 0.9350, not 0.934985 (the exact values are in evaluation.json)


def _fmt(v: Any, toward: str = "nearest") -> str:
    """A tag value; floats to 4 significant digits. CI bounds round outward (`toward` "down" for a lower bound,
    "up" for an upper one), so the rounded interval still contains the exact one and a promotion floor compared
    with a rounded lower bound (0.69996 -> 0.6999) never passes where the exact value fails."""
    if v is None:
        return ""
    if not isinstance(v, float) or not math.isfinite(v) or v == 0:
        return f"{v:.{SIGNIFICANT}g}" if isinstance(v, float) else str(v)
    q = 10.0 ** (math.floor(math.log10(abs(v))) - SIGNIFICANT + 1)
    scaled = round(v / q, 6)  # 1.0 / 0.001 is 1000.0000000000001: ceil must not make it 1.001
    n = {"down": math.floor, "up": math.ceil}.get(toward, round)(scaled)
    return f"{n * q:.{SIGNIFICANT}g}"


def version_tags(ra: RunArtifacts, bundle_cfg: dict[str, Any]) -> dict[str, str]:
    ev = ra.evaluation or {}
    tags: dict[str, str] = {
        "run_id": ra.run["run_id"],
        "spec": ra.ws.name,
        "encoder": bundle_cfg["model"]["encoder"],
        "task": bundle_cfg["task"],
        "classes": ",".join(bundle_cfg["classes"]),
        "medxfer_version": bundle_cfg.get("medxfer_version") or "",
        "weights_sha256": bundle_cfg["weights"]["sha256"],
    }
    for m in METRIC_TAGS:
        block = (ev.get("test") or {}).get(m) or {}
        for part, suffix, toward in (
            ("value", "", "nearest"),
            ("ci_low", "_ci_low", "down"),
            ("ci_high", "_ci_high", "up"),
        ):
            if block.get(part) is not None:
                tags[f"test_{m}{suffix}"] = _fmt(float(block[part]), toward)
    if ev.get("threshold") is not None:
        tags["threshold"] = _fmt(float(ev["threshold"]))
        tags["threshold_policy"] = str((ev.get("threshold_policy") or {}).get("policy", ""))
    tags["temperature"] = _fmt(float(bundle_cfg["temperature"]))
    tags["calibration_method"] = str(bundle_cfg.get("calibration_method", "temperature"))
    if (ev.get("transfer") or {}).get("negative_transfer") is not None:
        tags["negative_transfer"] = str(bool(ev["transfer"]["negative_transfer"])).lower()
    for k, v in (ra.ckpt.get("hashes") or {}).items():
        tags[f"{k}_hash"] = str(v)
    tags["git_commit"] = training_commit(ra) or "unknown"
    wr = ra.ckpt.get("weight_report") or {}
    tags["weight_source"] = str(wr.get("source") or "unknown")
    if wr.get("sha256"):
        tags["weight_source_sha256"] = str(wr["sha256"])
    for floor, value in ((ra.ckpt.get("recipe") or {}).get("promotion") or {}).items():
        if value is not None:
            tags[f"{FLOOR_TAG}{floor}"] = _fmt(float(value))
    return tags


def _description(ra: RunArtifacts, cfg: dict[str, Any]) -> str:
    ev = ra.evaluation or {}
    auroc = (ev.get("test") or {}).get("auroc") or {}
    text = f"{cfg['model']['encoder']} on '{ra.ws.name}' ({', '.join(cfg['classes'])})"
    if auroc.get("value") is not None:
        ci = (
            f" [{auroc['ci_low']:.3f}, {auroc['ci_high']:.3f}]"
            if auroc.get("ci_low") is not None and auroc.get("ci_high") is not None
            else ""
        )
        text += f"; test AUROC {auroc['value']:.3f}{ci}"
    if cfg.get("threshold") is not None:
        text += f"; threshold {cfg['threshold']:.3f} on calibrated P({cfg['positive_class']})"
    return text + ". Input: DataFrame with a 'path' column (DICOM folder/file or NIfTI)."


# The run's metrics the logged model carries, so its page shows what the registry's version tags say.
LOGGED_MODEL_METRICS = ("test/", "eval/", "transfer/", "best/")


def model_description(ra: RunArtifacts, bundle: Path) -> str:
    """The registered model's description: task, classes, modality and intended use (the model card's, which
    it takes from the spec); the same for every version, which has its own description with its numbers."""
    from medxfer.handoff.bundle import CARD_JSON

    spec = ra.ckpt.get("spec") or {}
    card = json.loads((bundle / CARD_JSON).read_text()) if (bundle / CARD_JSON).is_file() else {}
    use = card.get("intended_use") or {}
    classes = ", ".join(spec.get("classes") or [])
    positive = f" (positive: {spec['positive_class']})" if spec.get("positive_class") else ""
    lines = [
        f"{spec.get('task')} classifier of {spec.get('dims')}D {modality_label(spec)} images into {classes}{positive}, "
        f"trained on the '{ra.ws.name}' dataset by medxfer.",
        "",
        f"Intended use: {use.get('primary', 'research use only')}",
    ]
    if use.get("out_of_scope"):
        lines.append(f"Not for: {use['out_of_scope'][0]}")
    lines += [
        "",
        "Input: a DataFrame with a 'path' column (DICOM folder/file or NIfTI); see each version's model card.",
    ]
    return "\n".join(lines)


def model_tags(ra: RunArtifacts, cfg: dict[str, Any]) -> dict[str, str]:
    spec = ra.ckpt.get("spec") or {}
    return {
        "task": str(cfg["task"]),
        "classes": ",".join(cfg["classes"]),
        "modality": modality_label(spec),
        "dims": f"{spec.get('dims')}D",
        "spec": ra.ws.name,
        "framework": "medxfer (PyTorch), MLflow pyfunc",
    }


def logged_model_params(ra: RunArtifacts, cfg: dict[str, Any]) -> dict[str, str]:
    wr = ra.ckpt.get("weight_report") or {}
    return {
        "encoder": str(cfg["model"]["encoder"]),
        "weight_source": str(wr.get("source") or "unknown"),
        "spec": ra.ws.name,
        "classes": ",".join(cfg["classes"]),
    }


def signature_columns(classes: list[str]) -> tuple[list[tuple[str, str, bool]], list[tuple[str, str, bool]]]:
    """(inputs, outputs) as (column, MLflow type, required): what the pyfunc returns (``input`` only when echoed)."""
    inputs = [("path", "string", True)]
    outputs = [
        ("row", "long", True),
        ("input_key", "string", True),
        ("input", "string", False),
        *[(f"prob_{c}", "double", False) for c in classes],
        ("decision", "string", False),
        ("ood_score", "double", False),
        ("ood_flag", "boolean", False),
        ("model_name", "string", False),
        ("model_version", "string", False),
        ("error", "string", False),
    ]
    return inputs, outputs


def pip_requirements() -> list[str]:
    """Pinned so that `mlflow models serve` / a fresh env gets what the model was registered with.

    medxfer itself is not on PyPI: the loading environment needs it installed (`pip install -e .`).
    """
    reqs = []
    for name, version in tracking.package_versions().items():
        if name == "medxfer":
            continue
        reqs.append(f"{name}=={version}")
    return sorted(reqs + ["safetensors", "pandas"])


def _check_bundle_text(guard: tracking.PHIGuard, bundle: Path) -> None:
    """Defence in depth: the bundle's text files are PHI-free by construction; prove it before upload."""
    for f in sorted(bundle.iterdir()):
        if f.suffix in (".json", ".md"):
            guard.check(f"model artifact {f.name}", f.read_text(errors="replace"))


# --------------------------------------------------------------------------- the registration guard

WARNING_TAG = "medxfer.warning"
FORCED_TAG = "medxfer.forced"


def registration_warnings(evaluation: dict[str, Any]) -> list[str]:
    """Why a version must not get the ``candidate`` alias; empty when none of the guard's checks fires."""
    out: list[str] = []
    auroc = (evaluation.get("val") or {}).get("auroc") or {}
    value, lo, hi = auroc.get("value"), auroc.get("ci_low"), auroc.get("ci_high")
    if lo is not None and lo <= 0.5:
        out.append(
            f"validation AUROC {value:.3f} has a 95% CI [{lo:.3f}, {hi:.3f}] that includes 0.5: "
            "validation shows no evidence that the model beats chance"
        )
    elif lo is None and value is not None and value <= 0.5:
        out.append(f"validation AUROC {value:.3f} is no better than chance")
    t = evaluation.get("temperature")
    if t is not None and at_bound(float(t)):
        out.append(
            f"the calibration temperature ended on its bound (T = {float(t):.3g}): no interior optimum, "
            "so the probabilities are not calibrated"
        )
    cm = (evaluation.get("confusion_matrix") or {}).get("test")
    if cm:
        predicted = [sum(col) for col in zip(*cm, strict=True)]
        used = [i for i, n in enumerate(predicted) if n > 0]
        if len(used) == 1 and len(predicted) > 1:
            classes = evaluation.get("classes") or []
            name = classes[used[0]] if used[0] < len(classes) else str(used[0])
            out.append(f"every test study is predicted '{name}': the decisions collapse to one class")
    return out


@dataclass
class RegisterResult:
    run_id: str
    model_name: str
    model_version: str
    model_id: str
    alias: str | None  # None: the guard withheld `candidate` (see warnings)
    tracking_uri: str
    tags: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    forced: bool = False

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}/{self.model_version}"

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "model_uri": self.model_uri,
            "alias_uri": f"models:/{self.model_name}@{self.alias}" if self.alias else None,
            "alias": self.alias,
            "warnings": self.warnings,
            "forced": self.forced,
            "model_id": self.model_id,
            "tags": self.tags,
            "tracking_uri": self.tracking_uri,
        }

    def table(self) -> tuple[str, list[tuple[str, str]]]:
        t = self.tags
        auroc = t.get("test_auroc")
        alias = f"alias {self.alias}" + (", forced past the guard" if self.forced else "") if self.alias else "NO alias"
        rows = [("model", f"{self.model_uri}  ({alias})"), ("run", self.run_id)]
        rows += [("WARNING", w) for w in self.warnings]
        if auroc:
            rows.append(
                (
                    "test AUROC",
                    f"{float(auroc):.3f} [{float(t['test_auroc_ci_low']):.3f}, {float(t['test_auroc_ci_high']):.3f}]"
                    if "test_auroc_ci_low" in t and "test_auroc_ci_high" in t
                    else f"{float(auroc):.3f}",
                )
            )
        if "threshold" in t:
            rows.append(("threshold", f"{float(t['threshold']):.4f} ({t.get('threshold_policy', '')})"))
        rows += [
            ("weights", f"pretrained from: {t.get('weight_source')}; bundle sha256 {t['weights_sha256'][:12]}..."),
            ("load", f'mlflow.pyfunc.load_model("models:/{self.model_name}@{self.alias}")'),
            ("promote", f"medxfer promote {self.model_name} {self.model_version} --alias champion"),
        ]
        if not self.alias:
            rows[-2:] = [("load", f'mlflow.pyfunc.load_model("{self.model_uri}")  (review it first)')]
        return f"register: {self.model_name} v{self.model_version}", rows


def register(run_id: str, name: str, workspace: Path, force: bool = False) -> RegisterResult:
    """Register an evaluated run as a pyfunc model version with alias 'candidate', unless the guard
    (:func:`registration_warnings`) withholds it; ``force`` sets it anyway and records the override."""
    import pandas as pd
    from medxfer.handoff.bundle import CARD_JSON, CARD_MD, load_config

    _check_name(name)
    uri = _uri(workspace)
    run_id = tracking.sync_workspace(workspace, uri, run_id)  # what the run spooled reaches the server first
    with tempfile.TemporaryDirectory(prefix="medxfer-register-") as tmp_s:
        tmp = Path(tmp_s)
        ra = load_run(run_id, workspace, tmp)
        guard = _guard(ra)
        ui.info(f"registering run {run_id[:12]} as '{name}'")
        reserved = tracking.reserve_model_version(uri, run_id, ra.run["experiment_id"], name)
        version, model_id = reserved["version"], reserved["model_id"]
        try:
            bundle = write_run_bundle(ra, tmp / "bundle", model_name=name, model_version=version)
            _check_bundle_text(guard, bundle)
            cfg = load_config(bundle)
            inputs, outputs = signature_columns(cfg["classes"])
            tracking.log_pyfunc(
                uri,
                model_id,
                run_id,
                PYFUNC_CODE,
                {"bundle": bundle},
                # Every key a user may override at load time must be logged (MLflow ignores the others).
                {"model_name": name, "model_version": version, "echo_input": False, "device": None},
                inputs,
                outputs,
                pd.DataFrame({"path": [INPUT_EXAMPLE_PATH]}),
                pip_requirements(),
            )
            tags = version_tags(ra, cfg)
            warnings = registration_warnings(ra.evaluation or {})
            if warnings:
                tags[WARNING_TAG] = "; ".join(warnings)
                if force:
                    tags[FORCED_TAG] = f"true: candidate set with --force despite {len(warnings)} warning(s)"
            tracking.set_model_version_tags(uri, name, version, tags, guard)
            tracking.set_model_version_description(
                uri, name, version, guard.check("description", _description(ra, cfg))
            )
            tracking.describe_registered_model(uri, name, model_description(ra, bundle), model_tags(ra, cfg), guard)
            tracking.link_logged_model(
                uri, model_id, name, version, run_id, LOGGED_MODEL_METRICS, logged_model_params(ra, cfg), guard
            )
        except BaseException:
            tracking.abandon_model_version(uri, name, version, model_id)
            raise
        tracker = tracking.attach(uri, ra.run["experiment"], run_id, guard)
        for f in (CARD_MD, CARD_JSON):
            tracker.log_file(bundle / f, "model_card", text=True)
        run_tags = {"medxfer.registered": f"{name}/{version}"}
        alias: str | None = CANDIDATE
        if warnings:
            run_tags[WARNING_TAG] = tags[WARNING_TAG]
            for w in warnings:
                ui.warn(f"registration guard: {w}")
            if force:
                run_tags[FORCED_TAG] = tags[FORCED_TAG]
                ui.warn(f"--force: alias '{CANDIDATE}' set on {name} v{version} despite the warnings above")
            else:
                alias = None
                ui.warn(
                    f"{name} v{version} is registered WITHOUT the '{CANDIDATE}' alias. Review it; retrain (more "
                    f"epochs, more data, another recipe) or, to set the alias anyway, `medxfer register {run_id} "
                    f"--name {name} --force` (the override is recorded)"
                )
        tracker.set_tags(run_tags)
        if alias:
            tracking.set_model_alias(uri, name, alias, version)
    return RegisterResult(run_id, name, version, model_id, alias, uri, tags, warnings, bool(force and warnings))


# --------------------------------------------------------------------------- promote


@dataclass
class Check:
    floor: str
    what: str
    required: float
    actual: float | None

    @property
    def ok(self) -> bool:
        return self.actual is not None and self.actual >= self.required

    def as_dict(self) -> dict[str, Any]:
        return {
            "floor": self.floor,
            "metric": self.what,
            "required": self.required,
            "actual": self.actual,
            "ok": self.ok,
        }

    def text(self) -> str:
        actual = "missing" if self.actual is None else f"{self.actual:.3f}"
        return f"{self.what} {actual} {'>=' if self.ok else '<'} required {self.required:.3f} ({self.floor})"


def promotion_checks(tags: dict[str, str]) -> list[Check]:
    checks = []
    for floor, (metric_tag, what) in FLOORS.items():
        required = tags.get(f"{FLOOR_TAG}{floor}")
        if required in (None, ""):
            continue
        actual = tags.get(metric_tag)
        checks.append(Check(floor, what, float(required), float(actual) if actual not in (None, "") else None))
    return checks


@dataclass
class PromoteResult:
    model_name: str
    model_version: str
    alias: str
    checks: list[Check]

    def summary(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "alias": self.alias,
            "model_uri": f"models:/{self.model_name}@{self.alias}",
            "promoted": True,
            "checks": [c.as_dict() for c in self.checks],
        }

    def table(self) -> tuple[str, list[tuple[str, str]]]:
        rows = [("alias", f"models:/{self.model_name}@{self.alias} -> version {self.model_version}")]
        rows += [("check", c.text()) for c in self.checks] or [("check", "the recipe sets no promotion floors")]
        return f"promote: {self.model_name} v{self.model_version}", rows


def promote(name: str, version: int | str, alias: str, workspace: Path) -> PromoteResult:
    """Point `alias` at a version, refusing when the recipe's promotion floors are not met."""
    uri = _uri(workspace)
    mv = tracking.get_model_version(uri, _check_name(name), version)
    checks = promotion_checks(mv["tags"])
    failed = [c for c in checks if not c.ok]
    if failed:
        raise PromotionRefused(
            f"refusing to set alias '{alias}' on {name} version {mv['version']}: "
            + "; ".join(c.text() for c in failed)
            + ". Improve the model (more data, another recipe) or, if the floor is wrong for "
            "this task, change recipe promotion floors and retrain/re-register"
        )
    tracking.set_model_alias(uri, name, alias, mv["version"])
    return PromoteResult(name, mv["version"], alias, checks)
