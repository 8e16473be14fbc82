"""The MLflow pyfunc of every logged deepimage model, one resolution or the ensemble: built in
load_context from the model's artifacts (a JSON description and each member's weights), so the
model holds data only and this package (shipped with it as code_paths) is the code."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from mlflow.pyfunc import PythonModel

from deepimage.registry.classifier import Ensemble

SPEC_ARTIFACT = "classifier"   # the JSON description: classes, members (artifact, resolution, ...)


class ClassifierModel(PythonModel):
    """Input: a DataFrame with an `image` column of encoded image bytes (base64 in JSON requests).
    Output: Ensemble.frame, one row per image."""

    def load_context(self, context) -> None:
        spec = json.loads(Path(context.artifacts[SPEC_ARTIFACT]).read_text())
        self.ensemble = Ensemble.from_files(spec, context.artifacts)

    # DataFrame hints: MLflow 3 stops asking for type hints, and since it infers no schema from
    # them the signature logged with the model (a column of image bytes) stays the contract.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return self.ensemble.answer(model_input)
