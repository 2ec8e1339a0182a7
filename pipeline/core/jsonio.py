"""JSON files as medxfer writes them (evaluation.json, bundle files), and the version stamped into them."""

from __future__ import annotations

import json
import math
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np


def medxfer_version() -> str:
    try:
        return metadata.version("medxfer")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


def json_safe(obj: Any) -> Any:
    """JSON-safe: nan/inf -> None, numpy -> python, Paths -> str."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dump_json(obj: Any, path: Path) -> Path:
    """``obj`` made JSON-safe, indented by 2, keys in insertion order, newline-terminated; parents created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(obj), indent=2, sort_keys=False) + "\n")
    return path


def canonical_safetensors(blob: bytes) -> bytes:
    """A safetensors file's bytes with its JSON header re-serialised with sorted keys.

    safetensors writes ``__metadata__`` in its (Rust HashMap) iteration order, which changes from call to call:
    bit-identical demo weights were registered as bbe5b427... by one run and f8ef2d3b... by the next, and two
    evaluations of one run wrote OOD statistics with two SHA-256s. Tensor offsets are relative to the data
    block, so they hold; the format pads the header to 8-byte alignment with spaces.
    """
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + blob[8 + n :]
