"""Domain shift in the evaluation: the OOD block and its statistics file, scanner subgroups (rule, ingest columns),
and both in the model card and the HTML report."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from evalfixtures import outputs
from helpers import make_dicom2d_dataset, set_dicom_attrs
from medxfer.evaluation import modelcard, report, shift
from medxfer.evaluation.evaluate import compute_evaluation
from medxfer.stats import ood


def _scanners(studies: np.ndarray) -> dict[str, tuple[str, str]]:
    """30 studies on one GE model, the rest on a Siemens model with too few studies for numbers."""
    return {
        s: (("GE Healthcare", "LOGIQ E9") if i < 30 else ("SIEMENS", "ACUSON S2000")) for i, s in enumerate(studies)
    }


def _ev_with_shift() -> dict:
    val, test = outputs(60, 1), outputs(40, 2)
    ev = compute_evaluation(val, test, ["benign", "malignant"], "malignant", "binary", n_bootstrap=50)
    rng = np.random.default_rng(0)
    block, stats, _, test_scores = shift.ood_evaluation(rng.normal(size=(60, 24)), rng.normal(size=(40, 24)))
    ev.evaluation["ood"] = block
    ev.evaluation["subgroups"] = shift.subgroup_metrics(
        test.studies,
        test.y,
        ev.prob_test,
        _scanners(test.studies),
        ["benign", "malignant"],
        ev.evaluation["threshold"],
        1,
        stats.flag(test_scores),
    )
    return ev.evaluation


def test_subgroup_rule_and_values() -> None:
    test = outputs(40, 2)
    prob = np.exp(test.logits) / np.exp(test.logits).sum(1, keepdims=True)
    sg = shift.subgroup_metrics(test.studies, test.y, prob, _scanners(test.studies), ["a", "b"], 0.5, 1)
    man = {r["group"]: r for r in sg["by"]["manufacturer"]}
    assert sg["recorded"] and sg["min_studies"] == 20 and ">= 20 test studies" in sg["rule"]
    assert man["GE Healthcare"]["status"] == "ok" and man["GE Healthcare"]["n_studies"] == 30
    assert man["SIEMENS"]["status"] == "too few" and man["SIEMENS"]["metrics"] is None
    ge = test.y[:30] == 1
    from medxfer.stats import metrics as M

    assert man["GE Healthcare"]["metrics"]["auroc"] == M.auroc(ge, prob[:30, 1])
    assert [r["group"] for r in sg["by"]["manufacturer_model"]] == [
        "GE Healthcare / LOGIQ E9",
        "SIEMENS / ACUSON S2000",
    ]
    # One class only: too few, whatever the count.
    one = shift.subgroup_metrics(
        test.studies[test.y == 0], test.y[test.y == 0], prob[test.y == 0], {}, ["a", "b"], 0.5, 1
    )
    assert one["by"]["manufacturer"][0]["group"] == shift.NOT_RECORDED and not one["recorded"]
    assert all(r["status"] == "too few" for r in one["by"]["manufacturer"])


def test_ood_block_fitted_and_not() -> None:
    rng = np.random.default_rng(1)
    block, stats, val_scores, test_scores = shift.ood_evaluation(rng.normal(size=(50, 16)), rng.normal(size=(30, 16)))
    assert block["fitted"] and block["fit_on"] == "validation" and block["threshold"] == stats.threshold
    assert block["val_flag_rate"] == ood.flag_rate(val_scores, stats.threshold) <= 0.02
    assert block["test_flagged"] == int((test_scores > stats.threshold).sum()) and block["n_test"] == 30
    none, s2, _, _ = shift.ood_evaluation(None, None)
    assert not none["fitted"] and s2 is None and "no penultimate features" in none["reason"]
    few, s3, _, _ = shift.ood_evaluation(rng.normal(size=(5, 16)), rng.normal(size=(3, 16)))
    assert not few["fitted"] and s3 is None and "need 8" in few["reason"]


def test_statistics_file_round_trip(tmp_path: Path) -> None:
    stats, _ = ood.calibrate(np.random.default_rng(2).normal(size=(30, 12)))
    path = shift.write_ood_stats(stats, tmp_path / "e" / shift.OOD_FILE)
    back = shift.read_ood_stats(path)
    x = np.random.default_rng(3).normal(size=(4, 12))
    np.testing.assert_array_equal(back.score(x), stats.score(x))


def test_card_and_report_show_ood_and_subgroups(tmp_path: Path) -> None:
    ev = _ev_with_shift()
    md, card = modelcard.build_model_card({}, ev)
    o = ev["ood"]
    assert card["domain_shift"]["ood"]["threshold"] == o["threshold"]
    assert "## Domain shift" in md and ood.METHOD in md and f"{o['threshold']:.3f}" in md
    assert f"validation {100 * o['val_flag_rate']:.1f}% (cross-fitted), test {100 * o['test_flag_rate']:.1f}%" in md
    assert "| GE Healthcare / LOGIQ E9 | 30 |" in md and "| SIEMENS | 10 |" in md and "too few" in md
    assert any("scanner manufacturer and model see 'Domain shift'" in x for x in card["limitations"])
    page = report.render_report(ev, [], card, {})
    assert 'id="shift"' in page and "GE Healthcare / LOGIQ E9" in page and "cross-fitted" in page
    # Without either (an older evaluation.json): the sections say so, nothing breaks.
    old = {k: v for k, v in ev.items() if k not in ("ood", "subgroups")}
    md_old, _ = modelcard.build_model_card({}, old)
    assert "No OOD statistics" in md_old and "not evaluated" in report.render_report(old, [], None, {})


def test_evaluate_writes_the_block_and_the_statistics(evaluated_run) -> None:
    ev = evaluated_run.result.evaluation
    o = ev["ood"]
    out = evaluated_run.result.path.parent / "evaluation"
    assert o["fitted"] and o["n_fit"] == ev["evaluated"]["val"] and o["n_test"] == ev["evaluated"]["test"]
    assert hashlib.sha256((out / shift.OOD_FILE).read_bytes()).hexdigest() == o["sha256"]
    assert shift.OOD_FILE in ev["artifacts"] and shift.read_ood_stats(out / shift.OOD_FILE).threshold == o["threshold"]
    import pandas as pd

    preds = pd.read_csv(out / "predictions.csv")
    assert preds["ood_score"].notna().all() and preds["ood_flag"].isin([True, False]).all()
    sg = ev["subgroups"]  # the tiny dataset's files name no manufacturer
    assert not sg["recorded"] and [r["group"] for r in sg["by"]["manufacturer"]] == [shift.NOT_RECORDED]


def test_ingest_records_manufacturer_and_model(tmp_path: Path, tiny_nifti3d) -> None:
    from medxfer.core.workspace import Workspace
    from medxfer.ingest.ingest import ingest
    from medxfer.ingest.manifest import read_manifest

    ds = make_dicom2d_dataset(tmp_path / "d", n_studies=6, plant_phi=False)
    files = sorted(ds.root.rglob("IM0001"))
    for i, f in enumerate(files):
        if i % 2:
            set_dicom_attrs(f, Manufacturer="  GE   Healthcare ", ManufacturerModelName="LOGIQ E9")
    ingest(ds.spec, ds.workspace)
    man = read_manifest(Workspace.for_spec(ds.workspace, ds.spec.name).manifest)
    assert sorted(man["manufacturer"]) == [""] * 3 + ["GE Healthcare"] * 3
    assert set(man["manufacturer_model"]) == {"", "LOGIQ E9"}
    ingest(tiny_nifti3d.spec, tiny_nifti3d.workspace)
    nman = read_manifest(Workspace.for_spec(tiny_nifti3d.workspace, tiny_nifti3d.spec.name).manifest)
    assert set(nman["manufacturer"]) == {""} and set(nman["manufacturer_model"]) == {""}
