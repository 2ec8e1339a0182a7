"""MLflow's basic-auth app in front of the PostgreSQL store: who may review, register and promote.

The admin (a random, non-default password) creates the experiment and two users: ``manager`` with MANAGE on it
trains and registers, ``reader`` with READ on it and on the registered model reviews. medxfer takes credentials only
from MLflow's variables or a 0600 ``~/.mlflow/credentials``; a 401/403 is one line naming the missing permission.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import pytest
from helpers import PHI, make_dicom2d_dataset, write_image2d
from medxfer.cli import app
from servers import Stack, rest, tracking_stack
from test_mlflow_server import SERVER_RECIPE
from typer.testing import CliRunner

pytestmark = pytest.mark.slow
MODEL = "auth-us"
USERS = {"manager": secrets.token_urlsafe(12), "reader": secrets.token_urlsafe(12)}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    with tracking_stack(tmp_path_factory.mktemp("auth-stack"), auth=True) as st:
        yield st


def as_user(mp: pytest.MonkeyPatch, url: str, user: str | None, home: Path) -> None:
    """The environment a user's shell has: the server's URI and, for a user, MLflow's two variables."""
    for k in [k for k in os.environ if k.startswith("MLFLOW_")]:
        mp.delenv(k)
    mp.setenv("MLFLOW_TRACKING_URI", url)
    mp.setenv("MEDXFER_SYSTEM_METRICS", "0")
    mp.setenv("HOME", str(home))  # no ~/.mlflow/credentials of the machine's own user
    mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refusal is final; do not retry it
    if user:
        mp.setenv("MLFLOW_TRACKING_USERNAME", user)
        mp.setenv("MLFLOW_TRACKING_PASSWORD", USERS[user])


