"""Benchmark 6: per-study inference latency, eager PyTorch against the exported ONNX program.

A model is trained briefly with the default recipe (its accuracy does not matter here), evaluated,
and exported with ``medxfer.handoff.export.export`` (the hand-off folder). Then, one study at a time, on
MedMNIST test studies read from disk:

- eager: ``Predictor.preprocess`` (discovery + the training eval transform) + ``Predictor.logits``;
- ONNX: the same preprocessing + ``onnxruntime`` on the exported ``model.onnx``;
- model only: the forward pass alone for each, on the preprocessed tensor;
- end to end: ``Predictor.predict([study])`` (one-row DataFrame with calibrated probabilities).

Each study is run once untimed first. p50/p95 over studies; ratios ONNX / eager (lower is faster).
"""

from __future__ import annotations

import shutil
import time
from typing import Any

from benchmarks import common, fixtures

TITLE = "Inference: per-study latency p50/p95, eager PyTorch vs exported ONNX (onnxruntime)"
NAME = "inference"

# (demo studies per split used to train and to time) per size
_PLAN = {"tiny": 24, "quick": 60, "full": 150}
_SETS = (("2D BreastMNIST DICOM", "breast", 2), ("3D AdrenalMNIST3D NIfTI", "adrenal", 3))


def arm(kind: str, limit: int, dims: int, extra: list[str] | None = None, timed: int | None = None) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort
    import torch
    from medxfer.config.spec import load_spec
    from medxfer.evaluation.evaluate import evaluate
    from medxfer.handoff.bundle import Predictor
    from medxfer.handoff.export import export
    from medxfer.training.stage import train

    spec, ws_root = fixtures.prepare(kind, limit)
    run_ws = fixtures.fresh_workspace(spec, ws_root, f"inference-{kind}-{limit}")
    res = train(load_spec(spec.spec_path), run_ws, overrides=["epochs=1", *(extra or [])], device="cpu")
    evaluate(res.run_id, run_ws, n_bootstrap=20)
    out = run_ws / "export"
    shutil.rmtree(out, ignore_errors=True)
    summary = export(f"runs:/{res.run_id}", out, run_ws).summary()
    if not (out / "model.onnx").is_file():
        raise common.Skip(f"export produced no ONNX program ({summary.get('program')}); nothing to compare")
    pred = Predictor.from_dir(out)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    test = fixtures.tables(spec, ws_root)["test"]
    studies = [str(list(f)[0]) for f in test["files"]][:timed]

    lat: dict[str, list[float]] = {k: [] for k in ("eager", "onnx", "eager_model", "onnx_model", "predict")}
    max_diff = 0.0
    for path in studies:
        for timed in (False, True):
            t0 = time.perf_counter()
            x = pred.preprocess(path)
            t1 = time.perf_counter()
            le = pred.logits(x[None])
            t2 = time.perf_counter()
            x2 = pred.preprocess(path)
            t3 = time.perf_counter()
            lo = sess.run(None, {input_name: x2[None].numpy().astype(np.float32)})[0]
            t4 = time.perf_counter()
            pred.predict([path])
            t5 = time.perf_counter()
            if timed:
                lat["eager"].append(t2 - t0)
                lat["eager_model"].append(t2 - t1)
                lat["onnx"].append(t4 - t2)
                lat["onnx_model"].append(t4 - t3)
                lat["predict"].append(t5 - t4)
                max_diff = max(max_diff, float(np.abs(le - lo).max()))
    stats = {
        k: {"p50_ms": 1000 * common.percentile(v, 50), "p95_ms": 1000 * common.percentile(v, 95)}
        for k, v in lat.items()
    }
    return {
        "stats": stats,
        "n_studies": len(studies),
        "max_abs_logit_diff": max_diff,
        "torch_threads": torch.get_num_threads(),
        "encoder": pred.config["model"]["encoder"],
        "input": (pred.config.get("input") or {}).get("shape"),
    }


def run(size: str = "full") -> dict[str, Any]:
    result = common.new_result(NAME, TITLE, size)
    common.require("medxfer.handoff.export", "the export stage (medxfer.handoff.export)")
    common.require("onnxruntime", "onnxruntime")
    limit = _PLAN[size]
    t0 = time.perf_counter()
    names = {
        "eager": "eager: preprocess + forward",
        "onnx": "ONNX: preprocess + onnxruntime",
        "eager_model": "eager: forward only",
        "onnx_model": "ONNX: onnxruntime only",
        "predict": "Predictor.predict (end to end, calibrated)",
    }
    for label, kind, dims in _SETS[:1] if size == "tiny" else _SETS:
        m = (
            common.run_isolated("benchmarks.inference:arm", kind=kind, limit=limit, dims=dims)
            if size != "tiny"
            else arm(kind, limit, dims, common.tiny_train(size, dims), timed=4)
        )
        s = m["stats"]
        for key, name in names.items():
            result["rows"].append(
                {
                    "set": label,
                    "encoder": m["encoder"],
                    "studies": m["n_studies"],
                    "arm": name,
                    "p50_ms": s[key]["p50_ms"],
                    "p95_ms": s[key]["p95_ms"],
                }
            )
        result["ratios"][f"{label}: ONNX / eager p50 (per study, with preprocessing)"] = common.ratio_entry(
            s["onnx"]["p50_ms"] / s["eager"]["p50_ms"], None, higher_is_better=False
        )
        result["ratios"][f"{label}: ONNX / eager p50 (model only)"] = common.ratio_entry(
            s["onnx_model"]["p50_ms"] / s["eager_model"]["p50_ms"], None, higher_is_better=False
        )
        result.setdefault("details", {})[label] = m
    result["notes"].append("batch of one study, CPU; torch and onnxruntime with their default thread counts")
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


if __name__ == "__main__":
    common.script_main(run)
