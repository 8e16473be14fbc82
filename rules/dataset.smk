rule make_dataset:
    """The built-in synthetic dataset, or a check of the user's ImageNet-layout folder."""
    output:
        source="results/dataset/source.json",
        run="results/dataset/mlflow_run.json",
    params:
        cfg=json_arg({"seed": config["seed"], "dataset": config["dataset"]}),
        mlflow=lambda wc, output: mlflow_args(output.run),
    threads: workflow.cores
    resources:
        **rule_resources("make_dataset"),
    conda:
        "../envs/deepimage.yaml"
    log:
        "logs/make_dataset.log",
    benchmark:
        "results/benchmarks/make_dataset.tsv"
    shell:
        "python -m deepimage.dataset --out results/dataset --config-json {params.cfg}"
        " --threads {threads} {params.mlflow} > {log} 2>&1"