@pytest.fixture(scope="module")
def setup(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from medxfer.runall import run_all

    tmp = tmp_path_factory.mktemp("auth-run")
    ds = make_dicom2d_dataset(tmp / "d2")
    for user, pw in USERS.items():
        stack.create_user(user, pw)
    status, exp = rest(stack.url, "/api/2.0/mlflow/experiments/create", "POST", {"name": ds.spec.name}, stack.admin)
    assert status == 200, exp
    stack.grant("manager", "experiment", exp["experiment_id"], "MANAGE")
    stack.grant("reader", "experiment", exp["experiment_id"], "READ")
    with pytest.MonkeyPatch.context() as mp:
        as_user(mp, stack.url, "manager", tmp)
        result = run_all(
            ds.spec, ds.workspace, overrides=[*SERVER_RECIPE, "promotion.min_auroc_ci_low=0.0"], name=MODEL
        )
    s = result.summary()
    # The creator of a registered model gets MANAGE on it; a reviewer is granted READ.
    stack.grant("reader", "registered_model", MODEL, "READ")
    return {"dataset": ds, "summary": s, "tmp": tmp, "experiment_id": exp["experiment_id"]}


def cli(mp: pytest.MonkeyPatch, stack: Stack, user: str | None, args: list[Any], home: Path):
    as_user(mp, stack.url, user, home)
    res = CliRunner().invoke(app, [str(a) for a in args])
    with (home / "commands.log").open("a") as f:
        f.write(f"$ {user} medxfer {' '.join(map(str, args))}\n{res.output}\n")
    return res


def one_line(res) -> str:
    """The refusal: the command's last line, its only error line, and no traceback (progress lines may precede)."""
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert errors == lines[-1:], res.output
    return lines[-1]


def test_unauthenticated_client_is_refused(stack: Stack, setup: dict[str, Any], monkeypatch) -> None:
    run_id = setup["summary"]["run_id"]
    status, _ = rest(stack.url, "/api/2.0/mlflow/runs/get", run_id=run_id)
    assert status == 401
    assert rest(stack.url, "/api/2.0/mlflow/runs/get", auth=("reader", "wrong-password"), run_id=run_id)[0] == 401
    ws = setup["dataset"].workspace
    line = one_line(cli(monkeypatch, stack, None, ["promote", MODEL, "1", "--workspace", ws], setup["tmp"]))
    assert "401 not authenticated" in line and "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in line


def test_reader_reviews_but_cannot_register_or_promote(stack: Stack, setup: dict[str, Any], monkeypatch) -> None:
    s, tmp, ws = setup["summary"], setup["tmp"], setup["dataset"].workspace
    reader = ("reader", USERS["reader"])
    status, run = rest(stack.url, "/api/2.0/mlflow/runs/get", auth=reader, run_id=s["run_id"])
    assert status == 200 and run["run"]["info"]["status"] == "FINISHED"
    status, listed = rest(
        stack.url, "/api/2.0/mlflow/artifacts/list", auth=reader, run_id=s["run_id"], path="evaluation"
    )
    assert status == 200 and listed["files"]
    status, rm = rest(stack.url, "/api/2.0/mlflow/registered-models/get", auth=reader, name=MODEL)
    assert status == 200 and rm["registered_model"]["name"] == MODEL

    line = one_line(cli(monkeypatch, stack, "reader", ["register", s["run_id"], "--name", MODEL, "-w", ws], tmp))
    assert "denied user 'reader' (403)" in line and "EDIT on the run's experiment" in line, line
    line = one_line(cli(monkeypatch, stack, "reader", ["promote", MODEL, s["model_version"], "-w", ws], tmp))
    assert f"EDIT on registered model '{MODEL}'" in line, line
    status, rm = rest(stack.url, "/api/2.0/mlflow/registered-models/get", auth=reader, name=MODEL)
    assert "champion" not in {a["alias"] for a in rm["registered_model"].get("aliases", [])}
    # Reading is all a reviewer needs to use the model: predict downloads it with READ.
    study = write_image2d(tmp / "new" / "S1" / "IM1")
    res = cli(
        monkeypatch,
        stack,
        "reader",
        ["predict", f"models:/{MODEL}/1", study.parent, "--out", tmp / "p.csv", "-w", tmp / "pws"],
        tmp,
    )
    assert res.exit_code == 0, res.output


def test_manager_registers_and_promotes(stack: Stack, setup: dict[str, Any], monkeypatch) -> None:
    s, tmp, ws = setup["summary"], setup["tmp"], setup["dataset"].workspace
    # `medxfer run` in the fixture registered version 1 as manager: MANAGE on the experiment was enough to log the
    # model into it and create the registered model (a second `register` would cost another ~30 s of CPU).
    assert s["model_name"] == MODEL and s["model_version"] == "1"
    status, mv = rest(stack.url, "/api/2.0/mlflow/model-versions/get", auth=stack.admin, name=MODEL, version="1")
    assert status == 200 and mv["model_version"]["run_id"] == s["run_id"] and mv["model_version"]["status"] == "READY"
    res = cli(monkeypatch, stack, "manager", ["promote", MODEL, "1", "--alias", "champion", "-w", ws], tmp)
    assert res.exit_code == 0, res.output
    status, rm = rest(stack.url, "/api/2.0/mlflow/registered-models/get", auth=stack.admin, name=MODEL)
    assert {"alias": "champion", "version": "1"} in rm["registered_model"]["aliases"]


def test_credentials_come_from_a_private_file_only(stack: Stack, setup: dict[str, Any], monkeypatch, tmp_path) -> None:
    from medxfer import tracking
    from medxfer.core.errors import StageError

    s = setup["summary"]
    creds = tmp_path / ".mlflow" / "credentials"
    creds.parent.mkdir()
    creds.write_text(f"[mlflow]\nmlflow_tracking_username = reader\nmlflow_tracking_password = {USERS['reader']}\n")
    creds.chmod(0o644)
    as_user(monkeypatch, stack.url, None, tmp_path)
    with pytest.raises(StageError, match=r"other users can read it \(mode 0644\); fix: chmod 600"):
        tracking.get_run(stack.url, s["run_id"])
    creds.chmod(0o600)
    assert tracking.get_run(stack.url, s["run_id"])["status"] == "FINISHED"
    # Never in the URI, where summaries and logs would print it:
    leaky = stack.url.replace("http://", f"http://reader:{USERS['reader']}@")
    with pytest.raises(StageError, match="carries credentials") as err:
        tracking.get_run(leaky, s["run_id"])
    assert USERS["reader"] not in str(err.value)


def test_no_phi_or_credential_in_databases_artifacts_or_logs(stack: Stack, setup: dict[str, Any], tmp_path) -> None:
    from medxfer.io.phi import scan_for_phi

    dumps = []
    for db in stack.databases():
        dumps.append(tmp_path / f"{db}.sql")
        dumps[-1].write_text(stack.pg.dump(db))
    assert "reader" in dumps[-1].read_text()  # the auth store holds the users (as password hashes)
    logs = [setup["tmp"] / "commands.log", stack.server.log, stack.pg.log]
    credentials = [*stack.secrets, *USERS.values()]
    assert scan_for_phi([*dumps, stack.root / "artifacts", *logs], [*PHI.values(), *credentials]) == []
    # The workspace holds the pseudonym map (PHI by design), so only the credentials are looked for there.
    assert scan_for_phi(setup["dataset"].workspace, credentials) == []


def test_refusal_messages_without_a_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mapping itself, where PostgreSQL is missing: MLflow's 401/403 exceptions become the one-line errors."""
    import requests
    from medxfer.tracking.tracker import check_credentials, needed_permission, permission_error
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, UNAUTHENTICATED

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    denied = MlflowException("API request to endpoint ... failed with error code 403", error_code=PERMISSION_DENIED)
    needs = needed_permission("set_registered_model_alias", ("breast-us", "champion", "3"))
    err = permission_error(denied, "https://mlflow.example.org", needs)
    assert str(err) == (
        "MLflow server https://mlflow.example.org denied user 'bob' (403): this needs EDIT on registered model "
        "'breast-us' (MANAGE to grant it to others); fix: ask the server's admin to grant it (docs/deploy.md, "
        "Permissions)"
    )
    response = requests.Response()
    response.status_code = 401
    upload = requests.HTTPError("401 Client Error", response=response)  # what an artifact upload raises
    assert "401 not authenticated" in str(permission_error(upload, "https://h", needed_permission("log_artifact")))
    assert permission_error(MlflowException("x", error_code=UNAUTHENTICATED), "https://h", "") is not None
    assert permission_error(MlflowException("no such run"), "https://h", "") is None  # other failures stay theirs
    assert needed_permission("create_run") == "EDIT on the experiment (the run and its logged models)"
    assert needed_permission("get_model_version", ("m", "1")) == "READ on registered model 'm'"

    check_credentials("https://mlflow.example.org")  # no file: fine
    with pytest.raises(Exception, match="carries credentials; fix: set it to https://h:8443/x") as e:
        check_credentials("https://bob:s3cret@h:8443/x")
    assert "s3cret" not in str(e.value)
