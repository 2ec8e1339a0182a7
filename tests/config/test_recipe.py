"""medxfer.config.recipe: every recipe rule, the shipped and in-repo recipes, good `--set` overrides.

Each bad value must raise SpecError naming the field and the fix. Rules that need context (dims, the
spec's class count, the built model's layer-group names) are checked through load_recipe, check_recipe,
check_stages and check_focal_alpha, the functions their consumers call.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from medxfer.config.recipe import (
    AUGMENT_KEYS,
    Recipe,
    StageCfg,
    check_focal_alpha,
    check_recipe,
    check_stages,
    default_recipe_path,
    load_recipe,
    recipe_from_dict,
)
from medxfer.config.spec import SpecError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "pipeline" / "recipes").glob("*.yaml"))
# Folders of generated or installed files, never recipes the repo ships.
SKIP_DIRS = {"node_modules", "demo-data", "medxfer-work", "mlruns", "build", "dist", "work", "__pycache__"}
GROUPS = ["stem", "stage1", "stage2", "stage3", "stage4", "head"]  # stem first, as model.layer_groups


def _repo_recipes() -> list[Path]:
    """Every YAML file in the repo whose top level is a recipe (it names an encoder)."""
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
        for f in sorted(files):
            if f.endswith((".yaml", ".yml")):
                tree = yaml.safe_load((Path(root) / f).read_text())
                if isinstance(tree, dict) and "encoder" in tree:
                    found.append(Path(root) / f)
    return found


def _dims_of(path: Path) -> int:
    tree = yaml.safe_load(path.read_text())
    size = (tree.get("data") or {}).get("size")
    if size:
        return len(size)
    for d in (2, 3):
        if f"_{d}d" in path.stem:
            return d
    raise AssertionError(f"{path}: cannot tell its dims; give data.size or name the file *_2d/_3d.yaml")


def _error(dims: int, sets: list[str], **context) -> str:
    with pytest.raises(SpecError) as exc:
        load_recipe(None, dims, sets, **context)
    return str(exc.value)


# --- the recipes the repo holds --------------------------------------------------------------------------------------
def test_the_shipped_recipes_are_found_by_the_repo_scan() -> None:
    assert [p.name for p in SHIPPED] == ["default_2d.yaml", "default_3d.yaml"]
    assert set(SHIPPED) <= set(_repo_recipes())


@pytest.mark.parametrize("path", _repo_recipes(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_in_the_repo_loads_and_fits_its_dims(path: Path) -> None:
    dims = _dims_of(path)
    recipe = load_recipe(path, dims, n_classes=2)
    check_recipe(recipe, dims=dims, n_classes=2, group_names=GROUPS)
    check_recipe(recipe, dims=dims, n_classes=5)  # "auto" alpha fits any class count
    # what a checkpoint stores comes back as the same recipe
    assert recipe_from_dict(recipe.model_dump(mode="json")) == recipe


@pytest.mark.parametrize("dims", [2, 3])
def test_the_packaged_default_is_the_shipped_file(dims: int) -> None:
    assert default_recipe_path(dims) == REPO / "pipeline" / "recipes" / f"default_{dims}d.yaml"
    assert load_recipe(None, dims) == load_recipe(default_recipe_path(dims), dims)


# --- good overrides pass ---------------------------------------------------------------------------------------------
GOOD = [
    # tests/conftest.py (TINY_RUN_RECIPE) and tests/training/test_stage.py
    (2, ["epochs=2", "data.size=[64,64]", "data.batch_size=8", "optim.lr=3e-3", "optim.warmup_epochs=0"]),
    (2, ["stages=[{epoch: 0, groups: all}]", "data.augment={}", "evaluation.bootstrap=200"]),
    (2, ["stages=[{epoch: 0, groups: 0}, {epoch: 1, groups: 2}, {epoch: 2, groups: all}]", "weights=none"]),
    (3, ["data.size=[16, 16, 16]", "weights=none", "freeze_bn_stats=false"]),
    # benchmarks/accuracy.py and benchmarks/train_step.py arms
    (2, ["stages=[{epoch: 0, groups: 0}, {epoch: 1, groups: all}]", "loss=ce", "ema_decay=0.98"]),
    (3, ["stages=[{epoch: 0, groups: 0}]", "data.size=null", "data.cache=memory"]),
    # the fixes the error messages suggest
    (3, ["freeze_bn_stats=false", "weights=none"]),
    (2, ["focal.alpha=[1.0, 3.0]", "focal.alpha=null"]),
    (2, ["focal.alpha=[1.0, 3.0]"]),
    (2, ["evaluation.threshold=sensitivity", "evaluation.target=0.9"]),
    (2, ["amp=off"]),  # the non-finite-loss error's fix; YAML reads a bare off as false
    (2, ["stages=[{epoch: 0, groups: 0}, {epoch: 2, groups: 2}, {epoch: 4, groups: all}]"]),
    (2, ["stages=[{epoch: 0, groups: 0}, {plateau_patience: 2, groups: all}]"]),
    (3, ["data.augment.flip=[0, 2]", "data.augment.intensity_shift=0.2", "evaluation.tta=true"]),
    (2, ["data.augment={flip: true, rotate: 180, scale: 0.9, brightness: 1, contrast: 0}", "data.fit=crop_pad"]),
    (3, ["data.size=[64, 64, 64]", "optim.name=sgd", "optim.schedule=constant", "amp=bf16", "seed=3"]),
]


@pytest.mark.parametrize(("dims", "sets"), GOOD)
def test_good_overrides_pass(dims: int, sets: list[str]) -> None:
    recipe = load_recipe(None, dims, sets, n_classes=2)
    check_recipe(recipe, dims=dims, n_classes=2, group_names=GROUPS)


def test_amp_off_means_off_in_yaml_and_in_set(tmp_path: Path) -> None:
    assert load_recipe(None, 2, ["amp=off"]).amp == "off"
    f = tmp_path / "r.yaml"
    f.write_text("amp: off\n")
    assert load_recipe(f, 2).amp == "off"


def test_overrides_land_where_they_say() -> None:
    r = load_recipe(None, 3, ["data.augment.flip=[0, 2]", "optim.lr=3e-4", "focal.alpha=[1, 2]"], n_classes=2)
    assert r.data.augment["flip"] == [0, 2] and r.optim.lr == 3e-4 and r.focal.alpha == [1.0, 2.0]
    assert r.data.augment["rotate"] == 10  # the rest of the default's augment kept (deep merge)
    assert load_recipe(None, 2, weights=Path("w.safetensors")).weights == "w.safetensors"


# --- every rule: a bad value names its field and the fix -------------------------------------------------------------
BAD = [
    # (id, dims, --set, n_classes, the field, a piece of the fix)
    # recipe-only rules (validators on the models)
    ("no stages", 2, ["stages=[]"], None, "stages", "at least one stage"),
    ("stage 0 late", 2, ["stages=[{epoch: 1, groups: 0}]"], None, "stages", "stages[0].epoch must be 0"),
    ("epochs decrease", 2, ["stages=[{epoch: 0}, {epoch: 3}, {epoch: 2}]"], None, "stages", "epochs must increase"),
    ("stage without trigger", 2, ["stages=[{epoch: 0, groups: 0}, {groups: all}]"], None, "stages", "{epoch: 2"),
    ("negative groups", 2, ["stages=[{epoch: 0, groups: -1}]"], None, "stages.0.groups", "0 = head only"),
    ("groups word", 2, ["stages=[{epoch: 0, groups: some}]"], None, "stages.0.groups", "groups: all"),
    ("stage key typo", 2, ["stages=[{epoch: 0, group: 1}]"], None, "stages.0.group", "epoch, groups, plateau"),
    ("bn stats, no weights", 3, ["weights=none"], None, "freeze_bn_stats' (with 'weights')", "--set freeze_bn_stats="),
    ("alpha negative", 2, ["focal.alpha=[1, -1]"], None, "focal.alpha", "[1.0, 3.0], or auto"),
    ("alpha infinite", 2, ["focal.alpha=[1, .inf]"], None, "focal.alpha", ">= 0 and finite"),
    ("alpha word", 2, ["focal.alpha=balanced"], None, "focal.alpha", "auto, null, or one weight"),
    ("unknown loss", 2, ["loss=mse"], None, "loss", "'focal' or 'ce'"),
    ("gamma negative", 2, ["focal.gamma=-1"], None, "focal.gamma", "greater than or equal to 0"),
    ("lr zero", 2, ["optim.lr=0"], None, "optim.lr", "a positive float such as 1e-3"),
    ("lr_decay above 1", 2, ["optim.lr_decay=1.5"], None, "optim.lr_decay", "less than or equal to 1"),
    ("optimizer", 2, ["optim.name=adam"], None, "optim.name", "'adamw' or 'sgd'"),
    ("optim key typo", 2, ["optim.lrr=1"], None, "optim.lrr", "its keys: name, lr, lr_decay"),
    ("top-level typo", 2, ["epoch=3"], None, "epoch", "its keys: encoder, weights, epochs"),
    ("epochs zero", 2, ["epochs=0"], None, "epochs", "greater than or equal to 1"),
    ("ema decay 1", 2, ["ema_decay=1"], None, "ema_decay", "less than 1"),
    ("batch size", 2, ["data.batch_size=0"], None, "data.batch_size", "greater than or equal to 1"),
    ("failed fraction", 2, ["data.max_failed_fraction=2"], None, "data.max_failed_fraction", "less than or equal"),
    ("cache", 2, ["data.cache=gpu"], None, "data.cache", "'auto', 'memory', 'disk' or 'none'"),
    ("size word", 2, ["data.size=[a, 64]"], None, "data.size.0", "one int per spatial dim"),
    ("encoder missing", 2, ["encoder=null"], None, "encoder", "`medxfer models`"),
    ("threshold without target", 2, ["evaluation.threshold=sensitivity"], None, "evaluation", "target: 0.9"),
    ("target 1", 2, ["evaluation.threshold=specificity", "evaluation.target=1"], None, "evaluation.target", "less"),
    ("promotion floor", 2, ["promotion.min_auroc_ci_low=1.5"], None, "promotion.min_auroc_ci_low", "less than"),
    ("augment any dims", 2, ["data.augment.rotation=10"], None, "data.augment", "allowed: flip"),
    ("rotate range", 2, ["data.augment.rotate=400"], None, "data.augment", "rotate must be a number in [0, 180]"),
    ("scale negative", 2, ["data.augment.scale=-0.1"], None, "data.augment", "scale must be a number in [0, 0.9]"),
    ("brightness word", 2, ["data.augment.brightness=lots"], None, "data.augment", "brightness must be a number"),
    ("flip axis 3", 3, ["data.augment.flip=[0, 3]"], None, "data.augment", "list of axes 0-2"),
    # rules that need the spec's dims (load_recipe knows them)
    ("3D key in 2D", 2, ["data.augment.intensity_shift=0.1"], None, "data.augment", "'intensity_shift' for 2D"),
    ("2D key in 3D", 3, ["data.augment.brightness=0.1"], None, "data.augment", "'brightness' for 3D; allowed"),
    ("flip axes in 2D", 2, ["data.augment.flip=[0, 1]"], None, "data.augment", "flip must be true/false, got"),
    ("size 2 for 3D", 3, ["data.size=[64, 64]"], None, "data.size", "data.size: [64, 64, 64]"),
    ("size 3 for 2D", 2, ["data.size=[8, 8, 8]"], None, "data.size", "needs 2 values for a 2D spec"),
    # rules that need the spec's class count (load_recipe(n_classes=...))
    ("alpha short", 2, ["focal.alpha=[0.5, 0.5]"], 3, "focal.alpha", "give one per class, e.g. focal.alpha: [1.0"),
    ("alpha long", 3, ["focal.alpha=[1, 2, 3]"], 2, "focal.alpha", "has 3 values but the spec has 2 classes"),
]


@pytest.mark.parametrize(("dims", "sets", "n_classes", "field", "fix"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_each_bad_value_names_the_field_and_the_fix(
    dims: int, sets: list[str], n_classes: int | None, field: str, fix: str
) -> None:
    msg = _error(dims, sets, n_classes=n_classes)
    assert f"field '{field}" in msg, msg
    assert fix in msg, msg
    assert msg.startswith(f"default_{dims}d.yaml + --set "), msg  # and which file and flags it came from


def test_recipe_file_problems_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml", 2)
    (tmp_path / "list.yaml").write_text("- epochs: 3\n")
    with pytest.raises(SpecError, match="list.yaml: expected a mapping at the top level"):
        load_recipe(tmp_path / "list.yaml", 2)
    (tmp_path / "bad.yaml").write_text("epochs: [3\n")
    with pytest.raises(SpecError, match="bad.yaml: not valid YAML at line"):
        load_recipe(tmp_path / "bad.yaml", 2)
    (tmp_path / "mine.yaml").write_text("epochs: 0\n")
    with pytest.raises(SpecError, match=r"mine.yaml: invalid \(1 problem\(s\)\)\n  - field 'epochs'"):
        load_recipe(tmp_path / "mine.yaml", 2)
    for item, fix in [("optim.lr", "expected key=value, e.g. --set optim.lr=3e-4"), ("a=[1", "not valid YAML")]:
        with pytest.raises(SpecError, match=re.escape(fix)):
            load_recipe(None, 2, [item])


def test_every_problem_is_listed_at_once() -> None:
    msg = _error(3, ["data.size=[64, 64]", "data.augment.brightness=0.1", "focal.alpha=[1]", "optim.lr=0"], n_classes=2)
    assert "invalid (4 problem(s))" in msg
    for field in ("data.size", "data.augment", "focal.alpha", "optim.lr"):
        assert f"field '{field}'" in msg


def test_unknown_augment_keys_list_the_allowed_keys_of_their_dims() -> None:
    # (from tests/data/test_augment2d.py: augment2d reads a recipe checked here)
    msg = _error(2, ["data.augment={flip: true, rotation: 10}"])
    assert "'rotation'" in msg and "rotate" in msg and "brightness" in msg
    msg = _error(3, ["data.augment={flip: true, rotation: 10, brightness: 0.1}"])
    assert "unknown keys 'rotation', 'brightness' for 3D" in msg
    assert all(k in msg for k in AUGMENT_KEYS[3]) and "contrast" not in msg


@pytest.mark.parametrize(
    "cfg", [{"rotate": 400}, {"scale": -0.1}, {"brightness": "lots"}, {"flip": [0, 1]}, {"intensity_shift": 0.1}]
)
def test_2d_augment_out_of_range_or_3d_only_values_are_rejected(cfg: dict) -> None:
    # (from tests/data/test_augment2d.py)
    (key,) = cfg
    with pytest.raises(SpecError, match=key):
        load_recipe(None, 2, [f"data.augment={cfg}"])


# --- check_recipe: the same rules on a built Recipe, with the context the caller has ---------------------------------
def test_check_recipe_checks_only_the_context_it_is_given() -> None:
    recipe = load_recipe(None, 2, ["focal.alpha=[1, 2]"])
    check_recipe(recipe)  # no context: nothing more to check
    check_recipe(recipe, n_classes=2)
    with pytest.raises(SpecError) as exc:
        check_recipe(recipe, dims=3, n_classes=3, source="run.yaml")
    msg = str(exc.value)
    assert msg.startswith("run.yaml: invalid (3 problem(s))")
    assert "data.size needs 3 values for a 3D spec, got [128, 128]" in msg
    assert "unknown keys 'brightness', 'contrast' for 3D" in msg
    assert "focal.alpha has 2 values but the spec has 3 classes" in msg


def test_a_stored_recipe_is_checked_without_dims() -> None:
    tree = load_recipe(None, 2).model_dump(mode="json")
    tree["data"].update(size=None, augment={"flip": [0, 1]})  # a 3D form: allowed until the dims are known
    recipe = recipe_from_dict(tree)
    with pytest.raises(SpecError, match="flip must be true/false, got"):
        check_recipe(recipe, dims=2)
    check_recipe(recipe, dims=3)


GROUP_BAD = [
    ("no groups", [], "encoder", "declares no layer_groups"),
    ("duplicate names", ["stem", "block", "block", "head"], "encoder", "['block'] occur more than once"),
]


@pytest.mark.parametrize(("names", "field", "fix"), [g[1:] for g in GROUP_BAD], ids=[g[0] for g in GROUP_BAD])
def test_layer_group_rules(names: list[str], field: str, fix: str) -> None:
    recipe = load_recipe(None, 3)
    for check in (lambda: check_recipe(recipe, group_names=names), lambda: check_stages(recipe.stages, names)):
        with pytest.raises(SpecError) as exc:
            check()
        assert f"field '{field}'" in str(exc.value) and fix in str(exc.value)
        assert "fix: an encoder name from `medxfer models`" in str(exc.value)
    check_stages(recipe.stages, GROUPS)


def test_check_stages_lists_stage_and_group_problems_together() -> None:
    # the Unfreezer gets stages, not a Recipe: StageCfg lists that never went through Recipe's validator
    with pytest.raises(SpecError) as exc:
        check_stages([StageCfg(epoch=2), StageCfg(groups=1)], ["a", "a"], source="unfreeze")
    msg = str(exc.value)
    assert msg.startswith("unfreeze: invalid (3 problem(s))")
    assert "stages[0].epoch must be 0" in msg and "plateau_patience" in msg and "['a'] occur more than once" in msg
    assert "fix: e.g. [{epoch: 0, groups: 0}" in msg


def test_check_focal_alpha_for_the_loss() -> None:
    check_focal_alpha("auto", 4)
    check_focal_alpha(None, 4)
    check_focal_alpha([0.0, 2.5], 2)
    for alpha, fix in [([0.5, 0.5], "one per class"), ("balanced", "use 'auto', a list of 3 floats, or null")]:
        with pytest.raises(SpecError, match="field 'focal.alpha'") as exc:
            check_focal_alpha(alpha, 3)
        assert fix in str(exc.value)
    with pytest.raises(SpecError, match=r">= 0 and finite, got \[-1.0, nan\]"):
        check_focal_alpha([-1.0, float("nan"), 1.0], 3)


def test_recipe_module_stays_light() -> None:
    """`medxfer check-spec` imports it: no torch, monai or albumentations."""
    import subprocess
    import sys

    code = (
        "import sys, medxfer.config.recipe; "
        "print(sorted(m for m in ('torch', 'monai', 'albumentations') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_model_defaults_form_a_valid_recipe() -> None:
    r = Recipe(encoder="x")
    check_recipe(r, dims=2, n_classes=2, group_names=GROUPS)
    assert r.stages == [StageCfg(epoch=0, groups="all")]
