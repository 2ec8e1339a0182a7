"""A one-page HTML report of one evaluated run, for a reader without MLflow.

``write_report(evaluation, history, card, out, figures=None) -> out`` writes one self-contained file: every
figure inline as a base64 PNG, no external CSS, scripts or fonts, so it opens from an e-mail or a USB stick and
MLflow's artifact viewer shows it as is. Every piece of text from the data spec or the run (spec and class names,
warnings) goes through ``html.escape``: spec names are user text.

Sections, in order (ids in :data:`SECTIONS`): headline test metrics with 95% CIs, learning curves (unfreezing
stages dashed, kept epoch starred), ROC and precision-recall with the operating point, reliability before/after
temperature scaling, confusion matrix at the threshold, transfer gain against a control, domain shift (the OOD
threshold and flag rates, test metrics per scanner manufacturer and model), data counts per split and class, and
the model-card summary (intended use, limitations).

Inputs: ``evaluation`` is the ``evaluation.json`` dict (:mod:`medxfer.evaluation.evaluate`); ``history`` the
per-epoch rows of training (checkpoint ``history`` / MLflow ``history.json``: epoch, train_loss, val_loss,
val_auroc, ..., stage); ``card`` the model-card dict (:mod:`medxfer.evaluation.modelcard`) or None;
``figures`` PNG files already drawn (evaluate's ``roc``, ``pr``, ``reliability``, ``confusion_matrix``): the
ROC, PR and reliability plots need per-study probabilities that evaluation.json does not hold, so a caller
without them gets a note in their place. The learning curves, confusion matrix and transfer plot are drawn
here from the dicts when not given. The caller puts the file through the PHI guard before it leaves (evaluate
logs it as a text artifact).
"""

from __future__ import annotations

