"""The MLflow pyfunc that ``medxfer register`` logs, as code (MLflow "models from code").

MLflow copies this file into the model and runs it at load time; the model's artifacts hold
the medxfer bundle (weights as safetensors, ``preprocessing.json``), so nothing is unpickled.
Loading needs medxfer installed in the environment (it brings the readers and transforms
training used, which is what makes the preprocessing identical).

    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model("models:/NAME@candidate")
    model.predict(pd.DataFrame({"path": ["study_folder/", "scan.nii.gz"]}))

Input: a DataFrame with a ``path`` column (a DICOM series folder, a DICOM file or a NIfTI file;
a list of paths or a single path string also works). Output: one row per study, with ``row``
(1-based), ``input_key`` (a pseudonym of the input string: HMAC under ``MEDXFER_PSEUDONYM_KEY`` when
set, else under a random key made once per process, so keys match within one process only),
calibrated ``prob_<class>``, ``decision``, ``model_name``, ``model_version`` and ``error``
("REASON_CODE: message" for an input that cannot be used; its probabilities are NaN). The input strings
themselves are not echoed (folder names often name patients); model config ``echo_input: true``
(``mlflow.pyfunc.load_model(uri, model_config={"echo_input": True})``) adds an ``input`` column with them.
Model config ``device`` ("cpu", "cuda") overrides the default (CUDA when available).
A fold ensemble (``medxfer run --auto``) loads as one model: the bundle's Predictor averages its members' logits.
Every scored row also gets ``ood_score`` (distance of its encoder features to the validation studies', see
medxfer.stats.ood) and ``ood_flag`` (score above the threshold fitted on validation); both are empty for error rows
and for a model registered before OOD statistics existed.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from medxfer import tracking
from medxfer.core.errors import DataError


def _paths(model_input: Any) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        if "path" not in model_input.columns:
            raise DataError(
                f"input needs a 'path' column; got columns {list(model_input.columns)[:20]}: "
                "pass pd.DataFrame({'path': [...]}) with one study folder or file per row"
            )
        values = model_input["path"].tolist()
    elif isinstance(model_input, dict) and "path" in model_input:
        values = model_input["path"]
        values = [values] if isinstance(values, str) else list(values)
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        values = list(model_input)
    return ["" if v is None else str(v) for v in values]


class MedxferModel(tracking.python_model_base()):
    def load_context(self, context) -> None:
        from medxfer.handoff.predict import load_predictor

        cfg = dict(context.model_config or {})
        self.model_name = cfg.get("model_name")
        self.model_version = None if cfg.get("model_version") is None else str(cfg["model_version"])
        self.predictor = load_predictor(context.artifacts["bundle"], device=cfg.get("device"))
        self.echo_input = bool(cfg.get("echo_input", False))

    # pd.DataFrame: a hint MLflow accepts without deriving a schema from it (the logged signature is the contract).
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from medxfer.handoff.predict import input_pseudonymizer, shareable_output

        df = self.predictor.predict(_paths(model_input), model_name=self.model_name, model_version=self.model_version)
        return shareable_output(df, input_pseudonymizer(None), self.echo_input)


tracking.set_model(MedxferModel())
