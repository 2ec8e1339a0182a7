"""The model card (Markdown + JSON) built from run metadata and ``evaluation.json``.

``build_model_card(run_info, evaluation) -> (markdown, card_dict)`` is used by export (here) and by
registration (attached to the model version). Both inputs are PHI-free by construction:

run_info (see :func:`run_info_from_checkpoint`; every key optional except ``run_id``)::

    run_id, run_name, experiment, model_name, model_version, encoder,
    model_args {name, num_classes, in_chans, spatial_dims}, weight_report {source, location, sha256, ...},
    recipe (dict), spec (dict, local paths already replaced), classes, positive_class, task, dims,
    hashes {spec, labelled_content, split}, git_commit, medxfer_version, best_epoch, best_metric,
    ingest {n_studies, n_rejected, reject_reasons {code: n}, modalities {name: n}}, split_report (dict)

evaluation: the ``evaluation.json`` dict written by :mod:`medxfer.evaluation.evaluate`.

The card never prints local paths: spec paths are masked again here (defence in depth) and the
pretrained-weights location is reduced to its file name. Checklist items (TRIPOD+AI 2024 and CLAIM
2020) are marked ``filled`` with the metadata field they come from, or ``not-available`` with what a
human must add; the item texts are short paraphrases, not the official wording.
"""

from __future__ import annotations

import json
import math
from pathlib import PurePath
from typing import Any

from medxfer.config.spec import strip_spec_paths

CARD_SCHEMA = "medxfer-model-card/1"
_METRIC_LABELS = {
    "auroc": "AUROC",
    "auprc": "AUPRC (average precision)",
    "balanced_accuracy": "Balanced accuracy",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "ece": "ECE (15 bins, after calibration)",
    "brier": "Brier score (after calibration)",
}


