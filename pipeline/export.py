"""``medxfer export MODEL_URI --out DIR``: a hand-off folder that works without MLflow.

Contents::

    weights.safetensors   state dict (safetensors, no pickle)
    model.onnx            the network (logits), batch axis dynamic; checked against eager PyTorch in
                          onnxruntime on a real preprocessed study -- or model.torchscript.pt when the
                          ONNX export fails or disagrees (the result and README say which)
    preprocessing.json    how to preprocess and rebuild the model, temperature, threshold (pipeline.bundle)
    evaluation.json       metrics with CIs, calibration, threshold
    model_card.md / .json model card (pipeline.modelcard)
    README.md             how to load it and predict
    SHA256SUMS            sha256 of every other file, `sha256sum -c SHA256SUMS` format

MODEL_URI: ``models:/NAME@alias``, ``models:/NAME/VERSION`` (the registered pyfunc's bundle folder is
downloaded), ``runs:/RUN_ID`` (the bundle is built from the run's best checkpoint and its
evaluation.json), or a bundle folder.

The exported network outputs raw logits: the temperature and threshold are applied outside it
(preprocessing.json), exactly as ``pipeline.bundle.Predictor`` does, so one set of weights serves
calibrated and uncalibrated use.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import bundle as B
from pipeline.errors import MedxferError, StageError

# Logits from onnxruntime vs eager PyTorch on CPU, float32. Observed differences are ~1e-6; the
# tolerance leaves room for other CPUs/kernels while still catching a wrong graph (errors >= 1e-2).
ONNX_ATOL, ONNX_RTOL = 1e-4, 1e-3
OPSET = 17
SUMS = "SHA256SUMS"
BUNDLE_FILES = (B.WEIGHTS, B.PREPROCESSING, B.EVALUATION, B.CARD_MD, B.CARD_JSON)


@dataclass
class ExportResult:
    out: Path
    model_uri: str
    run_id: str | None
    model_name: str | None
    model_version: str | None
    program: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256

    def summary(self) -> dict[str, Any]:
        return {"out": str(self.out), "model_uri": self.model_uri, "run_id": self.run_id,
                "model_name": self.model_name, "model_version": self.model_version, "program": self.program,
                "files": self.files}

    def table(self) -> tuple[str, list[tuple[str, str]]]:
        p = self.program
        check = (f"max |logit diff| {p['max_abs_diff']:.2e} (atol {p['atol']:g}, rtol {p['rtol']:g}) on "
                 f"{p['verified_on']}") if p.get("max_abs_diff") is not None else "not verified"
        rows = [("source", self.model_uri), ("folder", str(self.out)),
                ("program", p["file"] + (f"  (fallback: {p['fallback_reason']})" if p.get("fallback_reason") else "")),
                ("check", check), ("files", ", ".join(sorted(self.files))), ("manifest", f"{SUMS} (sha256)")]
        return "export", rows


# ---------------------------------------------------------------------------- resolving the source

def _bundle_from_run(run_id: str, workspace: Path, dst: Path, model_name: str | None = None,
                     model_version: str | None = None) -> Path:
    from pipeline import checkpoint as ckpt_io
    from pipeline import tracking
    from pipeline.modelcard import run_info_from_checkpoint
    from pipeline.workspace import Workspace

    uri = Workspace.for_spec(workspace, "_").tracking_uri
    run = tracking.get_run(uri, run_id)
    ws = Workspace.for_spec(workspace, run["tags"].get(tracking.TAG_SPEC) or run["experiment"])
    ckpt_path = ws.run_dir(run_id) / ckpt_io.BEST
    if not ckpt_path.is_file():
        ckpt_path = tracking.download_run_artifact(uri, run_id, "checkpoints/best.pt", dst / "ckpt")
        if ckpt_path is None:
            raise StageError(f"run {run_id}: no best checkpoint in the workspace or the run's artifacts")
    ev_path = ws.run_dir(run_id) / B.EVALUATION
    if not ev_path.is_file():
        ev_path = tracking.download_run_artifact(uri, run_id, "evaluation/evaluation.json", dst / "ev")
        if ev_path is None:
            raise StageError(f"run {run_id} has not been evaluated: run `medxfer evaluate {run_id}` first "
                             "(the export needs its temperature and threshold)")
    ckpt = ckpt_io.load(ckpt_path)
    info = run_info_from_checkpoint(ckpt, run["tags"], {"model_name": model_name, "model_version": model_version,
                                                        "run_name": run.get("run_name")})
    return B.write_bundle(ckpt, json.loads(ev_path.read_text()), dst / "bundle", run_info=info)


def resolve_bundle(model_uri: str, workspace: Path, dst: Path) -> tuple[Path, dict[str, str | None]]:
    """A bundle folder for `model_uri` (under `dst`), plus {run_id, model_name, model_version}."""
    from pipeline import tracking
    from pipeline.workspace import Workspace

    meta: dict[str, str | None] = {"run_id": None, "model_name": None, "model_version": None}
    if model_uri.startswith("runs:/"):
        run_id = model_uri.removeprefix("runs:/").strip("/").split("/")[0]
        meta["run_id"] = run_id
        return _bundle_from_run(run_id, workspace, dst), meta
    if model_uri.startswith("models:/"):
        uri = Workspace.for_spec(workspace, "_").tracking_uri
        mv = tracking.resolve_model_version(uri, model_uri)
        meta.update(run_id=mv["run_id"] or None, model_name=mv["name"], model_version=mv["version"])
        found = B.find_bundle(tracking.download_model(uri, model_uri, dst / "model"))
        if found is not None:
            return found, meta
        if mv["run_id"]:  # a registered model without a bundle inside: rebuild it from its run
            return _bundle_from_run(mv["run_id"], workspace, dst, mv["name"], mv["version"]), meta
        raise StageError(f"{model_uri}: the registered model holds no medxfer bundle and names no run")
    path = Path(model_uri)
    found = B.find_bundle(path) if path.is_dir() else None
    if found is None:
        raise MedxferError(f"{model_uri!r}: expected models:/NAME@alias, models:/NAME/VERSION, runs:/RUN_ID or a "
                           "bundle folder (with preprocessing.json and weights.safetensors)")
    cfg = B.load_config(found)
    meta["run_id"] = cfg.get("run_id")
    return found, meta


# ---------------------------------------------------------------------------- example input

def example_input(predictor: B.Predictor, workspace: Path) -> tuple[Any, str]:
    """A real preprocessed study when the workspace has the model's data, else a random tensor of the input shape.

    Only the verification uses it; it is never written to the hand-off folder (pixels can identify people).
    """
    import torch

    from pipeline.workspace import Workspace

    ws = Workspace.for_spec(workspace, predictor.config["spec"]["name"])
    if ws.manifest.is_file() and ws.splits.is_file():
        import pandas as pd

        manifest = pd.read_parquet(ws.manifest)
        splits = pd.read_csv(ws.splits)
        test_keys = set(splits.loc[splits["split"] == "test", "study_key"])
        rows = manifest[manifest["study_key"].isin(test_keys)].head(5)
        for r in rows.itertuples():
            try:
                return predictor.load(list(r.files), r.source_kind)[None], "a preprocessed test-split study"
            except Exception:  # try the next study; the reason may quote a path, so it is not shown
                continue
    shape = predictor.config["input"]["shape"] or [predictor.config["model"]["in_chans"],
                                                  *[64] * predictor.config["model"]["spatial_dims"]]
    gen = torch.Generator().manual_seed(0)
    return torch.rand(1, *shape, generator=gen), "a random input of the model's input shape (no workspace data)"


# ---------------------------------------------------------------------------- programs

def _close(a: np.ndarray, b: np.ndarray) -> tuple[bool, float]:
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    return bool(np.allclose(a, b, atol=ONNX_ATOL, rtol=ONNX_RTOL)), diff


def export_onnx(model: Any, x: Any, path: Path) -> tuple[bool, float, str | None]:
    """torch.onnx.export (TorchScript-based exporter, batch axis dynamic), then onnxruntime vs eager."""
    import onnxruntime as ort
    import torch

    batch = torch.cat([x, torch.flip(x, dims=[-1])])  # batch of 2 exercises the dynamic axis
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (batch,), str(path), dynamo=False, opset_version=OPSET,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        with torch.inference_mode():
            ref = model(batch).float().numpy()
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(["logits"], {"input": batch.numpy().astype(np.float32)})[0]
    except Exception as exc:  # any exporter/runtime failure means: use the fallback
        path.unlink(missing_ok=True)
        return False, float("nan"), f"ONNX export failed ({type(exc).__name__})"
    ok, diff = _close(got, ref)
    if not ok:
        path.unlink(missing_ok=True)
        return False, diff, f"ONNX output differs from eager by {diff:.2e}"
    return True, diff, None


def export_torchscript(model: Any, x: Any, path: Path) -> tuple[bool, float]:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # jit is deprecated, but it is the portable fallback
        with torch.inference_mode():
            traced = torch.jit.trace(model, x, check_trace=False)
            traced.save(str(path))
            ref = model(x).float().numpy()
        loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.inference_mode():
            got = loaded(x).float().numpy()
    return _close(got, ref)


# ---------------------------------------------------------------------------- files

def write_sums(folder: Path) -> dict[str, str]:
    files = {p.name: B.sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != SUMS}
    (folder / SUMS).write_text("".join(f"{h}  {n}\n" for n, h in files.items()))
    return files


def verify_sums(folder: Path) -> list[str]:
    """Names whose sha256 does not match SHA256SUMS (missing files included); empty when all match."""
    bad = []
    for line in (Path(folder) / SUMS).read_text().splitlines():
        h, _, name = line.partition("  ")
        p = Path(folder) / name
        if not p.is_file() or B.sha256_file(p) != h:
            bad.append(name)
    return bad


def _readme(cfg: dict[str, Any], program: dict[str, Any], meta: dict[str, str | None]) -> str:
    classes = cfg["classes"]
    onnx = program["file"] == "model.onnx"
    title = f"{meta.get('model_name') or cfg['spec']['name']}" + (f" v{meta['model_version']}"
                                                                   if meta.get("model_version") else "")
    decision = (f"`{cfg['positive_class']}` when `prob_{cfg['positive_class']} >= {cfg['threshold']:.4f}`"
                if cfg.get("threshold") is not None and cfg.get("positive_class") else "argmax")
    run_program = (
        "import onnxruntime as ort\n"
        "sess = ort.InferenceSession(\"handoff/model.onnx\")\n"
        "logits = sess.run([\"logits\"], {\"input\": x.numpy()})[0]"
        if onnx else
        "import torch\n"
        "prog = torch.jit.load(\"handoff/model.torchscript.pt\")\n"
        "logits = prog(x).detach().numpy()")
    return f"""# {title}: medxfer hand-off

