"""The dataset fingerprint and the machine: the facts a plan is derived from (nnU-Net's first step).

Read from the manifest ingest wrote (no image is opened): modality, 2D/3D, the distribution of shapes and
spacings, the intensity range, studies and patients per class, and whether a split exists; plus the machine:
device, its memory, the cores this process may use. Everything here is aggregate and PHI-free (counts,
medians, percentiles): ``plan.json`` is a shareable file.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from medxfer.config.spec import DataSpec
from medxfer.core.workspace import Workspace
from medxfer.ingest.manifest import read_manifest


def _percentiles(rows: list[list[float]]) -> dict[str, list[float]]:
    """Per-axis 10th/50th/90th percentiles of the most common rank of ``rows`` (a 2D study may carry 2 or 3 axes)."""
    by_len: dict[int, list[list[float]]] = {}
    for r in rows:
        by_len.setdefault(len(r), []).append(r)
    a = np.asarray(max(by_len.values(), key=len), dtype=np.float64)
    return {f"p{q}": np.percentile(a, q, axis=0).round(4).tolist() for q in (10, 50, 90)}


def dataset_fingerprint(spec: DataSpec, ws: Workspace) -> dict[str, Any]:
    """The aggregate facts of the ingested data that the plan's rules read."""
    m = read_manifest(ws.manifest, resolve=False)
    if m.empty:
        raise ValueError("the manifest is empty")
    per_class = {
        c: {
            "studies": int((m["label"] == c).sum()),
            "patients": int(m.loc[m["label"] == c, "patient_key"].nunique()),
        }
        for c in spec.classes
    }
    n = int(len(m))
    smallest = min(v["studies"] for v in per_class.values())
    fp: dict[str, Any] = {
        "spec": spec.name,
        "dims": spec.dims,
        "task": spec.task,
        "modality": sorted({str(x) for x in m["modality"].dropna()}),
        "source_kind": spec.source.kind,
        "n_studies": n,
        "n_patients": int(m["patient_key"].nunique()),
        "classes": per_class,
        "minority_fraction": round(smallest / n, 4),
        "shape": _percentiles([list(map(float, s))[: spec.dims] for s in m["shape"]]),
        "spacing": _percentiles([list(map(float, s))[: spec.dims] for s in m["spacing"]]),
        "intensity": {
            "min_p1": float(np.percentile(m["intensity_min"], 1)),
            "max_p99": float(np.percentile(m["intensity_max"], 99)),
        },
        "split": None,
    }
    if ws.splits.is_file():
        import pandas as pd

        s = pd.read_csv(ws.splits)
        fp["split"] = {k: int(v) for k, v in s["split"].value_counts().sort_index().items()}
    return fp


def machine_fingerprint() -> dict[str, Any]:
    """Device, memory and cores, as the budget and batch-size rules need them."""
    import psutil
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    out: dict[str, Any] = {
        "device": "cpu",
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "memory_available_gb": round(psutil.virtual_memory().available / 2**30, 2),
    }
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        out |= {
            "device": "cuda",
            "gpu": torch.cuda.get_device_name(0),
            "gpu_count": torch.cuda.device_count(),
            "memory_available_gb": round(free / 2**30, 2),
            "gpu_memory_total_gb": round(total / 2**30, 2),
        }
    return out
