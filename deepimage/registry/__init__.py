"""Models in MLflow: each resolution's network and the ensemble, logged as data (weights and a
JSON description) served by this package's own code, their registered names and the champion.

    log_trained_model(run, "results/train/64/model.pt", "results/shards/64/train")  # train, rank 0
    log_ensemble(run, checkpoints, shard_dirs, top1_error)                         # ensemble job
    classifier = load_classifier("models:/deepimage-ensemble@champion")            # predict, bench

A resolution's model is registered as `<prefix>-<res>px`, the ensemble as `<prefix>-ensemble`
(prefix: mlflow.registry_prefix, by default the experiment's name); a new ensemble version takes
the alias `champion` only when its validation top-1 error is below the champion's, measured on
the same validation shards and backed by the champion's own run (deepimage.registry.champion).
`mlflow models serve -m models:/<prefix>-ensemble@champion` serves it (deepimage.registry.pyfunc).
"""
from deepimage.registry.champion import (
    CHAMPION,
    DIGEST_TAG,
    ERROR_TAG,
    check_prefix,
    ensemble_name,
    promote_if_better,
    registered_name,
    val_digest,
)
from deepimage.registry.classifier import (
    MAX_IMAGE_BYTES,
    MAX_REQUEST_IMAGES,
    TOPK,
    Ensemble,
    Member,
    decode_views,
    member_crop,
    stack_views,
)
from deepimage.registry.load import load_classifier
from deepimage.registry.log import ensemble_spec, log_ensemble, log_trained_model, pip_requirements

__all__ = ["CHAMPION", "DIGEST_TAG", "ERROR_TAG", "MAX_IMAGE_BYTES", "MAX_REQUEST_IMAGES", "TOPK", "Ensemble",
           "Member", "check_prefix", "decode_views", "ensemble_name", "ensemble_spec", "load_classifier",
           "log_ensemble", "log_trained_model", "member_crop", "pip_requirements", "promote_if_better",
           "registered_name", "stack_views", "val_digest"]