import base64
import html
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPORT = "report.html"
SECTIONS = ("headline", "learning", "discrimination", "calibration", "confusion", "transfer", "shift", "data", "card")
FIGURES = ("learning_curve", "roc", "pr", "reliability", "confusion_matrix", "transfer")
_LABELS = {
    "auroc": "AUROC",
    "auprc": "AUPRC (average precision)",
    "balanced_accuracy": "Balanced accuracy",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV (precision)",
    "npv": "NPV",
    "ece": "ECE (after calibration; lower is better)",
    "brier": "Brier score (after calibration; lower is better)",
}
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1000px;margin:1.5em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
img{max-width:100%;height:auto}.row{display:flex;flex-wrap:wrap;gap:1em}.row img{max-width:48%}
.note{color:#555;font-size:.92em}.flag{color:#b00020;font-weight:bold}.ok{color:#1b5e20;font-weight:bold}
.warn{background:#fff8e1;border-left:4px solid #f9a825;padding:.4em .8em}
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _num(v: Any, digits: int = 3, sign: bool = False) -> str:
    if v is None:
        return "n/a"
    try:
        return f"{float(v):+.{digits}f}" if sign else f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return _e(v)


def _ci(m: Mapping[str, Any] | None, sign: bool = False) -> str:
    if not m or m.get("ci_low") is None or m.get("ci_high") is None:
        return "n/a"
    return f"{_num(m['ci_low'], sign=sign)} to {_num(m['ci_high'], sign=sign)}"


def _img(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).is_file():
        return f'<p class="note">{_e(alt)}: not available for this report.</p>'
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """`rows` cells are HTML already (escaped by the caller); `head` is escaped here."""
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_e(title)}</h2>{body}</section>'


def draw_figures(
    evaluation: Mapping[str, Any], history: Sequence[Mapping[str, Any]], folder: Path, have: Mapping[str, Path]
) -> dict[str, Path]:
    """The figures the dicts alone can give (learning curve, confusion matrix, transfer) that `have` lacks."""
    import numpy as np
    from medxfer.stats import plots  # matplotlib: only when a report is drawn

    out: dict[str, Path] = {}
    ckpt = evaluation.get("checkpoint") or {}
    if history and "learning_curve" not in have:
        best = ckpt.get("epoch")  # counted from 1; history rows count from 0
        out["learning_curve"] = plots.plot_learning_curves(
            [dict(h) for h in history],
            [],
            folder / "learning_curve.png",
            str(ckpt.get("select_metric") or "auroc"),
            best=int(best) - 1 if best is not None else None,
        )
    cm = (evaluation.get("confusion_matrix") or {}).get("test")
    if cm is not None and "confusion_matrix" not in have:
        out["confusion_matrix"] = plots.confusion_plot(
            np.asarray(cm), list(evaluation.get("classes") or []), folder / "confusion_matrix.png"
        )
    if evaluation.get("transfer") and "transfer" not in have:
        out["transfer"] = plots.transfer_plot(dict(evaluation["transfer"]), folder / "transfer.png")
    return out


def _headline(ev: Mapping[str, Any]) -> str:
    test, val = ev.get("test") or {}, ev.get("val") or {}
    rows = []
    for k, label in _LABELS.items():
        if k in test:
            m = test[k] or {}
            rows.append([_e(label), _num(m.get("value")), _ci(m), _num((val.get(k) or {}).get("value"))])
    b = ev.get("bootstrap") or {}
    n_test = sum(((ev.get("counts") or {}).get("test") or {}).values())
    pts = (ev.get("patients") or {}).get("test")
    body = _table(["metric (test)", "value", "95% CI", "validation"], rows)
    thr = ev.get("threshold")
    tp = ev.get("threshold_policy") or {}
    decision = (
        f"positive ({_e(ev.get('positive_class'))}) when its calibrated probability is at least "
        f"<b>{_num(thr, 4)}</b>, chosen on validation ({_e(tp.get('policy'))}"
        + (f" {_e(tp.get('target'))}" if tp.get("target") is not None else "")
        + ")"
        if thr is not None
        else "the most probable class (argmax)"
    )
    body += (
        f"<p>Test set: {n_test} studies{f' from {pts} patients' if pts is not None else ''}. Decision: {decision}. "
        f"Temperature {_num(ev.get('temperature'))}.</p>"
        f'<p class="note">95% CIs: patient-level bootstrap ({_e(b.get("n_resamples"))} resamples, '
        f"{_e(b.get('n_skipped'))} skipped). Validation values are points only: the threshold and temperature "
        "were tuned there.</p>"
    )
    warnings = ev.get("warnings") or []
    if warnings:
        body += '<div class="warn"><b>Caveats</b><ul>' + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul></div>"
    return _section("headline", "Headline test metrics", body)


def _learning(history: Sequence[Mapping[str, Any]], ev: Mapping[str, Any], figs: Mapping[str, Path]) -> str:
    ckpt = ev.get("checkpoint") or {}
    stages = sorted({int(h["stage"]) for h in history if h.get("stage") is not None})
    kept = ckpt.get("epoch")
    text = (
        f"<p>{len(history)} epochs, {len(stages) or 1} unfreezing stage(s) (dashed lines mark where one begins); "
        f"the kept checkpoint is epoch {int(kept) if kept is not None else 'n/a'} (star), selected on "
        f"validation {_e(ckpt.get('select_metric') or 'n/a')}.</p>"
        if history
        else '<p class="note">No per-epoch history was found for this run.</p>'
    )
    return _section("learning", "Learning curves", text + _img(figs.get("learning_curve"), "learning curves"))


def _discrimination(ev: Mapping[str, Any], figs: Mapping[str, Path]) -> str:
    t = ev.get("test") or {}
    op = (
        f"<p>Operating point (dot on the ROC curve): sensitivity {_num((t.get('sensitivity') or {}).get('value'))}, "
        f"specificity {_num((t.get('specificity') or {}).get('value'))}.</p>"
        if ev.get("threshold") is not None
        else ""
    )
    imgs = (
        f'<div class="row">{_img(figs.get("roc"), "ROC curve")}{_img(figs.get("pr"), "precision-recall curve")}</div>'
    )
    return _section("discrimination", "ROC and precision-recall (test)", op + imgs)


def _calibration(ev: Mapping[str, Any], figs: Mapping[str, Path]) -> str:
    cal = ev.get("calibration") or {}
    rows = []
    for split in ("val", "test"):
        c = cal.get(split) or {}
        for k in ("ece", "brier", "nll"):
            rows.append(
                [
                    _e(f"{split} {k.upper() if k != 'brier' else 'Brier'}"),
                    _num(c.get(f"{k}_before")),
                    _num(c.get(f"{k}_after")),
                ]
            )
    body = (
        f"<p>Calibration fitted on validation: {_e(cal.get('method') or 'temperature')}, "
        f"T = {_num(ev.get('temperature'))} "
        f"({_e(cal.get('ece_definition') or '')}, {_e(cal.get('n_bins') or 15)} bins).</p>"
        + _table(["", "before", "after"], rows)
        + _img(figs.get("reliability"), "reliability diagram")
    )
    return _section("calibration", "Calibration: reliability before and after", body)


def _confusion(ev: Mapping[str, Any], figs: Mapping[str, Path]) -> str:
    cm = ev.get("confusion_matrix") or {}
    labels = list(cm.get("labels") or ev.get("classes") or [])
    mat = cm.get("test") or []
    rows = [[_e(labels[i] if i < len(labels) else i), *[_e(v) for v in r]] for i, r in enumerate(mat)]
    at = f"threshold {_num(ev.get('threshold'), 4)}" if ev.get("threshold") is not None else "argmax"
    body = (
        f"<p>Test studies, rows = true class, columns = predicted ({at}).</p>"
        + _table(["true \\ predicted", *labels], rows)
        + _img(figs.get("confusion_matrix"), "confusion matrix")
    )
    return _section("confusion", "Confusion matrix", body)


def _transfer(ev: Mapping[str, Any], figs: Mapping[str, Path]) -> str:
    tr = ev.get("transfer")
    if not tr:
        return _section(
            "transfer",
            "Transfer gain against a control",
            '<p class="note">No control arm was trained for this run (train with --control scratch to measure '
            "what pretraining adds).</p>",
        )
    g = tr.get("gain") or {}
    verdict = (
        f'<span class="flag">Negative-transfer flag: {_e(tr.get("verdict"))}</span>'
        if tr.get("negative_transfer")
        else f'<span class="ok">Pretrained model {_e(tr.get("verdict"))}</span>'
    )
    body = (
        f"<p>{verdict}. {_e(str(tr.get('metric') or 'auroc').upper())} on the same {_e(tr.get('n_studies'))} test "
        f"studies: pretrained {_num(tr.get('main'))}, {_e(tr.get('control_kind') or 'control')} "
        f"{_num(tr.get('control'))}; gain {_num(g.get('value'), sign=True)} (95% CI {_ci(g, sign=True)}, paired "
        f"patient bootstrap, {_e(tr.get('n_resamples'))} resamples).</p>"
        f'<p class="note">Rule: {_e(tr.get("rule") or "")}.</p>' + _img(figs.get("transfer"), "transfer gain")
    )
    return _section("transfer", "Transfer gain against a control", body)


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * float(v):.1f}%"


