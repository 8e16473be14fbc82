rule ensemble_models:
    """Average the softmax posteriors of every resolution (the paper's ensembling)."""
    input:
        expand("results/evaluate/{res}/posteriors.npz", res=RESOLUTIONS),
    output:
        metrics="results/ensemble/metrics.json",
        run="results/ensemble/mlflow_run.json",
    params:
        mlflow=lambda wc, output: mlflow_args(output.run),
    conda:
        "../envs/deepimage.yaml"
    log:
        "logs/ensemble_models.log",
    shell:
        "{PYTHON} -m deepimage.ensemble --posteriors {input} --out {output.metrics} {params.mlflow} > {log} 2>&1"
