"""The model card has every required section, fills checklist items from metadata, and carries no PHI."""

from __future__ import annotations

import json

import pytest
from evalfixtures import PHI, checkpoint_dict, outputs
from medxfer.evaluation.evaluate import compute_evaluation
from medxfer.evaluation.modelcard import build_model_card, run_info_from_checkpoint

REQUIRED_SECTIONS = [
    "## Model details",
    "## Intended use",
    "## Out-of-scope use",
    "## Data and de-identification",
    "## Series selection and preprocessing",
    "## Split",
    "## Performance (test split)",
    "## Calibration and threshold",
    "## Transfer gain",
    "## Limitations",
    "## Reporting checklists",
    "### TRIPOD+AI (2024)",
    "### CLAIM (2020)",
]


def _evaluation(task: str = "binary", control: bool = False) -> dict:
    k = 2 if task == "binary" else 3
    classes = ["benign", "malignant"] if k == 2 else ["a", "b", "c"]
    val, test = outputs(60, 1, k), outputs(80, 2, k)
    kw = {}
    if control:
        kw = {
            "control_val": outputs(60, 1, k, signal=2.5),
            "control_test": outputs(80, 2, k, signal=2.5),
            "control_kind": "scratch",
            "control_run_id": "c" * 32,
        }
    ev = compute_evaluation(val, test, classes, classes[1] if k == 2 else None, task, n_bootstrap=100, **kw).evaluation
    ev["run_id"] = "0123456789abcdef0123456789abcdef"
    ev["counts"] = {
        "train": {c: 50 for c in classes},
        "val": {c: 10 for c in classes},
        "test": {c: 20 for c in classes},
    }
    ev["patients"] = {"train": 70, "val": 15, "test": 30}
    return ev


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_card_sections_and_no_phi(task: str) -> None:
    ckpt = checkpoint_dict(task)
    run = run_info_from_checkpoint(
        ckpt,
        extra={
            "ingest": {
                "n_studies": 300,
                "n_rejected": 4,
                "reject_reasons": {"NO_PIXEL_DATA": 4},
                "modalities": {"US": 300},
            }
        },
    )
    md, card = build_model_card(run, _evaluation(task))
    for section in REQUIRED_SECTIONS:
        assert section in md, section
    blob = md + json.dumps(card)
    for needle in PHI + ["DOE_JANE", "/home/"]:
        assert needle.lower() not in blob.lower(), needle
    # The pretrained file is named (reproducibility) without its folder.
    assert card["model"]["pretrained_weights"]["file"] == "lite0.pth"
    assert card["data"]["deidentification"].startswith("Pseudonymised")
    assert card["split"]["counts"]["test"]
    assert "95% CIs: patient-level percentile bootstrap" in md
    # The reproducibility guarantee (held by tests/test_reproducibility.py) is stated with its conditions.
    assert "Reproducibility: seed" in md and "bit-identical weights in a new process" in md
    assert "thread count" in card["training"]["reproducibility"]
    assert json.loads(json.dumps(card)) == card


def test_card_checklists_mark_items_with_sources() -> None:
    md, card = build_model_card(run_info_from_checkpoint(checkpoint_dict()), _evaluation())
    for name in ("TRIPOD+AI (2024)", "CLAIM (2020)"):
        items = card["checklists"][name]
        assert {i["status"] for i in items} == {"filled", "not-available"}
        for it in items:
            if it["status"] == "filled":
                assert it["source"] and it["value"] is not None
            else:
                assert it["note"]
    by_id = {i["item"]: i for i in card["checklists"]["CLAIM (2020)"]}
    assert by_id["21"]["value"] == "patient"
    assert by_id["29"]["status"] == "filled"
    assert by_id["32"]["status"] == "not-available"  # no external validation


def test_card_shows_threshold_calibration_and_negative_transfer() -> None:
    ev = _evaluation(control=True)
    md, card = build_model_card(run_info_from_checkpoint(checkpoint_dict()), ev)
    assert card["threshold"]["value"] == ev["threshold"]
    assert f"{ev['threshold']:.4f}" in md
    assert "Calibration fitted on validation: temperature" in md
    # The control arm had a stronger signal: negative transfer must be flagged in both forms.
    assert ev["transfer"]["negative_transfer"] is True
    assert "NEGATIVE TRANSFER FLAG" in md
    assert any("Negative transfer" in x for x in card["limitations"])


def test_card_without_control_says_so() -> None:
    md, card = build_model_card(run_info_from_checkpoint(checkpoint_dict()), _evaluation())
    assert card["transfer"] is None
    assert "No control arm" in md


def test_card_says_when_the_output_averages_mirror_images() -> None:
    """A researcher re-implementing the model from the card must know that one view is not what was evaluated."""
    run = run_info_from_checkpoint(checkpoint_dict())
    _, plain = build_model_card(run, _evaluation())
    _, mirrored = build_model_card(run, {**_evaluation(), "tta": {"views": 2, "flip_dims": [[3]]}})
    assert "mirror" not in plain["model"]["output"]
    assert "averaged over the input and 1 mirror image(s)" in mirrored["model"]["output"]