def _shift(ev: Mapping[str, Any]) -> str:
    o, sg = ev.get("ood") or {}, ev.get("subgroups") or {}
    if o.get("fitted"):
        body = (
            f"<p>Out-of-distribution score ({_e(o.get('method'))}): {_e(o.get('description'))}. Fitted on "
            f"{_e(o.get('n_fit'))} validation studies; flag threshold <b>{_num(o.get('threshold'))}</b> "
            f"({_e(o.get('threshold_rule'))}).</p>"
            f"<p>Flagged: validation {_pct(o.get('val_flag_rate'))} (cross-fitted), test "
            f"{_pct(o.get('test_flag_rate'))} ({_e(o.get('test_flagged'))} of {_e(o.get('n_test'))}). Predict adds "
            "<code>ood_score</code> and <code>ood_flag</code> to every row.</p>"
        )
    else:
        body = f'<p class="note">No OOD statistics: {_e(o.get("reason") or "not evaluated")}.</p>'
    if sg:
        names = list(sg.get("metrics") or [])
        for by, title in (("manufacturer", "Manufacturer"), ("manufacturer_model", "Manufacturer / model")):
            rows = [
                [
                    _e(r.get("group")),
                    _e(r.get("n_studies")),
                    *[_num((r.get("metrics") or {}).get(n)) for n in names],
                    _pct(r.get("ood_flag_rate")),
                    _e(r.get("status")),
                ]
                for r in (sg.get("by") or {}).get(by) or []
            ]
            body += f"<h3>{title} (test)</h3>" + _table([title, "studies", *names, "OOD flagged", "status"], rows)
        body += f'<p class="note">Rule: {_e(sg.get("rule"))}.</p>'
    return _section("shift", "Domain shift: OOD flag and scanner subgroups", body)


