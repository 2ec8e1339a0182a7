"""``medxfer export MODEL_URI --out DIR``: a hand-off folder that works without MLflow.

Contents::

    weights.safetensors   state dict (safetensors, no pickle)
    model.onnx            the network (logits), batch axis dynamic; checked against eager PyTorch in
                          onnxruntime on a real preprocessed study -- or model.torchscript.pt when the
                          ONNX export fails or disagrees (the result and README say which)
    preprocessing.json    how to preprocess and rebuild the model, temperature, threshold (medxfer.handoff.bundle)
    evaluation.json       metrics with CIs, calibration, threshold
    model_card.md / .json model card (medxfer.evaluation.modelcard)
    report.html           one self-contained page: metrics with CIs, curves, calibration, transfer gain, card
                          summary (medxfer.evaluation.report); its curves come from the run in MLflow when the
                          store has it, else the page says what is missing
    README.md             how to load it and predict
    SHA256SUMS            sha256 of every other file, `sha256sum -c SHA256SUMS` format

MODEL_URI: ``models:/NAME@alias``, ``models:/NAME/VERSION`` (the registered pyfunc's bundle folder is
downloaded), ``runs:/RUN_ID`` of an evaluated run (the bundle is built from its best checkpoint and
evaluation.json), or a bundle folder (e.g. an earlier export) -- resolved as ``medxfer predict`` does.

A fold ensemble (preprocessing.json ``model.ensemble_members``) exports as one program: its graph holds every
member and outputs the mean of their logits, checked against eager PyTorch like a single model.

The exported network outputs raw logits: the temperature and threshold are applied outside it
(preprocessing.json), exactly as ``medxfer.handoff.bundle.Predictor`` does, so one set of weights serves
calibrated and uncalibrated use.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from medxfer.core.errors import MedxferError, StageError
from medxfer.handoff import bundle as B

# Logits from onnxruntime vs eager PyTorch on CPU, float32. Observed differences are ~1e-6; the
# tolerance leaves room for other CPUs/kernels while still catching a wrong graph (errors >= 1e-2).
ONNX_ATOL, ONNX_RTOL = 1e-4, 1e-3
OPSET = 17
SUMS = "SHA256SUMS"
REPORT = "report.html"
BUNDLE_FILES = (B.WEIGHTS, B.PREPROCESSING, B.EVALUATION, B.CARD_MD, B.CARD_JSON, B.OOD)  # OOD: when evaluated


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
        return {
            "out": str(self.out),
            "model_uri": self.model_uri,
            "run_id": self.run_id,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "program": self.program,
            "files": self.files,
        }

    def table(self) -> tuple[str, list[tuple[str, str]]]:
        p = self.program
        check = (
            (f"max |logit diff| {p['max_abs_diff']:.2e} (atol {p['atol']:g}, rtol {p['rtol']:g}) on {p['verified_on']}")
            if p.get("max_abs_diff") is not None
            else "not verified"
        )
        rows = [
            ("source", self.model_uri),
            ("folder", str(self.out)),
            ("program", p["file"] + (f"  (fallback: {p['fallback_reason']})" if p.get("fallback_reason") else "")),
            ("check", check),
            ("files", ", ".join(sorted(self.files))),
            ("manifest", f"{SUMS} (sha256)"),
        ]
        return "export", rows


# ---------------------------------------------------------------------------- resolving the source


def resolve_bundle(model_uri: str, workspace: Path, dst: Path) -> tuple[Path, dict[str, str | None]]:
    """The bundle folder behind `model_uri` (under `dst`) and {run_id, model_name, model_version}.

    The same resolution as ``medxfer predict`` (medxfer.handoff.predict.resolve_model), except that a run
    must have been evaluated: a hand-off without its temperature and threshold would mislead.
    """
    from medxfer.handoff.predict import resolve_model

    if model_uri.startswith("runs:/"):
        from medxfer.handoff.registry import load_run, write_run_bundle

        run_id = model_uri.removeprefix("runs:/").strip("/").split("/")[0]
        ra = load_run(run_id, workspace, dst, require_evaluation=True)
        return write_run_bundle(ra, dst / "bundle"), {"run_id": run_id, "model_name": None, "model_version": None}
    src = resolve_model(model_uri, workspace, dst)
    if not (src.bundle / B.EVALUATION).is_file():
        raise StageError(
            f"{model_uri}: the bundle has no evaluation.json (its model was never evaluated); "
            "evaluate the training run and export runs:/RUN_ID or a model registered after that"
        )
    cfg = B.load_config(src.bundle)
    return src.bundle, {
        "run_id": cfg.get("run_id"),
        "model_name": src.name if src.kind == "registered" else None,
        "model_version": src.version,
    }


# ---------------------------------------------------------------------------- example input


def example_input(predictor: B.Predictor, workspace: Path) -> tuple[Any, str]:
    """A real preprocessed study when the workspace has the model's data, else a random tensor of the input shape.

    Only the verification uses it; it is never written to the hand-off folder (pixels can identify people).
    """
    import torch
    from medxfer.core.workspace import Workspace

    ws = Workspace.for_spec(workspace, predictor.config["spec"]["name"])
    if ws.manifest.is_file() and ws.splits.is_file():
        from medxfer.ingest.manifest import join

        try:
            rows = list(join(ws, select_fold=False).part("test").head(5).itertuples())
        except MedxferError:  # a split the manifest no longer matches: use the random input below
            rows = []
        for r in rows:
            try:
                return predictor.load(list(r.files), r.source_kind)[None], "a preprocessed test-split study"
            except Exception:  # try the next study; the reason may quote a path, so it is not shown
                continue
    shape = predictor.config["input"]["shape"] or [
        predictor.config["model"]["in_chans"],
        *[64] * predictor.config["model"]["spatial_dims"],
    ]
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
            torch.onnx.export(
                model,
                (batch,),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
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


def _run_figures(run_id: str | None, workspace: Path, dst: Path) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """The run's history and evaluate's PNGs (ROC, PR, reliability need per-study outputs the bundle lacks),
    from the workspace's store; nothing when there is no store or no such run (e.g. a copied bundle folder)."""
    from medxfer.core.workspace import Workspace

    uri = Workspace.for_spec(workspace, "_").tracking_uri
    if not run_id or (uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file()):
        return [], {}  # opening a missing sqlite store would create one in the user's workspace
    from medxfer import tracking
    from medxfer.evaluation.report import run_history

    dst.mkdir(parents=True, exist_ok=True)
    try:
        history = run_history(uri, run_id)
        got = tracking.download_run_artifact(uri, run_id, "evaluation", dst)
    except Exception as exc:  # the report is a convenience: an unreachable store must not stop the hand-off
        from medxfer.core import ui

        ui.warn(f"report.html without curves: the run's MLflow store could not be read ({type(exc).__name__})")
        return [], {}
    figures = {p.stem: p for p in sorted(got.glob("*.png"))} if got is not None and got.is_dir() else {}
    return history, figures


