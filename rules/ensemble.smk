rule ensemble_models:
    """Average the softmax posteriors of every resolution (the paper's ensembling); log and
    register the ensemble as one MLflow pyfunc model (<prefix>-ensemble, alias champion)."""
    input:
        posteriors=expand("results/evaluate/{res}/posteriors.npz", res=RESOLUTIONS),
        models=expand("results/train/{res}/model.pt", res=RESOLUTIONS),
        # each model's input preprocessing is the stored size of the shards it was trained on
        shards=expand("results/shards/{res}/val/manifest.json", res=RESOLUTIONS),
    output:
        metrics="results/ensemble/metrics.json",
        per_class=report(
            "results/ensemble/per_class.tsv",
            caption="../report/per_class.rst",
            category="Per-class errors",
            subcategory="ensemble",
            labels={"model": "ensemble", "figure": "per-class errors"},
        ),
        confusion=report(
            "results/ensemble/confusion.png",
            caption="../report/confusion.rst",
            category="Per-class errors",
            subcategory="ensemble",
            labels={"model": "ensemble", "figure": "confusion matrix"},
        ),
        run="results/ensemble/mlflow_run.json",
    params:
        shard_dirs=expand("results/shards/{res}/val", res=RESOLUTIONS),
        registered=registry.ensemble_name(REGISTRY_PREFIX),
        mlflow=lambda wc, output: mlflow_args(output.run),
    resources:
        **rule_resources("ensemble_models"),
    conda:
        "../envs/deepimage.yaml"
    log:
        "logs/ensemble_models.log",
    benchmark:
        "results/benchmarks/ensemble_models.tsv"
    shell:
        "python -m deepimage.ensemble --posteriors {input.posteriors} --models {input.models}"
        " --shards {params.shard_dirs} --per-class-dir results/ensemble --out {output.metrics}"
        " --registered-name {params.registered} {params.mlflow} > {log} 2>&1"
