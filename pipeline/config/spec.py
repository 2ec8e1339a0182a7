"""The data spec: one YAML file per dataset, validated here and nowhere else.

Every error names the file, the field and how to fix it, so a user can act on
it without reading this code. Nothing here reads an image.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from medxfer.core.errors import MedxferError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class SpecError(MedxferError, ValueError):
    """A spec or recipe problem the user can fix by editing a file or a flag."""


class FieldsError(ValueError):
    """A model validator's error that names its fields (pydantic places those at the model, not at a field).

    The first field is the one to fix; the others are what it was checked against. Names are relative to the model
    that raises, e.g. ``FieldsError(msg, "positive_class", "classes")`` in DataSpec.
    """

    def __init__(self, message: str, *fields: str):
        super().__init__(message)
        self.fields = fields


def _fields(e: Any) -> list[str]:
    """The dotted fields an error is about: its location, or, for a FieldsError, the fields it names there."""
    where = ".".join(str(p) for p in e["loc"])
    named = getattr((e.get("ctx") or {}).get("error"), "fields", ())
    if named:
        return [f"{where}.{f}" if where else f for f in named]
    return [where or "the whole file"]


def format_validation_error(path: Path | str, err: ValidationError, hints: dict[str, str]) -> str:
    lines = [f"{path}: invalid ({len(err.errors())} problem(s))"]
    for e in err.errors():
        field, *others = _fields(e)
        msg = e["msg"].removeprefix("Value error, ")
        hint = next((h for f in (field, *others) if (h := hints.get(f) or hints.get(f.split(".")[0]))), "")
        against = f" (with {', '.join(repr(o) for o in others)})" if others else ""
        lines.append(f"  - field '{field}'{against}: {msg}" + (f"\n    fix: {hint}" if hint else ""))
    return "\n".join(lines)


_STRICT = ConfigDict(extra="forbid")


# How many `..` a relative source.root may start with: 1 lets a data_specs/ folder sit next to the data.
MAX_ROOT_CLIMB = 1


class Source(BaseModel):
    model_config = _STRICT
    kind: Literal["dicom", "nifti"]
    root: Path
    # NIfTI carries no modality tag; say what the volumes are (e.g. CT) so reports and model cards can.
    # DICOM takes the Modality of each chosen series and ignores this.
    modality: str | None = None
    # A spec handed over from elsewhere must not point ingest at an arbitrary folder (`root: ../../../../etc`): a
    # relative root stays in the spec's folder or next to it (one `..`: data_specs/../demo-data, as shipped).
    # Climbing further takes an absolute path, or this set to true.
    allow_outside: bool = False

    @model_validator(mode="after")
    def _root_stays_near_the_spec(self) -> Source:
        if self.root.is_absolute() or self.allow_outside:
            return self
        parts = Path(os.path.normpath(self.root)).parts
        up = next((i for i, part in enumerate(parts) if part != ".."), len(parts))
        if up > MAX_ROOT_CLIMB:
            raise FieldsError(
                f"relative root {str(self.root)!r} climbs {up} folders above the spec's folder; a relative root "
                f"may climb at most {MAX_ROOT_CLIMB} (e.g. ../data); write the folder as an absolute path, or set "
                "source.allow_outside: true if this spec is yours and the folder is meant",
                "root",
                "allow_outside",
            )
        return self


class Labels(BaseModel):
    model_config = _STRICT
    csv: Path
    key: str = "StudyInstanceUID"
    column: str = "label"
    patient: str | None = None


# Derived or secondary images and scout views are rarely what a classifier should see.
DEFAULT_IMAGETYPE_EXCLUDE = ["LOCALIZER", "DERIVED", "SECONDARY"]
VOLUME_MODALITIES = {"CT", "MR", "PT", "NM"}


class SeriesRules(BaseModel):
    model_config = _STRICT
    modality: list[str] | None = None
    description_include: list[str] = Field(default_factory=list)
    description_exclude: list[str] = Field(default_factory=list)
    # None means "the default for the modality": excluded for CT/MR, allowed for 2D modalities
    # (ultrasound and secondary captures are often DERIVED/SECONDARY by nature).
    imagetype_exclude: list[str] | None = None
    min_slices: int = Field(1, ge=1)
    # Tie-break when several series qualify: first rule that matches wins, then most slices.
    prefer: list[str] = Field(default_factory=list)
    # Slice steps may differ from the median step by this fraction before the series is quarantined
    # as unevenly spaced; a gap of 1.5 steps or more is reported as missing slices instead.
    spacing_tolerance: float = Field(0.1, gt=0, lt=0.5)

    @field_validator("modality")
    @classmethod
    def _upper(cls, v: list[str] | None) -> list[str] | None:
        return [m.strip().upper() for m in v] if v is not None else None

    @field_validator("description_include", "description_exclude", "prefer")
    @classmethod
    def _regexes_compile(cls, v: list[str]) -> list[str]:
        for pat in v:
            try:
                re.compile(pat)
            except re.error as exc:
                raise ValueError(f"regex {pat!r} does not compile: {exc}") from exc
        return v

    def imagetype_exclusions(self, modality: str) -> list[str]:
        if self.imagetype_exclude is not None:
            return [s.upper() for s in self.imagetype_exclude]
        return DEFAULT_IMAGETYPE_EXCLUDE if modality.upper() in VOLUME_MODALITIES else ["LOCALIZER"]


class Intensity(BaseModel):
    model_config = _STRICT
    mode: Literal["ct_window", "zscore", "scale"] = "scale"
    window: tuple[float, float] | None = None  # (level, width) in HU for ct_window

    @model_validator(mode="after")
    def _window_for_ct(self) -> Intensity:
        if self.mode == "ct_window" and self.window is None:
            raise FieldsError(
                "mode 'ct_window' needs 'window: [level, width]', e.g. [40, 400] for soft tissue", "window", "mode"
            )
        return self


class Preprocess(BaseModel):
    model_config = _STRICT
    spacing: list[float] | None = None  # target spacing in mm, per spatial dim; None keeps native
    size: list[int] | None = None  # target size per spatial dim; the recipe may override
    intensity: Intensity = Field(default_factory=Intensity)


class SplitPolicy(BaseModel):
    model_config = _STRICT
    fractions: dict[str, float] | None = Field(default_factory=lambda: {"train": 0.7, "val": 0.1, "test": 0.2})
    folds: int | None = Field(None, ge=2)
    seed: int = 0
    group_by_patient: bool = True
    pinned_test: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> SplitPolicy:
        if self.folds is None:
            fr = self.fractions or {}
            if set(fr) != {"train", "val", "test"}:
                raise FieldsError("fractions need exactly the keys train, val, test", "fractions", "folds")
            if any(v < 0 for v in fr.values()) or abs(sum(fr.values()) - 1.0) > 1e-6:
                raise FieldsError(
                    f"fractions must be >= 0 and sum to 1 (they sum to {sum(fr.values()):.3f})", "fractions"
                )
        return self


class DataSpec(BaseModel):
    model_config = _STRICT
    name: str
    task: Literal["binary", "multiclass"]
    dims: Literal[2, 3]
    source: Source
    labels: Labels
    classes: list[str]
    positive_class: str | None = None
    series: SeriesRules = Field(default_factory=SeriesRules)
    preprocess: Preprocess = Field(default_factory=Preprocess)
    split: SplitPolicy = Field(default_factory=SplitPolicy)

    # Filled by load_spec; not part of the YAML.
    spec_path: Path | None = Field(None, exclude=True)

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError("use letters, digits, '-', '_' or '.' (it names a folder and an MLflow experiment)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DataSpec:
        names = ", ".join(self.classes)
        if len(set(self.classes)) != len(self.classes):
            raise FieldsError(f"class names must be unique, got: {names}", "classes")
        if self.task == "binary":
            if len(self.classes) != 2:
                raise FieldsError(f"task 'binary' needs exactly 2 classes, got {len(self.classes)}", "classes", "task")
            if self.positive_class is None:
                raise FieldsError(f"task 'binary' needs positive_class: one of {names}", "positive_class", "task")
        elif len(self.classes) < 3:
            raise FieldsError("task 'multiclass' needs 3 or more classes; use task: binary for 2", "classes", "task")
        if self.positive_class is not None and self.positive_class not in self.classes:
            lowered = {c.lower(): c for c in self.classes}
            close = [lowered[c] for c in difflib.get_close_matches(self.positive_class.lower(), lowered, n=1)]
            raise FieldsError(
                f"positive_class {self.positive_class!r} is not one of the classes ({names})"
                + (f"; did you mean {close[0]!r}?" if close else ""),
                "positive_class",
                "classes",
            )
        if self.source.kind == "dicom" and self.labels.key not in ("StudyInstanceUID", "AccessionNumber"):
            raise FieldsError(
                f"labels.key for DICOM must be StudyInstanceUID or AccessionNumber, got {self.labels.key!r}",
                "labels.key",
                "source.kind",
            )
        if self.source.kind == "nifti" and self.labels.key != "path":
            raise FieldsError(
                f"labels.key for NIfTI must be 'path' (relative to source.root), got {self.labels.key!r}",
                "labels.key",
                "source.kind",
            )
        if self.source.kind == "dicom" and self.labels.patient is not None:
            raise FieldsError(
                "labels.patient is for NIfTI only; DICOM patients come from PatientID", "labels.patient", "source.kind"
            )
        if self.preprocess.spacing is not None and len(self.preprocess.spacing) != self.dims:
            raise FieldsError(
                f"preprocess.spacing needs {self.dims} values for dims={self.dims}", "preprocess.spacing", "dims"
            )
        if self.preprocess.size is not None and len(self.preprocess.size) != self.dims:
            raise FieldsError(
                f"preprocess.size needs {self.dims} values for dims={self.dims}", "preprocess.size", "dims"
            )
        return self

    @property
    def positive_index(self) -> int:
        return self.classes.index(self.positive_class) if self.positive_class else len(self.classes) - 1

    @property
    def base_dir(self) -> Path:
        return self.spec_path.parent if self.spec_path else Path.cwd()

    def resolve(self, p: Path) -> Path:
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    @property
    def root(self) -> Path:
        return self.resolve(self.source.root)

    @property
    def labels_csv(self) -> Path:
        return self.resolve(self.labels.csv)

    def content_hash(self) -> str:
        """Hash of the validated spec (not the file bytes): comments and key order do not change it."""
        tree = self.model_dump(mode="json")
        if not tree["source"]["allow_outside"]:  # off, it says nothing: specs hash as before the option existed
            del tree["source"]["allow_outside"]
        blob = yaml.safe_dump(tree, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


_HINTS = {
    "name": "a short identifier such as 'chest-cr'",
    "task": "binary or multiclass",
    "dims": "2 for single images (CR, DX, US, MG), 3 for volumes (CT, MR)",
    "source": "source: {kind: dicom|nifti, root: <folder relative to this file>}",
    "source.kind": "dicom or nifti",
    "labels": "labels: {csv: labels.csv, key: StudyInstanceUID, column: label}",
    "classes": "list the class names in index order, e.g. [normal, pneumonia]",
    "split": "split: {fractions: {train: 0.7, val: 0.1, test: 0.2}, seed: 0}",
    "split.fractions": "e.g. {train: 0.7, val: 0.1, test: 0.2}",
    "split.folds": "an integer >= 2, e.g. folds: 5 (fractions.test, if set, is still held out as test)",
    "series": "series: {modality: [CT], description_exclude: ['(?i)scout'], min_slices: 20}",
    "series.spacing_tolerance": "a fraction of the slice step, e.g. 0.1 for 10%",
    "positive_class": "one of the names in classes, spelled exactly as there",
    "source.root": "the folder to scan, relative to this file (at most one '..') or absolute",
    "labels.key": "dicom: StudyInstanceUID or AccessionNumber; nifti: path",
    "preprocess": "preprocess: {spacing: [1, 1, 1], size: [64, 64, 64], intensity: {mode: zscore}}",
    "preprocess.intensity": "intensity: {mode: ct_window, window: [40, 400]} or {mode: zscore} or {mode: scale}",
}


SPEC_PATH_FIELDS = (("source", "root"), ("labels", "csv"), ("split", "pinned_test"))
LOCAL_PATH = "<local path>"


def strip_spec_paths(spec: dict[str, Any]) -> dict[str, Any]:
    """A spec dict without local paths (source root, labels CSV, pinned test list, spec file): safe to track or
    put in a model card (sites name folders after patients)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in spec.items() if k != "spec_path"}
    for section, key in SPEC_PATH_FIELDS:
        if isinstance(out.get(section), dict) and out[section].get(key) is not None:
            out[section][key] = LOCAL_PATH
    return out


