"""Screenshots of the MLflow UI on a medxfer workspace, with headless Chromium.

    python docs/screenshots.py --workspace medxfer-work --out docs/screenshots/

Starts ``medxfer ui`` on the workspace's store (a free port, stopped again at the end), finds the registered model
(the newest one, or ``--model NAME``) and the run behind its newest version through the REST API, and writes four
PNGs: ``run-overview.png``, ``model-metrics.png``, ``registered-model.png`` and ``report.png`` (the run's
``evaluation/report.html`` in MLflow's artifact viewer). tests/test_screenshots.py runs the same code on the suite's
registered run. Needs ``chromium`` on PATH (Debian/Ubuntu: ``apt-get install -y chromium``) and medxfer importable by
this interpreter (``.venv/bin/python docs/screenshots.py ...``); Pillow, when present, shrinks the PNGs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

STARTUP_S = 120  # the UI is up in ~20 s on an idle 2-core machine; generous for a loaded CI runner
WINDOW = (1400, 1000)  # below ~1300 px MLflow's run page folds its side panel under the content
WIDTH = 1200  # README width: under ~300 KB a PNG
PAGES = ("run-overview", "model-metrics", "registered-model", "report")
REPORT_ARTIFACT = "evaluation/report.html"
# Text typed into a page's search box before the capture. The model-metrics tab draws one section per metric prefix,
# alphabetically: best/ and eval/ (single points) would fill the first screen; "/loss" keeps the train/ and val/
# sections, one loss curve each (not best/val_loss).
SEARCH = {"model-metrics": "/loss"}
_FOCUS_SEARCH = """(() => {
  const i = document.querySelector('input[placeholder^="Search"]');
  if (!i) return false;
  i.focus();
  return true;
})()"""
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_MISSING = (
    "headless Chromium not found on PATH (looked for " + ", ".join(CHROMIUM_NAMES) + "): install it with "
    "`apt-get install -y chromium` (Debian/Ubuntu; `apt-get update` first on a fresh machine) or "
    "`brew install --cask chromium` (macOS)"
)
# This machine, and a CI runner, may have no network: Chromium must not try to phone home (it stalls the page).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # root in a container has no user namespace for the sandbox
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def chromium() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, **params: object) -> dict:
    with urllib.request.urlopen(f"{url}?{urllib.parse.urlencode(params)}", timeout=30) as r:
        return json.loads(r.read())


def api(base: str, endpoint: str, **params: object) -> dict:
    """One MLflow REST call (GET), e.g. ``api(url, "runs/get", run_id=...)``."""
    return get_json(f"{base}/api/2.0/mlflow/{endpoint}", **params)


def ui_env() -> dict[str, str]:
    # The workspace's own store, not whatever MLFLOW_TRACKING_URI the caller's shell points at.
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}


@contextlib.contextmanager
def serve_ui(
    workspace: Path, log_path: Path, env: dict[str, str] | None = None, startup_s: float = STARTUP_S
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``medxfer ui --workspace`` on a free port, up (``/health`` answers) before the body runs; the process group
    (medxfer, mlflow, its uvicorn worker) is stopped on the way out. Yields the base URL and the process."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "medxfer", "ui", "--workspace", str(workspace), "--port", str(port)]
    with log_path.open("w") as log:
        # Own session: stopping the group stops all three processes.
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=ui_env() if env is None else env,
            cwd=log_path.parent,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + startup_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"medxfer ui exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"medxfer ui not up after {startup_s} s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            yield url, proc
        finally:
            stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # mlflow's workers (uvicorn, two huey consumers) outlive medxfer by a few seconds: wait for the whole group.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@dataclass(frozen=True)
class Target:
    experiment_id: str
    run_id: str
    model_name: str
    model_version: str


def find_target(url: str, model: str | None = None) -> Target:
    """The registered model (`model`, else the most recently updated one), its newest version and that run."""
    models = api(url, "registered-models/search", max_results=1000).get("registered_models", [])
    if model is not None:
        models = [m for m in models if m["name"] == model]
    if not models:
        raise SystemExit(f"no registered model{f' named {model!r}' if model else ''} in this store: run `medxfer run`")
    m = max(models, key=lambda m: int(m.get("last_updated_timestamp", 0)))
    versions = api(url, "model-versions/search", filter=f"name='{m['name']}'", max_results=1000)["model_versions"]
    v = max(versions, key=lambda v: int(v["version"]))
    run = api(url, "runs/get", run_id=v["run_id"])["run"]
    return Target(run["info"]["experiment_id"], v["run_id"], m["name"], str(v["version"]))


def page_urls(url: str, t: Target) -> dict[str, str]:
    """MLflow 3.17's hash routes (its JS bundle): run page tabs, the registered model, an artifact in the viewer."""
    run = f"{url}/#/experiments/{t.experiment_id}/runs/{t.run_id}"
    return {
        "run-overview": run,
        "model-metrics": f"{run}/model-metrics",
        "registered-model": f"{url}/#/models/{urllib.parse.quote(t.model_name)}",
        "report": f"{run}/artifacts/{REPORT_ARTIFACT}",
    }


