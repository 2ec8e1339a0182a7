"""Synthetic model outputs shared by the evaluation, model-card, bundle and export tests (no training needed)."""

from __future__ import annotations

import numpy as np
from medxfer.evaluation.evaluate import SplitOutputs

# Planted identifiers: none of these may appear in any card, JSON or artifact.
PHI = ["DOE^JANE", "MRN99812345", "19700101", "St Elsewhere General", "/srv/pacs/DOE_JANE"]


def outputs(
    n: int, seed: int, k: int = 2, signal: float = 2.0, scale: float = 3.0, per_patient: int = 2, prefix: str = ""
) -> SplitOutputs:
    """Over-confident logits (x `scale`) with `signal` separation; `per_patient` studies per patient."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    y[:k] = np.arange(k)  # every class present
    z = (rng.normal(size=(n, k)) + signal * np.eye(k)[y]) * scale
    studies = np.array([f"st-{prefix}{i:020d}"[:23] for i in range(n)])
    patients = np.array([f"pt-{prefix}{i // per_patient:020d}"[:23] for i in range(n)])
    return SplitOutputs(z, y, patients, studies)


def checkpoint_dict(task: str = "binary", classes: list[str] | None = None) -> dict:
    """A checkpoint-shaped dict (no weights) with PHI planted in the fields that hold local paths."""
    classes = classes or (["benign", "malignant"] if task == "binary" else ["a", "b", "c"])
    spec = {
        "name": "toy-spec",
        "task": task,
        "dims": 2,
        "source": {"kind": "dicom", "root": "/srv/pacs/DOE_JANE/MRN99812345"},
        "labels": {
            "csv": "/srv/pacs/DOE_JANE/labels.csv",
            "key": "StudyInstanceUID",
            "column": "label",
            "patient": None,
        },
        "classes": classes,
        "positive_class": classes[1] if task == "binary" else None,
        "series": {
            "modality": ["US"],
            "description_include": [],
            "description_exclude": ["(?i)scout"],
            "imagetype_exclude": None,
            "min_slices": 1,
            "prefer": [],
        },
        "preprocess": {"spacing": None, "size": [32, 32], "intensity": {"mode": "scale", "window": None}},
        "split": {
            "fractions": {"train": 0.7, "val": 0.1, "test": 0.2},
            "folds": None,
            "seed": 0,
            "group_by_patient": True,
            "pinned_test": None,
        },
        "spec_path": "/srv/pacs/DOE_JANE/spec.yaml",
    }
    recipe = {
        "encoder": "efficientnet_lite0",
        "weights": "default",
        "epochs": 3,
        "stages": [{"epoch": 0, "groups": "all", "plateau_patience": None}],
        "optim": {"name": "adamw", "lr": 1e-3},
        "loss": "focal",
        "focal": {"gamma": 2.0, "alpha": "auto"},
        "select_metric": "auroc",
        "seed": 0,
        "data": {"size": [32, 32], "augment": {"flip": True}},
        "evaluation": {"threshold": "youden", "target": None, "bootstrap": 200},
    }
    return {
        "format": 1,
        "run_id": "0123456789abcdef0123456789abcdef",
        "encoder": "efficientnet_lite0",
        "model_args": {"name": "efficientnet_lite0", "num_classes": len(classes), "in_chans": 1, "spatial_dims": 2},
        "classes": classes,
        "spec": spec,
        "recipe": recipe,
        "epoch": 2,
        "best_metric": 0.91,
        "hashes": {"spec": "aaaa", "manifest": "bbbb", "split": "cccc"},
        "weight_report": {
            "source": "file",
            "location": "/home/DOE_JANE/weights/lite0.pth",
            "sha256": "f" * 64,
            "missing": [],
            "unexpected": [],
            "head_reinitialized": True,
        },
    }
