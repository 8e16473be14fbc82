rule make_dataset:
    """The built-in synthetic dataset, or a check of the user's ImageNet-layout folder."""
    output:
        source="results/dataset/source.json",
        run="results/dataset/mlflow_run.json",
    params:
        source=config["dataset"]["source"],
        synth=config["dataset"]["synthetic"],
        seed=config["seed"],
        mlflow=lambda wc, output: mlflow_args(output.run),
    threads: workflow.cores
    conda:
        "../envs/deepimage.yaml"
    log:
        "logs/make_dataset.log",
    benchmark:
        "results/benchmarks/make_dataset.tsv"
    shell:
        "{PYTHON} -m deepimage.dataset --source {params.source:q} --out results/dataset"
        " --seed {params.seed} --classes {params.synth[classes]}"
        " --train-per-class {params.synth[train_per_class]} --val-per-class {params.synth[val_per_class]}"
        " --image-size {params.synth[image_size]} --threads {threads} {params.mlflow} > {log} 2>&1"