def run_info_from_checkpoint(
    ckpt: dict[str, Any], tags: dict[str, str] | None = None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The card's run metadata from a training checkpoint dict (plus optional MLflow tags / extra facts)."""
    spec = strip_spec_paths(ckpt.get("spec") or {})
    tags = tags or {}
    info: dict[str, Any] = {
        "run_id": ckpt.get("run_id") or tags.get("run_id"),
        "run_name": tags.get("mlflow.runName"),
        "experiment": spec.get("name"),
        "encoder": ckpt.get("encoder") or (ckpt.get("model_args") or {}).get("name"),
        "model_args": ckpt.get("model_args"),
        "weight_report": ckpt.get("weight_report"),
        "recipe": ckpt.get("recipe"),
        "spec": spec,
        "classes": list(ckpt.get("classes") or spec.get("classes") or []),
        "positive_class": spec.get("positive_class"),
        "task": spec.get("task"),
        "dims": spec.get("dims"),
        "hashes": ckpt.get("hashes"),
        "git_commit": tags.get("medxfer.git_commit") or tags.get("mlflow.source.git.commit"),
        # Counted from 1 as the console, MLflow steps and plots count it (best.pt holds the loop's 0-based index).
        "best_epoch": None if _int_or_none(ckpt.get("epoch")) is None else int(ckpt["epoch"]) + 1,
        "best_metric": ckpt.get("best_metric"),
    }
    info.update(extra or {})
    return info


def _int_or_none(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _fmt_ci(m: dict[str, Any] | None) -> str:
    if not m:
        return "n/a"
    s = _fmt(m.get("value"))
    if m.get("ci_low") is not None and m.get("ci_high") is not None:
        s += f" [{_fmt(m['ci_low'])}, {_fmt(m['ci_high'])}]"
    return s


def _get(d: Any, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


# ---------------------------------------------------------------------------- sections


def _details(run: dict[str, Any], ev: dict[str, Any]) -> dict[str, Any]:
    wr = run.get("weight_report") or {}
    loc = wr.get("location")
    classes = ev.get("classes") or run.get("classes") or []
    args = run.get("model_args") or {}
    size = _get(run, "recipe", "data", "size") or _get(run, "spec", "preprocess", "size")
    return {
        "name": run.get("model_name") or run.get("experiment"),
        "version": run.get("model_version"),
        "run_id": run.get("run_id") or ev.get("run_id"),
        "task": ev.get("task") or run.get("task"),
        "classes": classes,
        "positive_class": ev.get("positive_class") or run.get("positive_class"),
        "architecture": run.get("encoder") or args.get("name"),
        "input": {
            "spatial_dims": args.get("spatial_dims") or run.get("dims"),
            "channels": args.get("in_chans"),
            "size": size,
        },
        "pretrained_weights": {
            "source": wr.get("source"),
            "file": PurePath(str(loc)).name if loc and wr.get("source") == "file" else loc,
            "sha256": wr.get("sha256"),
            "head_reinitialized": wr.get("head_reinitialized"),
        },
        "output": (
            "calibrated class probabilities (temperature scaling) and a decision: "
            + (
                "positive when P(" + str(ev.get("positive_class")) + ") >= threshold"
                if ev.get("threshold") is not None
                else "the most probable class"
            )
            + (
                f"; logits averaged over the input and {(ev.get('tta') or {}).get('views', 1) - 1} mirror "
                "image(s) (test-time mirroring)"
                if (ev.get("tta") or {}).get("views", 1) > 1
                else ""
            )
        ),
        "medxfer_version": run.get("medxfer_version") or ev.get("medxfer_version"),
        "git_commit": run.get("git_commit"),
        "hashes": run.get("hashes") or ev.get("hashes"),
    }


def _intended_use(run: dict[str, Any], ev: dict[str, Any]) -> dict[str, Any]:
    spec = run.get("spec") or {}
    dims = spec.get("dims") or run.get("dims")
    mods = ", ".join(sorted((run.get("ingest") or {}).get("modalities", {}) or []))
    mods = f"{mods} " if mods else ""
    classes = ", ".join(ev.get("classes") or run.get("classes") or [])
    return {
        "primary": (
            f"Research use: {ev.get('task') or run.get('task')} classification ({classes}) of {dims}D "
            f"{mods}images from the population, sites and protocols represented in the '{spec.get('name')}' "
            "dataset, as decision support that a qualified reader reviews."
        ),
        "users": "Clinical researchers and ML engineers validating the model on their own data before any use.",
        "out_of_scope": [
            "Autonomous diagnosis or any clinical decision without independent clinical validation; "
            "this is not a regulated medical device.",
            "Modalities, body regions, scanners, protocols, sites or patient populations not represented in "
            "the training data (including paediatric data unless present in training).",
            "Series the selection rules would exclude (e.g. localizers, derived or secondary images).",
            "Inputs preprocessed differently from preprocessing.json.",
            "Prevalences far from the development data without re-checking PPV/NPV and the threshold.",
        ],
    }


def _data(run: dict[str, Any], ev: dict[str, Any]) -> dict[str, Any]:
    spec = run.get("spec") or {}
    ing = run.get("ingest") or {}
    return {
        "source_kind": _get(spec, "source", "kind"),
        "dataset": spec.get("name"),
        "label_key": _get(spec, "labels", "key"),
        "n_studies": ing.get("n_studies"),
        "n_rejected": ing.get("n_rejected"),
        "reject_reasons": ing.get("reject_reasons"),
        "modalities": ing.get("modalities"),
        "deidentification": (
            "Pseudonymised at ingest: patient and study identifiers are replaced by HMAC-SHA256 pseudonyms "
            "under a secret key kept outside tracking. Patient names, IDs, dates, institutions and source paths "
            "never leave ingest (not in logs, MLflow params/tags/artifacts, this card or model examples). "
            "Pixel data are used as stored; burned-in text is not removed by medxfer."
        ),
    }


def _series(run: dict[str, Any]) -> dict[str, Any]:
    spec = run.get("spec") or {}
    rules = dict(spec.get("series") or {})
    return {
        "rules": rules,
        "preprocess": spec.get("preprocess"),
        "size": _get(run, "recipe", "data", "size"),
        "summary": _series_text(rules),
    }


def _series_text(rules: dict[str, Any]) -> str:
    parts = []
    if rules.get("modality"):
        parts.append("modality in " + ", ".join(rules["modality"]))
    if rules.get("description_include"):
        parts.append("description matches " + " or ".join(rules["description_include"]))
    if rules.get("description_exclude"):
        parts.append("description does not match " + " or ".join(rules["description_exclude"]))
    excl = rules.get("imagetype_exclude")
    if excl is None:
        parts.append("ImageType excludes LOCALIZER, and DERIVED/SECONDARY for CT/MR/PT/NM (defaults)")
    elif excl:
        parts.append("ImageType excludes " + ", ".join(excl))
    else:
        parts.append("no ImageType exclusion")
    parts.append(f"at least {rules.get('min_slices', 1)} slice(s)")
    if rules.get("prefer"):
        parts.append("ties broken by " + ", ".join(rules["prefer"]) + ", then most slices")
    else:
        parts.append("ties broken by most slices")
    return "; ".join(parts)


def _split(run: dict[str, Any], ev: dict[str, Any]) -> dict[str, Any]:
    spec = run.get("spec") or {}
    pol = dict(spec.get("split") or {})
    rep = run.get("split_report") or {}
    return {
        "policy": pol,
        "unit": "patient" if pol.get("group_by_patient", True) else "study",
        "counts": ev.get("counts") or rep.get("counts"),
        "patients": ev.get("patients"),
        "split_hash": rep.get("split_hash") or _get(run, "hashes", "split"),
    }


# Held by tests/test_reproducibility.py: two fresh processes, two workspaces (two pseudonym keys), two
# PYTHONHASHSEEDs give the same weights SHA-256. One torch thread instead of two changed the weights there
# (float sums regroup), hence the thread-count condition.
REPRODUCIBILITY = (
    "the same spec, recipe and seed give bit-identical weights in a new process, on the same hardware, "
    "library versions and torch thread count"
)


def _training(run: dict[str, Any]) -> dict[str, Any]:
    r = run.get("recipe") or {}
    return {
        "encoder": r.get("encoder"),
        "epochs": r.get("epochs"),
        "stages": r.get("stages"),
        "optimizer": r.get("optim"),
        "loss": r.get("loss"),
        "focal": r.get("focal"),
        "select_metric": r.get("select_metric"),
        "seed": r.get("seed"),
        "augment": _get(r, "data", "augment"),
        "best_epoch": run.get("best_epoch"),
        "best_val_metric": run.get("best_metric"),
        "reproducibility": REPRODUCIBILITY,
    }


def _limitations(run: dict[str, Any], ev: dict[str, Any]) -> list[str]:
    out = []
    n_test = sum((_get(ev, "counts", "test") or {}).values()) if _get(ev, "counts", "test") else None
    auroc = _get(ev, "test", "auroc") or {}
    if auroc.get("ci_low") is not None and auroc.get("ci_high") is not None:
        width = auroc["ci_high"] - auroc["ci_low"]
        out.append(
            f"The test set has {n_test if n_test is not None else 'few'} studies; the AUROC 95% CI is "
            f"{width:.2f} wide. Treat point estimates accordingly."
        )
    skipped = _get(ev, "bootstrap", "n_skipped")
    if skipped:
        out.append(
            f"{skipped} of {_get(ev, 'bootstrap', 'n_resamples')} bootstrap resamples lacked a class and were "
            "skipped; CIs rest on the remaining ones."
        )
    out += [w[0].upper() + w[1:] + "." for w in ev.get("warnings") or [] if "bootstrap" not in w]
    out.append(
        "The threshold and the temperature were fitted on the "
        + ("out-of-fold predictions" if ev.get("validation_source") == "out_of_fold" else "validation split")
        + "; a site with different "
        "prevalence or scanners should re-check both on local data."
    )
    out.append("Internal validation only (held-out patients from the same data source); no external validation.")
    tr = ev.get("transfer")
    if tr and tr.get("negative_transfer"):
        out.append(
            "Negative transfer flag: the pretrained model was not shown better than the "
            f"{tr.get('control_kind') or 'control'} arm on the same test studies (AUROC gain "
            f"{_fmt_ci(tr.get('gain'))})."
        )
    if (ev.get("subgroups") or {}).get("recorded"):
        out.append(
            "Subgroup performance by sex, age and site was not assessed (not carried past ingest); by scanner "
            "manufacturer and model see 'Domain shift' (groups under the size rule are listed as too few)."
        )
    else:
        out.append(
            "Subgroup performance (sex, age, site, scanner) was not assessed: no scanner manufacturer was recorded "
            "and the other attributes are not carried past ingest."
        )
    ood = ev.get("ood") or {}
    if ood.get("fitted"):
        out.append(
            "The OOD flag (ood_flag) is a warning, not a guarantee: it catches inputs whose features lie far from the "
            "validation studies' (another modality, another kind of image); a shift the features do not show, e.g. "
            "a new scanner with similar-looking images, can pass unflagged."
        )
    return out


def _domain_shift(ev: dict[str, Any]) -> dict[str, Any]:
    ood = dict(ev.get("ood") or {})
    for k in ("val_scores", "test_scores", "sha256", "file"):
        ood.pop(k, None)
    return {"ood": ood or None, "subgroups": ev.get("subgroups")}


def _domain_shift_markdown(card: dict[str, Any]) -> list[str]:
    ds = card.get("domain_shift") or {}
    o, sg = ds.get("ood") or {}, ds.get("subgroups") or {}
    L = ["## Domain shift", ""]
    if o.get("fitted"):
        L += [
            f"- Out-of-distribution score: {o.get('description')} ({o.get('method')}), on {o.get('features')}.",
            f"- Fitted on {o.get('n_fit')} validation studies ({o.get('n_components')} of {o.get('feature_dim')} "
            f"feature dimensions kept); flag threshold {_fmt(o.get('threshold'))} = {o.get('threshold_rule')}.",
            f"- Flag rate: validation {_pct(o.get('val_flag_rate'))} (cross-fitted), "
            f"test {_pct(o.get('test_flag_rate'))} ({o.get('test_flagged')} of {o.get('n_test')} studies). "
            "Predict adds `ood_score` and `ood_flag`.",
        ]
    else:
        L.append(f"- No OOD statistics: {o.get('reason') or 'not evaluated'}; predict leaves ood_score/ood_flag empty.")
    L.append("")
    if sg:
        L += [f"Test metrics by scanner; rule: {sg.get('rule')}.", ""]
        names = sg.get("metrics") or []
        for by, title in (("manufacturer", "manufacturer"), ("manufacturer_model", "manufacturer / model")):
            rows = (sg.get("by") or {}).get(by) or []
            L += [
                f"| {title} | studies | " + " | ".join(names) + " | OOD flagged | status |",
                "|---" * (len(names) + 4) + "|",
            ]
            for r in rows:
                m = r.get("metrics") or {}
                L.append(
                    f"| {r['group']} | {r['n_studies']} | "
                    + " | ".join(_fmt(m.get(n)) for n in names)
                    + f" | {_pct(r.get('ood_flag_rate'))} | {r['status']} |"
                )
            L.append("")
    return L


def _scanner_groups(card: dict[str, Any]) -> dict[str, Any] | None:
    sg = (card.get("domain_shift") or {}).get("subgroups") or {}
    if not sg.get("recorded"):
        return None
    rows = (sg.get("by") or {}).get("manufacturer_model") or []
    return {"rule": sg.get("rule"), "groups": {r["group"]: r["status"] for r in rows}}


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * float(v):.1f}%"


# ---------------------------------------------------------------------------- checklists


def _item(item: str, topic: str, value: Any, source: str, missing: str = "") -> dict[str, Any]:
    filled = value not in (None, "", [], {})
    return {
        "item": item,
        "topic": topic,
        "status": "filled" if filled else "not-available",
        "source": source if filled else None,
        "value": value if filled else None,
        "note": None if filled else (missing or "not recorded by the pipeline; add manually"),
    }


def _checklists(card: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    d, data, split, perf = card["model"], card["data"], card["split"], card["performance"]
    cal, thr, tr, trn = card["calibration"], card["threshold"], card.get("transfer"), card["training"]
    pre = card["series_selection"]
    metrics_listed = sorted((perf.get("test") or {}).keys())
    ci_text = (
        f"patient-level percentile bootstrap, {_get(perf, 'bootstrap', 'n_resamples')} resamples"
        if perf.get("bootstrap")
        else None
    )
    manual = "study-level fact; add manually"
    tripod = [
        _item(
            "3b",
            "Target population, care setting, intended users",
            card["intended_use"]["primary"],
            "model card: intended use (from spec)",
        ),
        _item(
            "5a",
            "Data sources",
            data.get("source_kind") and f"{data['source_kind']} dataset '{data['dataset']}'",
            "spec.source.kind, spec.name",
            "describe the site(s) and how the data were collected",
        ),
        _item(
            "5b",
            "Dates of data collection",
            None,
            "",
            "dates are not carried past ingest (PHI policy); add the accrual period manually",
        ),
        _item("6b", "Eligibility criteria", pre.get("summary"), "spec.series (series selection rules)"),
        _item(
            "7",
            "Data preparation and quality checking",
            {"preprocess": pre.get("preprocess"), "rejected_at_ingest": data.get("reject_reasons")},
            "spec.preprocess, ingest report",
        ),
        _item(
            "8a",
            "Outcome definition",
            d.get("classes") and f"label column '{data.get('label_key')}' -> classes {d['classes']}",
            "spec.labels, spec.classes",
            "how the reference labels were established",
        ),
        _item("10", "Sample size", split.get("counts"), "split report (per-split class counts)"),
        _item("12a", "How data were used (partitioning)", split.get("policy"), "spec.split"),
        _item("12b", "Predictor handling (rescaling, transformation)", pre.get("preprocess"), "spec.preprocess"),
        _item(
            "12c",
            "Model type, building steps, tuning, internal validation",
            {k: trn.get(k) for k in ("encoder", "epochs", "stages", "optimizer", "loss", "select_metric")},
            "recipe",
        ),
        _item(
            "12e",
            "Performance measures and plots",
            metrics_listed and metrics_listed + ["ROC", "PR", "reliability diagram", "confusion matrix"],
            "evaluation.json",
        ),
        _item("12f", "Model updating / recalibration", cal.get("method"), "evaluation.calibration"),
        _item(
            "13",
            "Class imbalance handling",
            {"loss": trn.get("loss"), "focal": trn.get("focal")} if trn.get("loss") else None,
            "recipe.loss, recipe.focal",
        ),
        _item(
            "14",
            "Fairness",
            _scanner_groups(card),
            "evaluation.subgroups (scanner manufacturer and model only)",
            "no scanner manufacturer recorded, and sex/age/site are not carried past ingest; assess separately",
        ),
        _item("15", "Model output and threshold", {"output": d.get("output"), "threshold": thr}, "evaluation"),
        _item("18e", "Data availability", None, "", manual),
        _item(
            "18f",
            "Code availability",
            d.get("git_commit") and f"medxfer {d.get('medxfer_version')} at commit {d['git_commit']}",
            "git commit tag",
            "record the code version",
        ),
        _item(
            "20a",
            "Participant flow",
            {"n_studies": data.get("n_studies"), "n_rejected": data.get("n_rejected"), "split": split.get("counts")}
            if split.get("counts")
            else None,
            "ingest report, split report",
        ),
        _item("21", "Participants and outcome events per analysis", split.get("counts"), "evaluation.counts"),
        _item(
            "22",
            "Full model specification",
            {"architecture": d.get("architecture"), "input": d.get("input"), "weights": "weights.safetensors"},
            "bundle",
        ),
        _item("23a", "Performance with confidence intervals", perf.get("test") and ci_text, "evaluation.test"),
        _item("26", "Limitations", card.get("limitations"), "model card: limitations"),
    ]
    claim = [
        _item("7", "Data sources", tripod[1]["value"], "spec.source.kind, spec.name"),
        _item("8", "Eligibility criteria", pre.get("summary"), "spec.series"),
        _item("9", "Data preprocessing steps", pre.get("preprocess"), "spec.preprocess, recipe.data.size"),
        _item("12", "De-identification methods", data.get("deidentification"), "pipeline policy (ingest)"),
        _item(
            "14",
            "Definition of ground truth",
            tripod[5]["value"],
            "spec.labels",
            "how the reference labels were established",
        ),
        _item("16", "Source and qualification of annotators", None, "", manual),
        _item("20", "How data were assigned to partitions", split.get("policy"), "spec.split"),
        _item("21", "Level at which partitions are disjoint", split.get("unit"), "spec.split.group_by_patient"),
        _item(
            "22",
            "Model description (inputs, outputs, architecture)",
            {"architecture": d.get("architecture"), "input": d.get("input")},
            "checkpoint",
        ),
        _item(
            "23",
            "Software libraries and versions",
            d.get("medxfer_version") and f"medxfer {d['medxfer_version']}",
            "package metadata",
        ),
        _item(
            "24",
            "Initialisation of model parameters (transfer learning)",
            d.get("pretrained_weights", {}).get("source") and d["pretrained_weights"],
            "checkpoint.weight_report",
        ),
        _item(
            "25",
            "Training details (augmentation, hyperparameters)",
            trn.get("optimizer") and {k: trn.get(k) for k in ("optimizer", "augment", "epochs", "stages", "seed")},
            "recipe",
        ),
        _item(
            "26",
            "Method of selecting the final model",
            trn.get("select_metric") and f"best validation {trn['select_metric']} (epoch {trn.get('best_epoch')})",
            "recipe.select_metric",
        ),
        _item("28", "Metrics of model performance", metrics_listed, "evaluation.json"),
        _item("29", "Statistical measures of uncertainty", ci_text, "evaluation.bootstrap"),
        _item(
            "30",
            "Robustness or sensitivity analysis",
            tr and {"control": tr.get("control_kind"), "gain": tr.get("gain")},
            "evaluation.transfer",
            "no control arm was trained",
        ),
        _item("32", "Validation on external data", None, "", "internal validation only"),
        _item("35", "Performance on all data partitions", perf.get("val") and ["val", "test"], "evaluation.json"),
        _item(
            "36", "Estimates of diagnostic performance and precision", perf.get("test") and ci_text, "evaluation.test"
        ),
        _item("38", "Study limitations", card.get("limitations"), "model card: limitations"),
    ]
    return {"TRIPOD+AI (2024)": tripod, "CLAIM (2020)": claim}


# ---------------------------------------------------------------------------- assembly


def build_model_card(run_info: dict[str, Any], evaluation: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(Markdown, JSON-safe dict) for one trained, evaluated model."""
    run = dict(run_info or {})
    if isinstance(run.get("spec"), dict):
        run["spec"] = strip_spec_paths(run["spec"])
    ev = evaluation or {}
    card: dict[str, Any] = {
        "schema": CARD_SCHEMA,
        "model": _details(run, ev),
        "intended_use": _intended_use(run, ev),
        "data": _data(run, ev),
        "series_selection": _series(run),
        "split": _split(run, ev),
        "training": _training(run),
        "performance": {
            "test": ev.get("test"),
            "val": ev.get("val"),
            "per_class": ev.get("per_class"),
            "bootstrap": ev.get("bootstrap"),
            "confusion_matrix": ev.get("confusion_matrix"),
        },
        "calibration": ev.get("calibration") or {},
        "threshold": {"value": ev.get("threshold"), **(ev.get("threshold_policy") or {})},
        "transfer": ev.get("transfer"),
        "race": ev.get("race"),
        "validation_source": ev.get("validation_source") or "val_split",
        "domain_shift": _domain_shift(ev),
    }
    card["limitations"] = _limitations(run, ev)
    card["checklists"] = _checklists(card)
    card = json.loads(json.dumps(card, default=str))  # JSON-safe: Paths, numpy scalars -> plain values
    return render_markdown(card), card


_FITTED_ON = {"out_of_fold": "out-of-fold predictions (each study scored by the fold model that did not train on it)"}


def _race_markdown(race: dict[str, Any] | None) -> list[str]:
    """`run --auto`'s arm race: every arm with its out-of-fold AUROC, the decision and why, the transfer gain."""
    if not race:
        return []
    from medxfer.planning.race import fmt_interval

    L = ["## Arm race (`medxfer run --auto`)", ""]
    if race.get("negative_transfer"):
        L += ["**Negative transfer: scratch was chosen.** The scratch control beat or tied the pretrained arms.", ""]
    L += [
        f"The winner, **{race.get('winner')}**, is this model: the ensemble of its {race.get('folds')} fold models "
        "(mean of their logits). Calibration and the threshold were fitted on its out-of-fold predictions.",
        "",
        f"- Decision: {race.get('reason')}",
        f"- Rule: {race.get('selection') or 'out-of-fold AUROC; ties go to the simpler/cheaper arm'}",
    ]
    g = race.get("transfer_gain")
    if g:
        L.append(
            f"- Transfer gain ({g.get('arm')} - {g.get('control')}, out-of-fold AUROC, paired patient bootstrap): "
            f"{fmt_interval(g, True)}"
        )
    else:
        L.append("- Transfer gain: n/a (no scratch arm, or no transfer arm, raced)")
    b, p, a = race.get("budget_s"), race.get("planned_s"), race.get("actual_s")
    L.append(
        f"- Budget {_fmt(b, 0)} s; training planned {_fmt(p, 0)} s, took {_fmt(a, 0)} s"
        + (f"; whole run {_fmt(race['actual_total_s'], 0)} s" if race.get("actual_total_s") is not None else "")
    )
    L += ["", "| arm | kind | folds | out-of-fold AUROC [95% CI] | difference vs best [95% CI] | seconds | outcome |"]
    L.append("|---|---|---|---|---|---|---|")
    for arm in race.get("arms") or []:
        stopped = arm.get("eliminated_at_rung")
        outcome = (
            "**winner**"
            if arm.get("name") == race.get("winner")
            else (f"stopped after rung {stopped}" if stopped is not None else "finalist")
        )
        L.append(
            f"| {arm.get('name')} | {arm.get('kind')} | {', '.join(str(f) for f in arm.get('folds') or [])} | "
            f"{fmt_interval(arm.get('oof_auroc'))} | {fmt_interval(arm.get('diff_vs_best'), True)} | "
            f"{_fmt(arm.get('seconds'), 0)} | {outcome} |"
        )
    L.append("")
    return L


def render_markdown(card: dict[str, Any]) -> str:
    d = card["model"]
    L: list[str] = [
        f"# Model card: {d.get('name') or 'medxfer model'}" + (f" v{d['version']}" if d.get("version") else ""),
        "",
    ]
    L += [
        "## Model details",
        "",
        f"- Task: {d.get('task')}; classes: {', '.join(d.get('classes') or [])}"
        + (f"; positive class: {d['positive_class']}" if d.get("positive_class") else ""),
        f"- Architecture: {d.get('architecture')}; input: {d['input'].get('spatial_dims')}D, "
        f"{d['input'].get('channels')} channel(s), size {d['input'].get('size')}",
        f"- Pretrained weights: {d['pretrained_weights'].get('source')}"
        + (f" ({d['pretrained_weights']['file']})" if d["pretrained_weights"].get("file") else "")
        + (f", sha256 {d['pretrained_weights']['sha256'][:16]}..." if d["pretrained_weights"].get("sha256") else ""),
        f"- Output: {d.get('output')}",
        f"- Training run: {d.get('run_id')}; medxfer {d.get('medxfer_version') or 'n/a'}; "
        f"git commit {d.get('git_commit') or 'n/a'}",
        f"- Hashes: {json.dumps(d.get('hashes') or {}, sort_keys=True)}",
        "",
    ]
    iu = card["intended_use"]
    L += (
        ["## Intended use", "", iu["primary"], "", f"Intended users: {iu['users']}", "", "## Out-of-scope use", ""]
        + [f"- {x}" for x in iu["out_of_scope"]]
        + [""]
    )
    data = card["data"]
    L += [
        "## Data and de-identification",
        "",
        f"- Source: {data.get('source_kind')} dataset '{data.get('dataset')}'; labels keyed by {data.get('label_key')}",
        f"- Studies used: {_fmt(data.get('n_studies'))}; rejected at ingest: {_fmt(data.get('n_rejected'))}"
        + (f" ({json.dumps(data['reject_reasons'], sort_keys=True)})" if data.get("reject_reasons") else ""),
        f"- De-identification: {data['deidentification']}",
        "",
    ]
    ss = card["series_selection"]
    L += [
        "## Series selection and preprocessing",
        "",
        f"- Series selection: {ss['summary']}",
        f"- Preprocessing: {json.dumps(ss.get('preprocess'), sort_keys=True)}; network input size {ss.get('size')}",
        "",
    ]
    sp = card["split"]
    L += [
        "## Split",
        "",
        f"- Policy: {json.dumps(sp.get('policy'), sort_keys=True)}; disjoint by {sp.get('unit')}",
        f"- Split hash: {sp.get('split_hash') or 'n/a'}",
        "",
    ]
    counts = sp.get("counts") or {}
    classes = d.get("classes") or sorted({c for v in counts.values() for c in v})
    if counts:
        L += ["| split | " + " | ".join(classes) + " | total | patients |", "|---" * (len(classes) + 3) + "|"]
        for s in ("train", "val", "test"):
            if s in counts:
                row = counts[s]
                L.append(
                    f"| {s} | "
                    + " | ".join(str(row.get(c, 0)) for c in classes)
                    + f" | {sum(row.values())} | {_fmt((sp.get('patients') or {}).get(s))} |"
                )
        L.append("")
    tr = card["training"]
    L += [
        "## Training",
        "",
        f"- Encoder {tr.get('encoder')}, {tr.get('epochs')} epochs, loss {tr.get('loss')}, "
        f"optimizer {json.dumps(tr.get('optimizer'), sort_keys=True)}",
        f"- Unfreezing stages: {json.dumps(tr.get('stages'))}",
        f"- Model selection: best validation {tr.get('select_metric')} at epoch {_fmt(tr.get('best_epoch'))}",
        f"- Reproducibility: seed {tr.get('seed')}; {tr.get('reproducibility') or REPRODUCIBILITY}",
        "",
    ]
    perf = card["performance"]
    bs = perf.get("bootstrap") or {}
    L += [
        "## Performance (test split)",
        "",
        f"95% CIs: patient-level percentile bootstrap, {bs.get('n_resamples')} resamples "
        f"(seed {bs.get('seed')}; {bs.get('n_skipped', 0)} skipped for lacking a class). "
        + (
            "Threshold metrics at the validation-chosen threshold."
            if card["threshold"].get("value") is not None
            else "Multiclass: macro averages of one-vs-rest metrics, decision = argmax."
        ),
        "",
        "| metric | test [95% CI] | validation |",
        "|---|---|---|",
    ]
    for key, label in _METRIC_LABELS.items():
        L.append(
            f"| {label} | {_fmt_ci((perf.get('test') or {}).get(key))} | "
            f"{_fmt(((perf.get('val') or {}).get(key) or {}).get('value'))} |"
        )
    L.append("")
    per_class = (perf.get("per_class") or {}).get("test")
    if per_class:
        L += [
            "Per class (test, one-vs-rest):",
            "",
            "| class | AUROC | AUPRC | sensitivity | specificity | PPV | NPV |",
            "|---|---|---|---|---|---|---|",
        ]
        for c, m in per_class.items():
            L.append(
                f"| {c} | "
                + " | ".join(_fmt(m.get(k)) for k in ("auroc", "auprc", "sensitivity", "specificity", "ppv", "npv"))
                + " |"
            )
        L.append("")
    cal, thr = card["calibration"], card["threshold"]
    L += [
        "## Calibration and threshold",
        "",
        f"- Calibration fitted on {_FITTED_ON.get(card.get('validation_source'), 'validation')}: "
        f"{cal.get('method', 'temperature')}, T = {_fmt(cal.get('temperature'))}"
        + (f", bias {[round(b, 3) for b in cal['bias']]}" if any(cal.get("bias") or []) else "")
        + (f" ({cal['reason']})" if cal.get("reason") else ""),
        f"- Test ECE {_fmt(_get(cal, 'test', 'ece_before'))} -> {_fmt(_get(cal, 'test', 'ece_after'))}; "
        f"Brier {_fmt(_get(cal, 'test', 'brier_before'))} -> {_fmt(_get(cal, 'test', 'brier_after'))} "
        "(before -> after)",
    ]
    if thr.get("value") is not None:
        L.append(
            f"- Operating threshold {_fmt(thr['value'], 4)} on the calibrated P({d.get('positive_class')}), "
            f"policy {thr.get('policy')}"
            + (f" (target {thr['target']})" if thr.get("target") else "")
            + f"; validation sensitivity {_fmt(thr.get('val_sensitivity'))}, "
            f"specificity {_fmt(thr.get('val_specificity'))}"
        )
    else:
        L.append("- Decision: argmax of the calibrated probabilities (no threshold)")
    L.append("")
    t = card.get("transfer")
    L += ["## Transfer gain", ""]
    if t:
        flag = "**NEGATIVE TRANSFER FLAG**: " if t.get("negative_transfer") else ""
        L += [
            f"- {flag}AUROC main {_fmt(t.get('main'))} vs {t.get('control_kind') or 'control'} "
            f"{_fmt(t.get('control'))}: gain {_fmt_ci(t.get('gain'))} (paired patient bootstrap); "
            f"verdict: {t.get('verdict')}",
            f"- Rule: {t.get('rule')}",
            "",
        ]
    elif not card.get("race"):
        L += ["- No control arm was trained for this run (`medxfer train --control scratch` adds one).", ""]
    else:
        L += ["- The scratch control raced as an arm: see the arm race below for the out-of-fold transfer gain.", ""]
    L += _race_markdown(card.get("race"))
    L += _domain_shift_markdown(card)
    L += ["## Limitations", ""] + [f"- {x}" for x in card["limitations"]] + [""]
    L += [
        "## Reporting checklists",
        "",
        "Items this run's metadata can fill; `not-available` items need a human. Paraphrased item topics.",
        "",
    ]
    for name, items in card["checklists"].items():
        L += [f"### {name}", "", "| item | topic | status | source |", "|---|---|---|---|"]
        for it in items:
            L.append(f"| {it['item']} | {it['topic']} | {it['status']} | {it['source'] or it['note']} |")
        L.append("")
    return "\n".join(L)
