"""The ``medxfer`` command line: one thin command per stage. Parse, call a typed function, print.

No logic lives here. Stage modules are imported inside each command so that
``medxfer --help`` stays fast and heavy imports (torch, mlflow) load only when used.

No error reaches the user as a traceback: a ``MedxferError`` (bad spec, recipe, flag, file or data)
prints ``error: <message with the fix>`` and exits with its code; anything else is a bug and prints
``internal error: <type>; rerun with --debug ...`` (no message: it may quote a path) and exits 1.
``medxfer --debug CMD`` (or ``MEDXFER_DEBUG=1``) prints the full traceback first. Usage errors stay typer's own.
"""

from __future__ import annotations

import errno
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from medxfer.core.errors import MedxferError
from medxfer.core.workspace import DEFAULT_WORKSPACE
from typer.core import TyperGroup

DEBUG_ENV = "MEDXFER_DEBUG"
DISK_FULL = (
    "no space left on the device (errno 28); free space where --workspace lies, or give another --workspace, "
    "then rerun: the outputs of the last complete run are unchanged (docs/faults.md)"
)


class _Commands(TyperGroup):
    """Turns every error of a command into one line on stderr (and the traceback too under --debug)."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort):  # usage errors, exits: typer's own handling
            raise
        except MedxferError as exc:
            _report(ctx, exc, "error:", str(exc))
            raise typer.Exit(exc.exit_code) from None
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # An environment problem, not a bug (issue 14: "OSError: [Errno 28]"). Workspace files are replaced
                # whole (temp file, then rename), so what the last complete stage wrote is still there.
                _report(ctx, exc, "error:", DISK_FULL)
                raise typer.Exit(1) from None
            # The type only: a library's message (an OSError's, say) may quote a source path, and sites name
            # folders after patients. --debug shows the whole message and traceback on the user's own terminal.
            what = type(exc).__name__
            _report(ctx, exc, "internal error:", f"{what}; rerun with --debug for the traceback, and report it")
            raise typer.Exit(1) from None


def _report(ctx: typer.Context, exc: BaseException, prefix: str, message: str) -> None:
    from medxfer.core import ui
    from rich.text import Text

    if ctx.params.get("debug"):
        ui.console.print("".join(traceback.format_exception(exc)), markup=False, highlight=False, end="")
    # One unwrapped line (a wrapped one reads as several messages); Text, not markup: messages hold [brackets].
    ui.console.print(Text.assemble((prefix, "red"), " ", message), soft_wrap=True)


app = typer.Typer(
    cls=_Commands,
    name="medxfer",
    help="Transfer learning for medical images: ingest -> split -> train -> evaluate -> register -> predict/export.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)

Workspace = Annotated[Path, typer.Option("--workspace", "-w", help="Folder for all stage outputs.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON summary object on stdout.")]
SpecArg = Annotated[Path, typer.Argument(help="Data spec YAML (see data_specs/template.yaml).")]
# Keys are dotted paths into the recipe (`optim.lr`, not `lr`); an unknown key's error names the closest one.
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a recipe key, as dotted.key=value; repeatable, e.g. `--set optim.lr=3e-4 --set epochs=8`.",
    ),
]
Device = Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")]
Control = Annotated[str | None, typer.Option(help="Also train a control arm: scratch or probe.")]


def _version_line() -> str:
    """medxfer's version and the two that decide whether a bundle loads elsewhere, read without importing them."""
    from importlib.metadata import PackageNotFoundError, version

    def v(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    return f"medxfer {v('medxfer')} (torch {v('torch')}, mlflow {v('mlflow')})"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(_version_line())
        raise typer.Exit()


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", envvar=DEBUG_ENV, help="On an error, also print the full traceback.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the medxfer, torch and mlflow versions."
        ),
    ] = False,
) -> None:
    """Options for every command; errors are handled by `_Commands`."""


def _run(fn, as_json: bool):
    """Call the stage and print its summary (table, or JSON on stdout); errors are `_Commands`' business."""
    from medxfer.core import ui

    result = fn()
    if result is not None:
        ui.finish(result, as_json)
    return result


@app.command(epilog="Example: `medxfer demo --out demo-data` then `medxfer run data_specs/breastmnist_demo.yaml`")
def demo(
    out: Annotated[Path, typer.Option(help="Where to write the demo DICOM/NIfTI trees.")] = Path("demo-data"),
    limit: Annotated[int | None, typer.Option(help="Write only the first N studies per split (quick tries).")] = None,
    json: Json = False,
) -> None:
    """Write the bundled BreastMNIST (DICOM) and AdrenalMNIST3D (NIfTI) demo datasets to disk."""
    from medxfer.demo import write_demo

    _run(lambda: write_demo(out, limit=limit), json)


