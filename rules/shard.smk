rule shard_images:
    """One split at one resolution into Arrow IPC shards with a manifest and a skipped-files table."""
    input:
        "results/dataset/source.json",
    output:
        manifest="results/shards/{res}/{split}/manifest.json",
        skipped="results/shards/{res}/{split}/skipped.tsv",
        run="results/shards/{res}/{split}/mlflow_run.json",
    wildcard_constraints:
        res=r"\d+",
        split="train|val",
    params:
        cfg=json_arg({"shard": config["shard"], "dataset": {"strict": config["dataset"]["strict"]}}),
        mlflow=lambda wc, output: mlflow_args(output.run),
    threads: workflow.cores
    resources:
        **rule_resources("shard_images"),
    conda:
        "../envs/deepimage.yaml"
    log:
        "logs/shard_images/{res}_{split}.log",
    benchmark:
        "results/benchmarks/shard_images/{res}_{split}.tsv"
    shell:
        "python -m deepimage.shard --source {input} --split {wildcards.split}"
        " --resolution {wildcards.res} --out results/shards/{wildcards.res}/{wildcards.split}"
        " --config-json {params.cfg} --threads {threads} {params.mlflow}"
        " --run-name shard-{wildcards.res}-{wildcards.split} > {log} 2>&1"