def _data(ev: Mapping[str, Any]) -> str:
    counts = ev.get("counts") or {}
    patients = ev.get("patients") or {}
    classes = list(ev.get("classes") or [])
    rows = []
    for split in ("train", "val", "test"):
        c = counts.get(split)
        if c is None:
            continue
        rows.append(
            [_e(split), *[_e(c.get(k, 0)) for k in classes], _e(sum(c.values())), _e(patients.get(split, "n/a"))]
        )
    failed = ev.get("failed_studies")
    note = f'<p class="flag">Unreadable at evaluation time (not in the metrics): {_e(failed)}</p>' if failed else ""
    body = _table(["split", *classes, "studies", "patients"], rows) if rows else '<p class="note">No counts.</p>'
    return _section("data", "Data: studies per split and class", body + note)


def _card(card: Mapping[str, Any] | None) -> str:
    if not card:
        return _section("card", "Model card summary", '<p class="note">No model card was given.</p>')
    iu = card.get("intended_use") or {}
    body = (
        f"<h3>Intended use</h3><p>{_e(iu.get('primary') or 'n/a')}</p>"
        + (f"<p><b>Users:</b> {_e(iu['users'])}</p>" if iu.get("users") else "")
        + (
            "<p><b>Out of scope:</b></p><ul>" + "".join(f"<li>{_e(x)}</li>" for x in iu["out_of_scope"]) + "</ul>"
            if iu.get("out_of_scope")
            else ""
        )
        + "<h3>Limitations</h3><ul>"
        + "".join(f"<li>{_e(x)}</li>" for x in card.get("limitations") or [])
        + "</ul>"
    )
    return _section("card", "Model card summary", body)


def render_report(
    evaluation: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    card: Mapping[str, Any] | None,
    figures: Mapping[str, Path],
) -> str:
    """The HTML text; `figures` maps names in :data:`FIGURES` to PNG files (missing ones get a note)."""
    ev = evaluation
    model = (card or {}).get("model") or {}
    name = model.get("name") or (card or {}).get("experiment") or "model"
    version = f" v{model['version']}" if model.get("version") else ""
    task = f"{ev.get('task')} classification of {', '.join(map(str, ev.get('classes') or []))}"
    arch = f"; {model['architecture']}" if model.get("architecture") else ""
    head = (
        f"<h1>{_e(name)}{_e(version)}: evaluation report</h1>"
        f'<p class="note">{_e(task)}{_e(arch)}. Run {_e(ev.get("run_id") or model.get("run_id") or "n/a")}; '
        f"medxfer {_e(ev.get('medxfer_version') or 'n/a')}. Every probability shown is calibrated.</p>"
    )
    body = "".join(
        [
            _headline(ev),
            _learning(history, ev, figures),
            _discrimination(ev, figures),
            _calibration(ev, figures),
            _confusion(ev, figures),
            _transfer(ev, figures),
            _shift(ev),
            _data(ev),
            _card(card),
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(name)}{_e(version)}: evaluation report</title><style>{_CSS}</style></head>"
        f"<body>{head}{body}</body></html>\n"
    )


def write_report(
    evaluation: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]] | None,
    card: Mapping[str, Any] | None,
    out: Path,
    figures: Mapping[str, Path] | None = None,
) -> Path:
    """Write the report to `out` (a file path); see the module docstring."""
    have = {k: Path(v) for k, v in (figures or {}).items() if v is not None and Path(v).is_file()}
    history = list(history or [])
    with tempfile.TemporaryDirectory() as tmp:
        figs = {**draw_figures(evaluation, history, Path(tmp), have), **have}
        text = render_report(evaluation, history, card, figs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out


def run_history(tracking_uri: str, run_id: str, fallback: Sequence[Mapping[str, Any]] | None = None) -> list[dict]:
    """The run's full per-epoch history: MLflow's ``history.json`` (written at the end of training, every epoch),
    else `fallback` (e.g. ``best.pt``'s ``history``, which stops at the kept epoch)."""
    import json

    from medxfer import tracking

    with tempfile.TemporaryDirectory() as tmp:
        got = tracking.download_run_artifact(tracking_uri, run_id, "history.json", Path(tmp))
        if got is not None and got.is_file():
            rows = json.loads(got.read_text())
            if isinstance(rows, list) and rows:
                return rows
    return [dict(h) for h in fallback or []]