{cfg['task']} classifier over {', '.join(classes)}; run {cfg.get('run_id')}. See `model_card.md` before use.
Check the files first: `sha256sum -c SHA256SUMS`.

## Predict in ten lines (with medxfer installed; no MLflow needed)

```python
from pipeline.bundle import Predictor

p = Predictor.from_dir("handoff/")        # checks weights.safetensors against its SHA-256
df = p.predict(["study_folder/", "scan.nii.gz"])
print(df)  # input, {', '.join('prob_' + c for c in classes)}, decision, error
```

## The exported program ({program['file']})

Input: float32 `{['batch', *(cfg['input']['shape'] or ['C', '...'])]}`, preprocessed exactly as
`preprocessing.json` says (`Predictor.preprocess` does it). Output: raw logits; divide by the temperature
{cfg['temperature']:.4f}, softmax, then decide: {decision}.

```python
import numpy as np
from pipeline.bundle import Predictor
x = Predictor.from_dir("handoff/").preprocess("scan.nii.gz")[None]   # (1, C, *spatial)
{run_program}
z = logits / {cfg['temperature']:.6f}
prob = np.exp(z - z.max(1, keepdims=True)); prob /= prob.sum(1, keepdims=True)
```

Verified: {program.get('check_text')}.
"""


def export(model_uri: str, out: Path, workspace: Path) -> ExportResult:
    import torch

    out = Path(out)
    ours = {*BUNDLE_FILES, "model.onnx", "model.torchscript.pt", "README.md", SUMS}
    if out.exists() and ({p.name for p in out.iterdir()} - ours or not out.is_dir()):
        # Only ever replace an earlier export: never delete files we did not write.
        raise MedxferError(f"--out {out} exists and holds other files; choose an empty or new folder")
    with tempfile.TemporaryDirectory() as tmp:
        src, meta = resolve_bundle(model_uri, Path(workspace), Path(tmp))
        staging = Path(tmp) / "out"
        staging.mkdir()
        for name in BUNDLE_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, staging / name)
        if meta.get("model_name") and (staging / B.CARD_JSON).is_file():
            _stamp_card(staging, meta)
        predictor = B.Predictor.from_dir(staging, device="cpu")
        model = predictor.model
        x, verified_on = example_input(predictor, Path(workspace))
        x = x.to(torch.float32)
        ok, diff, reason = export_onnx(model, x, staging / "model.onnx")
        if ok:
            program: dict[str, Any] = {"file": "model.onnx", "format": "onnx", "opset": OPSET}
        else:
            ts_ok, diff = export_torchscript(model, x, staging / "model.torchscript.pt")
            if not ts_ok:
                raise StageError(f"neither ONNX ({reason}) nor TorchScript reproduces the eager model "
                                 f"(max diff {diff:.2e}); the weights are fine, the network cannot be exported")
            program = {"file": "model.torchscript.pt", "format": "torchscript", "fallback_reason": reason}
        program.update(max_abs_diff=diff, atol=ONNX_ATOL, rtol=ONNX_RTOL, verified_on=verified_on,
                       check_text=f"max |logit difference| {diff:.2e} vs eager PyTorch (tolerance atol "
                                  f"{ONNX_ATOL:g} + rtol {ONNX_RTOL:g}) on {verified_on}")
        (staging / "README.md").write_text(_readme(predictor.config, program, meta))
        files = write_sums(staging)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, out)
    return ExportResult(out.resolve(), model_uri, meta.get("run_id"), meta.get("model_name"),
                        meta.get("model_version"), program, files)


def _stamp_card(folder: Path, meta: dict[str, str | None]) -> None:
    """Put the registered name and version on a card built before registration."""
    from pipeline.modelcard import render_markdown

    card = json.loads((folder / B.CARD_JSON).read_text())
    card["model"]["name"] = meta["model_name"]
    card["model"]["version"] = meta["model_version"]
    (folder / B.CARD_JSON).write_text(json.dumps(card, indent=2) + "\n")
    (folder / B.CARD_MD).write_text(render_markdown(card))