@app.command("check-spec", epilog="Example: `medxfer check-spec data_specs/breastmnist_demo.yaml`")
def check_spec(spec: SpecArg, json: Json = False) -> None:
    """Validate a data spec without reading any image."""
    from medxfer.config.spec import check_spec_command

    _run(lambda: check_spec_command(spec), json)


@app.command(epilog="Example: `medxfer ingest data_specs/breastmnist_demo.yaml --workspace medxfer-work`")
def ingest(
    spec: SpecArg,
    workspace: Workspace = DEFAULT_WORKSPACE,
    strict: Annotated[bool, typer.Option(help="Fail if any input is rejected.")] = False,
    workers: Annotated[int | None, typer.Option(help="Header-reading threads (default: CPU count).")] = None,
    json: Json = False,
) -> None:
    """Scan DICOM/NIfTI, select series, check geometry, pseudonymise, and write the manifest and rejects."""
    from medxfer.config.spec import load_spec
    from medxfer.ingest.ingest import ingest as run_ingest

    _run(lambda: run_ingest(load_spec(spec), workspace, strict=strict, workers=workers), json)


@app.command(epilog="Example: `medxfer split data_specs/breastmnist_demo.yaml --workspace medxfer-work`")
def split(spec: SpecArg, workspace: Workspace = DEFAULT_WORKSPACE, json: Json = False) -> None:
    """Patient-grouped, stratified, duplicate-aware train/val/test split (or k folds)."""
    from medxfer.config.spec import load_spec
    from medxfer.ingest.split import split as run_split

    _run(lambda: run_split(load_spec(spec), workspace), json)


@app.command(epilog="Example: `medxfer plan data_specs/breastmnist_demo.yaml --budget 30m`")
def plan(
    spec: SpecArg,
    workspace: Workspace = DEFAULT_WORKSPACE,
    budget: Annotated[str, typer.Option(help="Wall-clock budget for training, e.g. 30m, 90s, 1.5h.")] = "30m",
    json: Json = False,
) -> None:
    """Fingerprint the ingested data and this machine; write plan.json and a recipe per arm, each decision with
    its reason (input size, resampling, encoder, batch size, loss, arms, folds, epochs)."""
    from medxfer.config.spec import load_spec
    from medxfer.planning.plan import plan as run_plan

    _run(lambda: run_plan(load_spec(spec), workspace, budget), json)


@app.command("models", epilog="Example: `medxfer models --json`")
def list_models(json: Json = False) -> None:
    """List registered encoders, their dims, parameter counts, weight sources and layer groups."""
    from medxfer.models.catalog import models_command

    _run(models_command, json)


OfflineTracking = Annotated[
    bool,
    typer.Option(
        "--offline-tracking",
        help="Do not contact the MLflow server: spool the run in the workspace; `medxfer sync` sends it later.",
    ),
]


@app.command(
    epilog=(
        "Examples: `medxfer train data_specs/breastmnist_demo.yaml`; "
        "`medxfer train SPEC --set epochs=4 --set optim.lr=3e-4`; `medxfer train SPEC --resume`; "
        "`medxfer train SPEC --control scratch`"
    )
)
def train(
    spec: SpecArg,
    workspace: Workspace = DEFAULT_WORKSPACE,
    recipe: Annotated[Path | None, typer.Option(help="Recipe YAML; default: the packaged 2D/3D recipe.")] = None,
    set_: SetOpt = None,
    weights: Annotated[Path | None, typer.Option(help="Local pretrained weights file for the encoder.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the last unfinished run of this spec.")] = False,
    control: Control = None,
    device: Device = None,
    fold: Annotated[int | None, typer.Option(help="Validation fold when the spec splits into k folds.")] = None,
    offline_tracking: OfflineTracking = False,
    json: Json = False,
) -> None:
    """Train a classifier with progressive unfreezing and focal loss; log everything to MLflow."""
    from medxfer.config.spec import load_spec
    from medxfer.training.stage import train as run_train

    def go():
        res = run_train(
            load_spec(spec),
            workspace,
            recipe=recipe,
            overrides=set_ or [],
            weights=weights,
            resume=resume,
            control=control,
            device=device,
            fold=fold,
            offline_tracking=offline_tracking,
        )
        return res if res.rank == 0 else None  # under torchrun, rank 0 alone prints the summary

    _run(go, json)