def write_report(folder: Path, run_id: str | None, workspace: Path, tmp: Path) -> Path:
    """report.html from the folder's evaluation.json and model_card.json (the card of this very hand-off)."""
    import json

    from medxfer.evaluation import report

    ev = json.loads((folder / B.EVALUATION).read_text())
    card = json.loads((folder / B.CARD_JSON).read_text()) if (folder / B.CARD_JSON).is_file() else None
    history, figures = _run_figures(run_id or ev.get("run_id"), workspace, tmp)
    return report.write_report(ev, history, card, folder / REPORT, figures)


def _readme(cfg: dict[str, Any], program: dict[str, Any], meta: dict[str, str | None], folder: str) -> str:
    classes = cfg["classes"]
    example = "study_folder/" if cfg["spec"]["source"]["kind"] == "dicom" else "scan.nii.gz"
    onnx = program["file"] == "model.onnx"
    title = f"{meta.get('model_name') or cfg['spec']['name']}" + (
        f" v{meta['model_version']}" if meta.get("model_version") else ""
    )
    decision = (
        f"`{cfg['positive_class']}` when `prob_{cfg['positive_class']} >= {cfg['threshold']:.4f}`"
        if cfg.get("threshold") is not None and cfg.get("positive_class")
        else "argmax"
    )
    views = program.get("tta_flip_dims") or []
    k = (cfg.get("model") or {}).get("ensemble_members")
    ensemble = f" (the mean of the logits of a fold ensemble of {k} models, all inside the program)" if k else ""
    mirrored = (
        f" (already the mean over the input and its {len(views)} mirror image(s), flipped along batch-tensor "
        f"dims {views}: test-time mirroring, as evaluated)"
        if views
        else ""
    )
    output = f"raw logits{ensemble}{mirrored}"
    run_program = (
        "import onnxruntime as ort\n"
        f'sess = ort.InferenceSession("{folder}/model.onnx")\n'
        'logits = sess.run(["logits"], {"input": x.numpy()})[0]'
        if onnx
        else f'import torch\nprog = torch.jit.load("{folder}/model.torchscript.pt")\nlogits = prog(x).detach().numpy()'
    )
    return f"""# {title}: medxfer hand-off

{cfg["task"]} classifier over {", ".join(classes)}; run {cfg.get("run_id")}. See `model_card.md` before use.
Check the files first: `sha256sum -c SHA256SUMS`.

## Predict in ten lines (with medxfer installed; no MLflow needed)

```python
from medxfer.handoff.bundle import Predictor

p = Predictor.from_dir("{folder}/")  # checks weights.safetensors against its SHA-256
df = p.predict(["{example}"])  # DICOM series folders or files, NIfTI files, or a CSV with a path column
print(df)  # input, {", ".join("prob_" + c for c in classes)}, decision, model_name, model_version, error
```

## The exported program ({program["file"]})

Input: float32 `{["batch", *(cfg["input"]["shape"] or ["C", "..."])]}`, preprocessed exactly as
`preprocessing.json` says (`Predictor.preprocess` does it). Output: {output}; divide by the temperature
{cfg["temperature"]:.4f}, add the bias {_bias(cfg)}, softmax, then decide: {decision}.

```python
import numpy as np
from medxfer.handoff.bundle import Predictor
x = Predictor.from_dir("{folder}/").preprocess("{example}")[None]   # (1, C, *spatial)
{run_program}
z = logits / {cfg["temperature"]:.6f} + np.array({_bias(cfg)})
prob = np.exp(z - z.max(1, keepdims=True)); prob /= prob.sum(1, keepdims=True)
```

Verified: {program.get("check_text")}.

## The evaluation at a glance

`report.html` (open it in any browser; nothing is fetched from the network): test metrics with 95% CIs, learning
curves, ROC and precision-recall curves, calibration, the confusion matrix at the threshold, the transfer gain
against a control, data counts and the model card's intended use and limitations.
"""


