from deepimage.measure import scaling_resolution

# scaling.resolution, or the highest of resolutions (null): the stage decides it the same way.
SCALING_RES = scaling_resolution(config["scaling"]["resolution"], config["resolutions"])


rule measure_scaling:
    """Training throughput and the step's time split at each worker count in scaling.np."""
    input:
        train=f"results/shards/{SCALING_RES}/train/manifest.json",
    output:
        scaling=report(
            "results/scaling/scaling.json",
            caption="../report/scaling_json.rst",
            category="Scaling",
            labels={"model": f"{SCALING_RES} px", "figure": "measurements (JSON)"},
        ),
        plot=report(
            "results/scaling/scaling.png",
            caption="../report/scaling.rst",
            category="Scaling",
            labels={"model": f"{SCALING_RES} px", "figure": "scaling plot"},
        ),
        run="results/scaling/mlflow_run.json",
    params:
        res=SCALING_RES,
        cfg=json_arg({**worker_config(), "resolutions": config["resolutions"], "scaling": config["scaling"]}),
        mlflow=lambda wc, output: mlflow_args(output.run),
    # A timing job takes every core so that no other job disturbs it.
    threads: workflow.cores
    resources:
        **rule_resources("measure_scaling"),
    conda:
        "../envs/deepimage.yaml"
    log:
        "logs/measure_scaling.log",
    benchmark:
        "results/benchmarks/measure_scaling.tsv"
    shell:
        "python -m deepimage.scaling --threads {threads} --train-shards results/shards/{params.res}/train"
        " --config-json {params.cfg} --out {output.scaling} --plot {output.plot} {params.mlflow} > {log} 2>&1"