@app.command(epilog="Example: `medxfer sync --workspace medxfer-work` once the MLflow server answers again")
def sync(workspace: Workspace = DEFAULT_WORKSPACE, json: Json = False) -> None:
    """Send what runs spooled in the workspace (server gone mid-run, or --offline-tracking) to the MLflow server."""
    from medxfer import tracking
    from medxfer.core.workspace import Workspace as Ws

    uri = Ws.for_spec(workspace, "_").tracking_uri
    _run(lambda: tracking.sync_spool(tracking.Spool.for_workspace(workspace), uri), json)


@app.command(epilog="Example: `medxfer evaluate 3f2a... --workspace medxfer-work --json`")
def evaluate(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of a training run.")],
    workspace: Workspace = DEFAULT_WORKSPACE,
    bootstrap: Annotated[
        int | None,
        typer.Option(help="Patient-level bootstrap resamples (default: the run's recipe, evaluation.bootstrap)."),
    ] = None,
    json: Json = False,
) -> None:
    """Test metrics with patient-bootstrap CIs, validation threshold, temperature calibration, plots."""
    from medxfer.evaluation.evaluate import evaluate as run_evaluate

    _run(lambda: run_evaluate(run_id, workspace, n_bootstrap=bootstrap), json)


Force = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Set alias 'candidate' even when the registration guard withholds it (the override is recorded).",
    ),
]


@app.command(epilog="Example: `medxfer register 3f2a... --name breast-us`")
def register(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of an evaluated training run.")],
    name: Annotated[str, typer.Option(help="Registered model name.")],
    workspace: Workspace = DEFAULT_WORKSPACE,
    force: Force = False,
    json: Json = False,
) -> None:
    """Register the run's model as an MLflow pyfunc with alias 'candidate' and its model card.

    The guard withholds 'candidate' (and tags medxfer.warning) when the validation AUROC CI includes 0.5, the
    temperature fit ended on a bound, or the test decisions collapse to one class."""
    from medxfer.handoff.registry import register as run_register

    _run(lambda: run_register(run_id, name, workspace, force=force), json)


@app.command(epilog="Example: `medxfer promote breast-us 3 --alias champion`")
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[int, typer.Argument(help="Model version.")],
    alias: Annotated[str, typer.Option(help="Alias to set.")] = "champion",
    workspace: Workspace = DEFAULT_WORKSPACE,
    json: Json = False,
) -> None:
    """Set an alias on a model version, refusing when the recipe's promotion floors are not met."""
    from medxfer.handoff.registry import promote as run_promote

    _run(lambda: run_promote(name, version, alias, workspace), json)


@app.command(
    epilog=(
        "Examples: `medxfer predict models:/breast-us@candidate new_studies/ --out preds.csv`; "
        "`medxfer predict export/ scan.nii.gz --saliency cams/`"
    )
)
def predict(
    model_uri: Annotated[str, typer.Argument(help="models:/NAME@alias, runs:/RUN_ID, or an exported folder.")],
    inputs: Annotated[list[Path], typer.Argument(help="Study folders, DICOM/NIfTI files, or a CSV of paths.")],
    out: Annotated[Path, typer.Option(help="Output CSV.")] = Path("preds.csv"),
    saliency: Annotated[Path | None, typer.Option(help="Write Grad-CAM maps to this folder.")] = None,
    echo_input: Annotated[
        bool,
        typer.Option(
            "--echo-input",
            help="Add an 'input' column with your input paths (they may name patients); "
            "by default rows carry only a row number and a pseudonym of the input.",
        ),
    ] = False,
    workspace: Workspace = DEFAULT_WORKSPACE,
    json: Json = False,
) -> None:
    """Predict on new studies with exactly the training preprocessing."""
    from medxfer.handoff.predict import predict as run_predict

    _run(
        lambda: run_predict(model_uri, inputs, out, saliency=saliency, workspace=workspace, echo_input=echo_input),
        json,
    )


@app.command(epilog="Example: `medxfer export models:/breast-us@champion --out handoff/`")
def export(
    model_uri: Annotated[str, typer.Argument(help="models:/NAME@alias or runs:/RUN_ID.")],
    out: Annotated[Path, typer.Option(help="Hand-off folder to create.")],
    workspace: Workspace = DEFAULT_WORKSPACE,
    json: Json = False,
) -> None:
    """Write a hand-off folder: safetensors, ONNX, preprocessing JSON, model card, SHA-256 manifest."""
    from medxfer.handoff.export import export as run_export

    _run(lambda: run_export(model_uri, out, workspace=workspace), json)


