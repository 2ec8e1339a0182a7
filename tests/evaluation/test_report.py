"""The HTML report: self-contained (every image an inline PNG), every section there, user text escaped, no PHI."""

from __future__ import annotations

import base64
import html.parser
from pathlib import Path

import pytest
from evalfixtures import outputs
from medxfer.evaluation import report as R
from medxfer.evaluation.evaluate import compute_evaluation, write_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Page(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str | None]] = []
        self.ids: list[str] = []
        self.tags: set[str] = set()
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "img":
            self.imgs.append(a)
        if a.get("id"):
            self.ids.append(str(a["id"]))
        for k in ("href", "src"):
            if a.get(k) and tag != "img":
                self.links.append(str(a[k]))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def check_self_contained(page: _Page) -> list[bytes]:
    """Every <img> is a data: URI that decodes to a PNG; nothing is fetched from anywhere (no script, link, font)."""
    pngs = []
    for img in page.imgs:
        src = str(img.get("src"))
        assert src.startswith("data:image/png;base64,"), src[:60]
        data = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        assert data[:8] == PNG_MAGIC and b"IEND" in data[-12:] and len(data) > 1000
        pngs.append(data)
    assert not {"script", "link", "iframe", "object"} & page.tags and page.links == []
    return pngs


def _history() -> list[dict]:
    # Two stages (the second from epoch 2) and a best epoch (1) that is not the last.
    aurocs = [0.6, 0.8, 0.75, 0.7]
    return [
        {
            "epoch": e,
            "train_loss": 1 / (e + 1),
            "val_loss": 0.9 - 0.1 * e,
            "val_auroc": a,
            "val_balanced_accuracy": a - 0.1,
            "stage": 0 if e < 2 else 1,
        }
        for e, a in enumerate(aurocs)
    ]


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[dict, dict[str, Path]]:
    classes = ["benign <b>", "malignant & <script>alert(1)</script>"]  # spec class names are user text
    val, test = outputs(80, 1), outputs(120, 2)
    cval, ctest = outputs(80, 1, signal=0.5), outputs(120, 2, signal=0.5)
    c = compute_evaluation(
        val, test, classes, classes[1], "binary", n_bootstrap=100, control_val=cval, control_test=ctest,
        control_kind="scratch", control_run_id="c" * 32,
    )  # fmt: skip
    ev = {
        "run_id": "r" * 32,
        **c.evaluation,
        "counts": {"train": {classes[0]: 50, classes[1]: 40}, "val": {classes[0]: 40, classes[1]: 40}},
        "patients": {"train": 45, "val": 40},
        "checkpoint": {"epoch": 2, "best_metric": 0.8, "select_metric": "auroc"},  # counted from 1
    }
    plots = write_plots(tmp_path / "plots", c, test)
    return ev, {p.stem: p for p in plots}


def test_report_has_every_section_inline_pngs_and_escaped_text(synthetic, tmp_path: Path) -> None:
    ev, figures = synthetic
    card = {
        "model": {"name": "spec <i>x</i>", "version": "3", "architecture": "efficientnet_lite0"},
        "intended_use": {"primary": "Research use only.", "users": "researchers", "out_of_scope": ["autonomy"]},
        "limitations": ["Small test set."],
    }
    out = R.write_report(ev, _history(), card, tmp_path / "report.html", figures)
    page = parse(out)
    assert page.ids == list(R.SECTIONS)
    pngs = check_self_contained(page)
    # learning curve, ROC, PR, reliability, confusion matrix, transfer: all six drawn
    assert len(pngs) == len(R.FIGURES) == 6
    raw = out.read_text()
    assert "<script>" not in raw and "benign &lt;b&gt;" in raw and "benign <b>" not in raw
    assert "<i>x</i>" not in raw and "spec &lt;i&gt;x&lt;/i&gt;" in raw
    text = " ".join(page.text)
    assert "malignant & <script>alert(1)</script>" in text  # shown to the reader as written, not run
    for needle in ("AUROC", "95% CI", "Research use only.", "Small test set.", "epoch 2", "scratch", "train"):
        assert needle in text, needle
    auroc = ev["test"]["auroc"]
    assert f"{auroc['ci_low']:.3f} to {auroc['ci_high']:.3f}" in text


def test_report_without_arrays_card_or_control_still_renders(synthetic, tmp_path: Path) -> None:
    """Export from a bundle with no store: no ROC/PR/reliability arrays, no history, no control; notes instead."""
    ev, _ = synthetic
    ev = {**ev, "transfer": None}
    page = parse(R.write_report(ev, [], None, tmp_path / "r.html"))
    assert page.ids == list(R.SECTIONS)
    assert len(check_self_contained(page)) == 1  # only the confusion matrix can be drawn from evaluation.json
    text = " ".join(page.text)
    assert "No control arm" in text and "No per-epoch history" in text and "not available" in text


@pytest.mark.slow
def test_evaluated_run_has_a_logged_phi_free_report(evaluated_run) -> None:
    from mlflow.tracking import MlflowClient

    path = evaluated_run.result.path.parent / "evaluation" / R.REPORT
    page = parse(path)
    assert page.ids == list(R.SECTIONS)
    assert len(check_self_contained(page)) == len(R.FIGURES)  # control arm trained: all six figures
    raw = path.read_text()
    for phi in evaluated_run.dataset.phi:
        assert phi.lower() not in raw.lower(), phi
    assert str(evaluated_run.dataset.root) not in raw
    assert "report.html" in evaluated_run.result.evaluation["artifacts"]
    client = MlflowClient(evaluated_run.tracking_uri)
    arts = {a.path for a in client.list_artifacts(evaluated_run.run_id, "evaluation")}
    assert "evaluation/report.html" in arts