class _Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: commands on fd 3,
    replies on fd 4, NUL-terminated JSON): no websocket client needed, and no port to find."""

    def __init__(self, browser: str, window: tuple[int, int]) -> None:
        self._profile = tempfile.TemporaryDirectory(prefix="medxfer-chromium-")
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()

        def fds() -> None:  # in the child, before exec: the pipe ends where Chromium looks for them
            os.dup2(cmd_r, 3)
            os.dup2(res_w, 4)

        argv = [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={self._profile.name}",  # a fresh profile: no state from an earlier run or user
            f"--window-size={window[0]},{window[1]}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,  # fds 3 and 4 must survive exec; os.pipe's own fds are close-on-exec anyway
            preexec_fn=fds,
        )
        os.close(cmd_r)
        os.close(res_w)
        self._buf = b""
        self._id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=window[0],
            height=window[1],
            deviceScaleFactor=1,
            mobile=False,
            session=True,
        )

    def call(self, method: str, session: bool = False, **params: object) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self._session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._res_r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the DevTools pipe during {method}")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:  # events (no id) are not needed
                if "error" in reply:
                    raise RuntimeError(f"DevTools {method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, js: str) -> object:
        return self.call("Runtime.evaluate", expression=js, returnByValue=True, session=True)["result"].get("value")

    def capture(self) -> bytes:
        import base64

        return base64.b64decode(self.call("Page.captureScreenshot", format="png", session=True)["data"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close")
        for fd in (self._cmd_w, self._res_r):
            os.close(fd)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._profile.cleanup()


# UI preferences MLflow 3.17 keeps in localStorage (``<key>_v<version>``, JSON values), set before its scripts run:
# the "Model training" sidebar rather than the default "GenAI" one, and no Assistant panel auto-opened on a first
# visit (it hides a third of the page).
UI_PREFS = {
    "mlflow.workflowType_v1": "machine_learning",
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
    "mlflow.assistant.panelOpen_v1": False,
}
_SET_PREFS = "".join(
    f"localStorage.setItem({json.dumps(k)}, {json.dumps(json.dumps(v))});" for k, v in UI_PREFS.items()
)


@dataclass(frozen=True)
class Shot:
    png: Path
    text: str  # the page's visible text (top document) when captured: what a test can check the picture by


def capture(
    pages: dict[str, str],
    out: Path,
    browser: str | None = None,
    window: tuple[int, int] = WINDOW,
    timeout_s: float = 45,
    search: dict[str, str] = SEARCH,
) -> dict[str, Shot]:
    """``out/<name>.png`` for each page, in one Chromium. A page is captured once it is drawn: two captures 1 s
    apart are identical (no spinner turning, no chart still coming in), after at least 3 s; the last capture when
    it never settles within `timeout_s`. `search`: text typed into a page's search box first."""
    browser = browser or chromium()
    if browser is None:
        raise SystemExit(CHROMIUM_MISSING)
    out.mkdir(parents=True, exist_ok=True)
    shots = {}
    c = _Chromium(browser, window)
    try:
        c.call("Page.enable", session=True)  # without it the script below never runs
        c.call("Page.addScriptToEvaluateOnNewDocument", source=_SET_PREFS, session=True)
        for name, url in pages.items():
            c.call("Page.navigate", url="about:blank", session=True)  # a hash route alone would not reload the app
            c.call("Page.navigate", url=url, session=True)
            start = time.monotonic()
            last = b""
            typed = name not in search
            while True:
                time.sleep(1.0)
                if not typed and c.evaluate(_FOCUS_SEARCH):
                    c.call("Input.insertText", text=search[name], session=True)
                    typed = True
                    continue
                shot = c.capture()
                if shot == last and time.monotonic() - start > 3 or time.monotonic() - start > timeout_s:
                    break
                last = shot
            png = out / f"{name}.png"
            png.write_bytes(shot)
            shots[name] = Shot(png, str(c.evaluate("document.body.innerText") or ""))
    finally:
        c.close()
    return shots


def shrink(png: Path, width: int = WIDTH) -> None:
    """Resized to `width` and palette-quantised when Pillow is there (a UI page then weighs ~100 KB, not ~400)."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(png) as im:
        im = im.convert("RGB")
        if im.width > width:
            im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
        im = im.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        im.save(png, optimize=True)


def distinct_colours(png: Path) -> int:
    """How many distinct pixel values: a blank or half-loaded page has a handful, a drawn one hundreds."""
    from PIL import Image

    with Image.open(png) as im:
        return len(im.convert("RGB").getcolors(maxcolors=1 << 24) or [])


def take_all(url: str, t: Target, out: Path, browser: str | None = None, resize: bool = True) -> dict[str, Shot]:
    shots = capture(page_urls(url, t), out, browser)
    if resize:
        for shot in shots.values():
            shrink(shot.png)
    return shots


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workspace", type=Path, required=True, help="a medxfer workspace (holds mlflow.db)")
    p.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    p.add_argument("--model", help="registered model name (default: the most recently updated)")
    args = p.parse_args(argv)
    browser = chromium()
    if browser is None:
        raise SystemExit(CHROMIUM_MISSING)
    args.out.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="medxfer-ui-") as tmp,
        serve_ui(args.workspace.resolve(), Path(tmp) / "ui.log") as (url, _),
    ):
        t = find_target(url, args.model)
        shots = take_all(url, t, args.out, browser)
    print(f"{t.model_name} v{t.model_version}, run {t.run_id}:")
    for shot in shots.values():
        print(f"  {shot.png}  {shot.png.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
