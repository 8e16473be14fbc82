"""Models in MLflow: each resolution's network and the ensemble, logged as data (weights and a
JSON description) served by this package's own code, their registered names and the champion.

    from deepimage.registry.log import log_ensemble        # the ensemble stage
    from deepimage.registry.load import load_classifier    # predict, the benchmarks
    classifier = load_classifier("models:/deepimage-ensemble@champion")

names.py: a resolution's model is registered as `<prefix>-<res>px`, the ensemble as
`<prefix>-ensemble` (prefix: mlflow.registry_prefix, by default the experiment's name).
champion.py: a new ensemble version takes the alias `champion` only when its validation top-1
error is below the champion's, measured on the same validation shards and backed by the
champion's own run. classifier.py: the Ensemble a model is; pyfunc.py and served.py: what
`mlflow models serve -m models:/<prefix>-ensemble@champion` runs; log.py and load.py: writing
and reading models. This module imports only the names (the Snakefile reads them).
"""
from deepimage.registry.names import CHAMPION, check_prefix, ensemble_name, registered_name


def log_trained_model(run, checkpoint, shard_dir, name: str | None = None) -> str:
    """The training stage's hook: deepimage.registry.log.log_trained_model (imported on call)."""
    from deepimage.registry import log

    return log.log_trained_model(run, checkpoint, shard_dir, name)


__all__ = ["CHAMPION", "check_prefix", "ensemble_name", "log_trained_model", "registered_name"]
