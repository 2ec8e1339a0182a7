"""JSON helpers: what evaluation.json and the bundle files are written with."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from medxfer.core.jsonio import dump_json, json_safe, medxfer_version


def test_json_safe_makes_numpy_paths_and_non_finite_values_json() -> None:
    obj = {1: np.float32(0.5), "a": (np.int64(3), math.nan), "p": Path("x/y"), "arr": np.array([1.0, np.inf])}
    assert json_safe(obj) == {"1": 0.5, "a": [3, None], "p": "x/y", "arr": [1.0, None]}


def test_dump_json_format(tmp_path: Path) -> None:
    path = dump_json({"b": 1, "a": [math.nan]}, tmp_path / "sub" / "x.json")
    assert path.read_text() == '{\n  "b": 1,\n  "a": [\n    null\n  ]\n}\n'  # insertion order, indent 2
    assert json.loads(path.read_text()) == {"b": 1, "a": [None]}


def test_medxfer_version_is_the_installed_one() -> None:
    from importlib import metadata

    assert medxfer_version() == metadata.version("medxfer")
