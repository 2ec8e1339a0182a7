"""The PHI guard: what may be written to the tracking store.

Every string that leaves for the tracking store (param keys and values, tags, metric names, text
artifacts, strings inside logged checkpoints, registered-version tags) passes through
``PHIGuard.check``: a value that contains the data root, the labels CSV, a path component of a
source file, or a known original identifier is refused before it is written. Training never logs
the manifest's ``files`` or the spec's paths in the first place; the guard is there for the day
someone does. Pure Python: no mlflow here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from medxfer.core.errors import StageError


class PHIRefused(StageError):
    """A value bound for MLflow looked like PHI or a source path; the message never repeats the value."""


_WORD_SPLIT = re.compile(r"[^A-Za-z0-9._^\-]+")
# Words that legitimately appear in what we log and may also name folders in a source tree: config literals
# (a recipe's stages log as "[{'epoch': 0, 'groups': 'all', 'lr_scale': None}]", so a study folder named None
# made train refuse), generic folder words, and imaging vocabulary. None of them identifies anyone.
_ALWAYS_SAFE = {
    # config and Python/YAML literals
    "none",
    "null",
    "nan",
    "inf",
    "true",
    "false",
    "yes",
    "no",
    "on",
    "off",
    "auto",
    "default",
    "all",
    "any",
    "both",
    "other",
    "others",
    "unknown",
    "mixed",
    "first",
    "last",
    "best",
    "latest",
    "final",
    "main",
    "mean",
    "max",
    "min",
    "sum",
    "epoch",
    "epochs",
    "stage",
    "stages",
    "group",
    "groups",
    "fold",
    "folds",
    "seed",
    "model",
    "models",
    "weights",
    "config",
    # generic folder words
    "data",
    "dataset",
    "datasets",
    "export",
    "exports",
    "import",
    "input",
    "inputs",
    "output",
    "outputs",
    "raw",
    "new",
    "old",
    "copy",
    "backup",
    "temp",
    "tmp",
    "misc",
    "done",
    "batch",
    "part",
    "site",
    "archive",
    "incoming",
    "labels.csv",
    "train",
    "val",
    "valid",
    "validation",
    "test",
    "holdout",
    "pos",
    "neg",
    "positive",
    "negative",
    "normal",
    "abnormal",
    "case",
    "cases",
    "control",
    "controls",
    # imaging vocabulary
    "dicom",
    "nifti",
    "dcm",
    "nii",
    "nii.gz",
    "image",
    "images",
    "imgs",
    "scan",
    "scans",
    "series",
    "study",
    "studies",
    "patient",
    "patients",
    "subject",
    "subjects",
    "volume",
    "volumes",
    "slice",
    "slices",
    "mask",
    "masks",
    "label",
    "labels",
    "axial",
    "sagittal",
    "coronal",
    "head",
    "brain",
    "chest",
    "lung",
    "lungs",
    "liver",
    "knee",
    "spine",
    "abdomen",
    "pelvis",
    "left",
    "right",
    "localizer",
    "scout",
    "flair",
    "mprage",
    "contrast",
}


def _word_ok_to_guard(w: str, safe: set[str]) -> bool:
    """Whether a source-path component or original identifier is specific enough to refuse in logged text.

    Common words never are (see _ALWAYS_SAFE). A token without letters is an ID or a date only with 6+ digits
    (19700101, an MRN, a UID); shorter ones (2019, 001) collide with years, epochs, sizes and seeds. Any other
    token needs 4+ characters: surnames and IDs (IM0001, PAT998877) are guarded, 3-letter codes (SE2, T1w) not.
    """
    if w.lower() in safe:
        return False
    if not any(c.isalpha() for c in w):
        return sum(c.isdigit() for c in w) >= 6
    return len(w) >= 4


class PHIGuard:
    """Refuses values containing protected path prefixes (substring) or protected words (whole words)."""

    def __init__(self, prefixes: Iterable[str] = (), words: Iterable[str] = (), safe: Iterable[str] = ()):
        self.prefixes = sorted({p for p in prefixes if p and len(p) > 1}, key=len, reverse=True)
        safe_set = {s.lower() for s in safe} | _ALWAYS_SAFE
        self.words = {w.lower() for w in words if w and _word_ok_to_guard(w, safe_set)}

    @classmethod
    def for_training(
        cls,
        spec: Any,
        files: Iterable[Iterable[str]] = (),
        pseudonym_map: Path | None = None,
        originals: Iterable[str] = (),
    ) -> PHIGuard:
        """Guard for a training run: the spec's local paths, source-path components, and the original
        identifiers in the workspace's pseudonym map (the local-only ``pseudonym,kind,original`` CSV)."""
        originals = list(originals)
        if pseudonym_map is not None and Path(pseudonym_map).is_file():
            import csv

            with Path(pseudonym_map).open(newline="") as fh:
                originals += [r["original"] for r in csv.DictReader(fh) if r.get("original")]
        root = Path(spec.root)
        prefixes = {str(root), str(root.resolve()), str(spec.labels_csv), str(Path(spec.labels_csv).resolve())}
        if spec.spec_path is not None and spec.split.pinned_test is not None:
            prefixes.add(str(spec.resolve(spec.split.pinned_test)))
        words: set[str] = set(originals)
        for study in files:
            for f in study:
                p = Path(f)
                try:
                    rel = p.relative_to(root)
                except ValueError:
                    try:
                        rel = p.resolve().relative_to(root.resolve())
                    except ValueError:
                        rel = Path(p.name)
                words.update(rel.parts)
                words.add(rel.stem)
                if len(rel.parts) > 1:
                    prefixes.add(str(rel))
        safe = set(spec.classes) | {spec.name}
        return cls(prefixes, words, safe)

    def problem(self, value: str) -> str | None:
        """Why `value` may not be logged, or None. The reason never contains the value itself."""
        for p in self.prefixes:
            if p in value:
                return "it contains a local source path"
        if self.words:
            for w in _WORD_SPLIT.split(value):
                if w and w.lower() in self.words:
                    return "it contains a source folder/file name or an original identifier"
        return None

    def check(self, what: str, value: Any) -> str:
        text = value if isinstance(value, str) else str(value)
        why = self.problem(text)
        if why:
            raise PHIRefused(
                f"refusing to log {what} to MLflow: {why}. This is a bug or a spec/recipe value "
                "that names a source file; remove it and rerun"
            )
        return text

    def check_tree(self, what: str, obj: Any) -> None:
        """Check every string (and dict key) in a nested structure; tensors are skipped."""
        if isinstance(obj, Mapping):
            for k, v in obj.items():
                self.check(f"{what} key", str(k))
                self.check_tree(f"{what}.{k}", v)
        elif isinstance(obj, list | tuple):
            for v in obj:
                self.check_tree(what, v)
        elif isinstance(obj, str):
            self.check(what, obj)