@app.command(
    "run",
    epilog=(
        "Examples: `medxfer run data_specs/breastmnist_demo.yaml --json`; "
        "`medxfer run SPEC --set epochs=4 --set optim.lr=3e-4 --device cpu`; `medxfer run SPEC --resume`; "
        "`medxfer run SPEC --auto --budget 30m`"
    ),
)
def run_all(
    spec: SpecArg,
    workspace: Workspace = DEFAULT_WORKSPACE,
    recipe: Annotated[Path | None, typer.Option(help="Recipe YAML; default: the packaged recipe.")] = None,
    set_: SetOpt = None,
    name: Annotated[str | None, typer.Option(help="Registered model name (default: the spec name).")] = None,
    resume: Annotated[
        bool,
        typer.Option(help="Continue this spec's unfinished training run (no new ingest or split), then evaluate it."),
    ] = False,
    control: Control = None,
    device: Device = None,
    force: Force = False,
    offline_tracking: OfflineTracking = False,
    auto: Annotated[
        bool,
        typer.Option(
            "--auto", help="Plan, race transfer/progressive/probe/scratch on k folds, register the fold ensemble."
        ),
    ] = False,
    budget: Annotated[str | None, typer.Option(help="With --auto: wall-clock budget, e.g. 30m (default).")] = None,
    json: Json = False,
) -> None:
    """ingest -> split -> train -> evaluate -> register, in one command (`--auto`: plan -> arm race -> ensemble)."""
    from medxfer.config.spec import load_spec
    from medxfer.core import ui
    from medxfer.runall import run_all as run_pipeline

    if auto:
        from medxfer.autorun import auto_run

        if resume or control or recipe is not None or offline_tracking:
            raise MedxferError(
                "--auto plans its own recipes and arms: drop --recipe, --resume, --control and "
                "--offline-tracking (--set still applies to every arm)"
            )
        res = _run(
            lambda: auto_run(load_spec(spec), workspace, budget or "30m", name, set_ or [], device=device, force=force),
            json,
        )
        ui.console.print(f"Review the runs and the registered model: {res.ui_command}", soft_wrap=True, markup=False)
        return
    if budget is not None:
        raise MedxferError("--budget goes with --auto: `medxfer run SPEC --auto --budget 30m`")
    result = _run(
        lambda: run_pipeline(
            load_spec(spec),
            workspace,
            recipe=recipe,
            overrides=set_ or [],
            name=name,
            device=device,
            resume=resume,
            control=control,
            force=force,
            offline_tracking=offline_tracking,
        ),
        json,
    )
    # Last, on one unwrapped line, so it can be copied as is (the table wraps long paths).
    ui.console.print(f"Review the run and the registered model: {result.ui_command}", soft_wrap=True, markup=False)


@app.command("ui", epilog="Example: `medxfer ui --workspace medxfer-work` then open http://127.0.0.1:5000")
def mlflow_ui(
    workspace: Workspace = DEFAULT_WORKSPACE,
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface; 0.0.0.0 exposes the runs to the network.")] = "127.0.0.1",
) -> None:
    """Browse the workspace's runs and models in the MLflow UI (its store, or MLFLOW_TRACKING_URI); Ctrl-C stops."""
    import socket
    import subprocess

    from medxfer.core import ui
    from medxfer.core.workspace import Workspace as Ws
    from medxfer.tracking.tracker import ui_server_argv

    uri = Ws.for_spec(workspace, "_").tracking_uri
    if uri.startswith(("http://", "https://")):
        raise MedxferError(f"the store is already a server: open {uri} in a browser (MLFLOW_TRACKING_URI is set)")
    db = Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("sqlite:///") and not db.is_file():
        raise MedxferError(f"no MLflow store at {db}; run a stage first, or pass the --workspace it used")
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            raise MedxferError(f"{host}:{port} is in use or not available; pick another with --port") from None
    # One unwrapped line: the URL must stay clickable and copyable.
    ui.console.print(
        f"MLflow UI for {uri} at http://{host}:{port} (starts in ~20 s; Ctrl-C stops it)", soft_wrap=True, markup=False
    )
    try:
        code = subprocess.call(ui_server_argv(uri, host, port))
    except KeyboardInterrupt:
        code = 0
    if code:
        raise typer.Exit(code)


def main() -> None:  # pragma: no cover - console entry for `python -m medxfer`
    sys.exit(app())
