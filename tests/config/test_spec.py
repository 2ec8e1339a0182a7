"""medxfer.config.spec: shipped specs load; errors name the file, the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import spec_dict, write_spec
from medxfer.config.spec import SpecError, check_spec_command, load_spec

SPECS = Path(__file__).resolve().parents[2] / "data_specs"


@pytest.mark.parametrize("name", ["template.yaml", "breastmnist_demo.yaml", "adrenal3d_demo.yaml"])
def test_shipped_specs_validate(name):
    spec = load_spec(SPECS / name)
    assert spec.spec_path == (SPECS / name).resolve()
    assert spec.positive_class in spec.classes


def test_demo_specs_point_at_demo_output_and_pin_the_medmnist_test_split():
    breast = load_spec(SPECS / "breastmnist_demo.yaml")
    assert breast.root == (SPECS.parent / "demo-data/breastmnist/dicom").resolve()
    assert breast.classes == ["malignant", "benign"] and breast.positive_class == "malignant"
    assert breast.split.pinned_test is not None
    adrenal = load_spec(SPECS / "adrenal3d_demo.yaml")
    assert adrenal.source.kind == "nifti" and adrenal.labels.patient == "patient"
    assert adrenal.positive_class == "hyperplasia" and adrenal.split.pinned_test is not None


def test_every_template_field_is_commented():
    text = (SPECS / "template.yaml").read_text()
    fields = set()

    def walk(d, prefix=""):
        for k, v in d.items():
            fields.add(k)
            if isinstance(v, dict) and k not in ("fractions",):
                walk(v)

    walk(yaml.safe_load(text))
    for f in fields:
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(f + ":"))
        idx = text.splitlines().index(line)
        context = "\n".join(text.splitlines()[max(0, idx - 3) : idx + 2])
        assert "#" in context, f"template field {f!r} has no comment near it"


def bad(tmp_path, **changes) -> str:
    d = spec_dict("x", "dicom", 2, "data")
    for k, v in changes.items():
        node = d
        *parents, leaf = k.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = v
    p = write_spec(tmp_path / "bad.yaml", d)
    with pytest.raises(SpecError) as exc:
        load_spec(p)
    msg = str(exc.value)
    assert str(p) in msg
    return msg


def test_errors_name_file_field_and_fix(tmp_path):
    assert "positive_class" in bad(tmp_path, positive_class=None)
    msg = bad(tmp_path, series={"description_exclude": ["(unclosed"]})
    assert "series.description_exclude" in msg and "does not compile" in msg
    assert "labels.key for NIfTI must be 'path'" in bad(tmp_path, source__kind="nifti")
    msg = bad(tmp_path, preprocess={"spacing": [1, 1, 1]})
    assert "spacing needs 2 values" in msg
    msg = bad(tmp_path, split={"fractions": {"train": 0.9, "val": 0.2, "test": 0.2}})
    assert "field 'split.fractions'" in msg and "fractions must" in msg and "sum to 1" in msg and "fix:" in msg
    msg = bad(tmp_path, sources={"kind": "dicom"})
    assert "sources" in msg
    msg = bad(tmp_path, series={"spacing_tolerance": 0.9})
    assert "series.spacing_tolerance" in msg and "fix:" in msg
    msg = bad(tmp_path, split={"fractions": None, "folds": 1})
    assert "split.folds" in msg


def test_check_spec_reports_missing_files(tmp_path):
    p = write_spec(tmp_path / "s.yaml", spec_dict("x", "dicom", 2, "nowhere"))
    with pytest.raises(SpecError, match="source.root: folder .* does not exist"):
        check_spec_command(p)


def test_modality_rules_are_upper_cased(tmp_path):
    p = write_spec(tmp_path / "s.yaml", spec_dict("x", "dicom", 3, "d", series={"modality": ["ct", " mr"]}))
    assert load_spec(p).series.modality == ["CT", "MR"]


def test_model_rules_name_their_fields_not_the_top_level(tmp_path):
    cases = {
        "positive_class": ({"positive_class": None}, "field 'positive_class' (with 'task')"),
        "classes": ({"classes": ["a", "a"]}, "field 'classes'"),
        "labels.key": ({"source": {"kind": "nifti", "root": "data"}}, "field 'labels.key' (with 'source.kind')"),
        "spacing": ({"preprocess": {"spacing": [1, 1, 1]}}, "field 'preprocess.spacing' (with 'dims')"),
        "window": ({"preprocess": {"intensity": {"mode": "ct_window"}}}, "field 'preprocess.intensity.window'"),
        "fraction keys": ({"split": {"fractions": {"train": 1.0}}}, "field 'split.fractions' (with 'split.folds')"),
    }
    for name, (changes, field) in cases.items():
        msg = bad(tmp_path, **changes)
        assert field in msg and "top level" not in msg, (name, msg)


def test_positive_class_not_in_classes_names_the_value_and_the_classes(tmp_path):
    msg = bad(tmp_path, positive_class="Pos")
    assert "positive_class 'Pos' is not one of the classes (neg, pos)" in msg and "did you mean 'pos'" in msg
    assert "field 'positive_class' (with 'classes')" in msg


def test_a_file_as_source_root_is_called_a_file(tmp_path):
    (tmp_path / "scan.dcm").write_bytes(b"x")
    p = write_spec(tmp_path / "s.yaml", spec_dict("x", "dicom", 2, "scan.dcm"))
    with pytest.raises(SpecError, match=r"source.root: .*scan.dcm is a file; it must be the folder to scan") as exc:
        check_spec_command(p)
    assert "does not exist" not in str(exc.value).split("\n")[1]


@pytest.mark.parametrize("root", ["../../../../etc", "../../x", "a/../../../x"])
def test_a_relative_root_may_not_climb_out_of_the_specs_neighbourhood(tmp_path, root):
    (tmp_path / "a" / "b").mkdir(parents=True)
    d = spec_dict("x", "dicom", 2, root)
    p = write_spec(tmp_path / "a" / "b" / "s.yaml", d)
    with pytest.raises(SpecError, match=r"field 'source.root'.*climbs \d folders above the spec's folder") as exc:
        check_spec_command(p)
    assert "source.allow_outside: true" in str(exc.value)
    # Said explicitly, it loads: an absolute path, or the opt-in.
    d["source"]["allow_outside"] = True
    assert load_spec(write_spec(p, d)).root == (p.parent / root).resolve()
    d["source"] = {"kind": "dicom", "root": str((p.parent / root).resolve())}
    assert load_spec(write_spec(p, d)).source.root.is_absolute()


@pytest.mark.parametrize("root", ["data", "./data", "../data", "data/../../data", "."])
def test_a_root_in_or_next_to_the_specs_folder_loads(tmp_path, root):
    (tmp_path / "specs").mkdir()
    spec = load_spec(write_spec(tmp_path / "specs" / "s.yaml", spec_dict("x", "dicom", 2, root)))
    assert spec.root == (tmp_path / "specs" / root).resolve()


def test_allow_outside_off_does_not_change_the_spec_hash(tmp_path):
    d = spec_dict("x", "dicom", 2, "data")
    h = load_spec(write_spec(tmp_path / "s.yaml", d)).content_hash()
    d["source"]["allow_outside"] = False
    assert load_spec(write_spec(tmp_path / "s.yaml", d)).content_hash() == h
    d["source"]["allow_outside"] = True
    assert load_spec(write_spec(tmp_path / "s.yaml", d)).content_hash() != h
