"""Opening a logged deepimage model as an Ensemble, reading its weights and JSON only: neither
its pickles nor its code run (predict and the benchmarks use this; `mlflow models serve` runs
the model's own pyfunc)."""
from __future__ import annotations

import json
from pathlib import Path

from deepimage.registry.classifier import Ensemble
from deepimage.registry.log import FORMAT, mlflow_on
from deepimage.registry.pyfunc import SPEC_ARTIFACT


def _inside(folder: Path, relpath: str, model_uri: str) -> str:
    """folder/relpath, refused when it leads out of the model's folder."""
    path = (folder / relpath).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ValueError(f"{model_uri}: artifact {relpath!r} lies outside the model's folder; refused")
    return str(path)


def load_classifier(model_uri: str, tracking_uri: str | None = None) -> Ensemble:
    """Any logged deepimage model (the ensemble or one resolution's) as an Ensemble:
    `models:/name@alias`, `models:/name/version`, `runs:/<id>/<name>`, or a folder. A pickled
    model (the PyTorch flavour, a cloudpickled python model) is refused unread."""
    import mlflow
    from mlflow.models import Model

    if tracking_uri:
        mlflow_on(tracking_uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri) \
        if "://" in model_uri or model_uri.startswith(("models:", "runs:")) else model_uri
    if not (Path(local) / "MLmodel").is_file():
        raise ValueError(f"{model_uri}: no MLmodel file there; give a model folder, runs:/<id>/<name> "
                         "or models:/<name>@<alias>")
    info = Model.load(local)
    pyfunc = info.flavors.get("python_function", {})
    if "pytorch" in info.flavors or "python_model" in pyfunc:
        kind = "PyTorch flavour" if "pytorch" in info.flavors else "cloudpickled python model"
        raise ValueError(f"{model_uri}: a pickled model ({kind}); refused unread: log it again with this "
                         "deepimage (deepimage.train / deepimage.ensemble)")
    if (info.metadata or {}).get("deepimage") != FORMAT or SPEC_ARTIFACT not in pyfunc.get("artifacts", {}):
        raise ValueError(f"{model_uri}: not a deepimage model (no {FORMAT} description)")
    files = {name: _inside(Path(local), a["path"], model_uri) for name, a in pyfunc["artifacts"].items()}
    try:
        spec = json.loads(Path(files[SPEC_ARTIFACT]).read_text())
        return Ensemble.from_files(spec, files)
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{model_uri}: its {SPEC_ARTIFACT} description is incomplete ({e!r})") from None
