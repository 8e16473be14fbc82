rule measure_scaling:
    """Training throughput at each worker count in scaling.np; speed-up and efficiency."""
    input:
        train=f"results/shards/{config['scaling']['resolution']}/train/manifest.json",
    output:
        scaling=report(
            "results/scaling/scaling.json",
            caption="../report/scaling_json.rst",
            category="Scaling",
            labels={"model": f"{config['scaling']['resolution']} px", "figure": "measurements (JSON)"},
        ),
        run="results/scaling/mlflow_run.json",
    params:
        res=config["scaling"]["resolution"],
        cfg=json_arg({**worker_config(), "scaling": config["scaling"]}),
        mlflow=lambda wc, output: mlflow_args(output.run),
    # A timing job takes every core so that no other job disturbs it.
    threads: workflow.cores
    conda:
        "../envs/deepimage.yaml"
    log:
        "logs/measure_scaling.log",
    benchmark:
        "results/benchmarks/measure_scaling.tsv"
    shell:
        "python -m deepimage.scaling --threads {threads} --train-shards results/shards/{params.res}/train"
        " --config-json {params.cfg} --out {output.scaling} {params.mlflow} > {log} 2>&1"