def modality_label(spec: dict[str, Any]) -> str:
    """What the images are, as a (dumped) spec says it: NIfTI's declared modality, DICOM's chosen series
    modalities, else the source kind. One rule for the run description and the registered model's."""
    src, series = spec.get("source") or {}, spec.get("series") or {}
    if src.get("modality"):
        return str(src["modality"])
    if series.get("modality"):
        return "/".join(series["modality"])
    return "DICOM" if src.get("kind") == "dicom" else "NIfTI"


def yaml_error_text(exc: yaml.YAMLError) -> str:
    """Where and what, on one line, without pyyaml's quoted snippet (it repeats the offending line, which may
    hold a path)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"not valid YAML{where}: {getattr(exc, 'problem', None) or type(exc).__name__}"


def load_spec(path: str | Path) -> DataSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file; see data_specs/template.yaml for a commented example")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        # Found by tests/fuzz: a spec saved in another encoding (or a binary file given as the spec).
        raise SpecError(
            f"{path}: not UTF-8 text (byte {exc.start}); save the spec as UTF-8 (see data_specs/template.yaml)"
        ) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: {yaml_error_text(exc)}; fix the file (see data_specs/template.yaml)") from None
    except RecursionError:
        raise SpecError(f"{path}: nested too deeply to be a spec; see data_specs/template.yaml") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping at the top level (name:, task:, ...)")
    try:
        spec = DataSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(format_validation_error(path, exc, _HINTS)) from None
    spec.spec_path = path.resolve()
    return spec


def check_spec_files(spec: DataSpec) -> list[str]:
    """Problems with the files a spec points at, without reading any image."""
    problems = []
    if spec.root.is_file():
        problems.append(
            f"source.root: {spec.root} is a file; it must be the folder to scan (e.g. {spec.root.parent}); "
            "fix the path (relative to the spec)"
        )
    elif not spec.root.is_dir():
        problems.append(f"source.root: folder {spec.root} does not exist; fix the path (relative to the spec)")
    if not spec.labels_csv.is_file():
        problems.append(f"labels.csv: file {spec.labels_csv} does not exist; fix the path (relative to the spec)")
    if spec.split.pinned_test is not None and not spec.resolve(spec.split.pinned_test).is_file():
        problems.append(f"split.pinned_test: file {spec.resolve(spec.split.pinned_test)} does not exist")
    return problems


class CheckSpecResult(BaseModel):
    spec: DataSpec
    problems: list[str]

    def summary(self) -> dict[str, Any]:
        return {
            "spec": self.spec.name,
            "valid": not self.problems,
            "problems": self.problems,
            "spec_hash": self.spec.content_hash(),
            "task": self.spec.task,
            "dims": self.spec.dims,
            "classes": self.spec.classes,
            "source_kind": self.spec.source.kind,
        }

    def table(self) -> tuple[str, list[tuple[str, str]]]:
        rows = [
            ("name", self.spec.name),
            ("task", f"{self.spec.task}, {self.spec.dims}D"),
            ("source", self.spec.source.kind),
            ("classes", ", ".join(self.spec.classes)),
            ("status", "ok" if not self.problems else f"{len(self.problems)} problem(s)"),
        ]
        return "check-spec", rows


def check_spec_command(path: Path) -> CheckSpecResult:
    spec = load_spec(path)
    problems = check_spec_files(spec)
    if problems:
        raise SpecError(f"{path}:\n  - " + "\n  - ".join(problems))
    return CheckSpecResult(spec=spec, problems=problems)