def _bias(cfg: dict[str, Any]) -> str:
    """The calibration bias as a Python list literal (zeros for a bundle from before temperature+bias)."""
    b = cfg.get("bias") or [0.0] * len(cfg["classes"])
    return "[" + ", ".join(f"{float(x):.6f}" for x in b) + "]"


def export(model_uri: str, out: Path, workspace: Path) -> ExportResult:
    import torch

    out = Path(out)
    ours = {*BUNDLE_FILES, "model.onnx", "model.torchscript.pt", "README.md", REPORT, SUMS}
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
        predictor = B.Predictor.from_dir(staging, device="cpu")
        model = predictor.inference_model  # the mirrored views go into the program, as evaluate scored them
        x, verified_on = example_input(predictor, Path(workspace))
        x = x.to(torch.float32)
        ok, diff, reason = export_onnx(model, x, staging / "model.onnx")
        if ok:
            program: dict[str, Any] = {"file": "model.onnx", "format": "onnx", "opset": OPSET}
        else:
            ts_ok, diff = export_torchscript(model, x, staging / "model.torchscript.pt")
            if not ts_ok:
                raise StageError(
                    f"neither ONNX ({reason}) nor TorchScript reproduces the eager model "
                    f"(max diff {diff:.2e}); the weights are fine, the network cannot be exported"
                )
            program = {"file": "model.torchscript.pt", "format": "torchscript", "fallback_reason": reason}
        program["tta_flip_dims"] = [list(v) for v in getattr(model, "views", [])]
        program.update(
            max_abs_diff=diff,
            atol=ONNX_ATOL,
            rtol=ONNX_RTOL,
            verified_on=verified_on,
            check_text=f"max |logit difference| {diff:.2e} vs eager PyTorch (tolerance atol "
            f"{ONNX_ATOL:g} + rtol {ONNX_RTOL:g}) on {verified_on}",
        )
        (staging / "README.md").write_text(_readme(predictor.config, program, meta, out.name))
        write_report(staging, meta.get("run_id"), Path(workspace), Path(tmp) / "report-inputs")
        files = write_sums(staging)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, out)
    return ExportResult(
        out.resolve(), model_uri, meta.get("run_id"), meta.get("model_name"), meta.get("model_version"), program, files
    )
