rule predict_scaling:
    """The performance model: validated against steps measured here, projected to Minwa's scale."""
    input:
        scaling="results/scaling/scaling.json",
        default=f"results/shards/{SCALING_RES}/train/manifest.json",
        # the FC-heavy validation model runs at the lowest resolution (deepimage.perfmodel.stage.model_variant)
        fc_heavy=f"results/shards/{min(RESOLUTIONS)}/train/manifest.json",
    output:
        model=report(
            "results/scaling/perfmodel.json",
            caption="../report/perfmodel_json.rst",
            category="Scaling",
            labels={"model": "performance model", "figure": "validation and projection (JSON)"},
        ),
        section="results/perfmodel/perfmodel.md",
        efficiency=report(
            "results/perfmodel/perfmodel_efficiency.png",
            caption="../report/perfmodel.rst",
            category="Scaling",
            labels={"model": "performance model", "figure": "measured and predicted efficiency"},
        ),
        projection=report(
            "results/perfmodel/perfmodel_projection.png",
            caption="../report/perfmodel_projection.rst",
            category="Scaling",
            labels={"model": "performance model", "figure": "projection to 144 workers"},
        ),
        validation=report(
            "results/perfmodel/perfmodel_validation.png",
            caption="../report/perfmodel_validation.rst",
            category="Scaling",
            labels={"model": "performance model", "figure": "validation"},
        ),
        run="results/perfmodel/mlflow_run.json",
    params:
        cfg=json_arg({**worker_config(), "resolutions": config["resolutions"], "scaling": config["scaling"],
                      "perfmodel": config["perfmodel"]}),
        mlflow=lambda wc, output: mlflow_args(output.run),
    # Its validation times training steps: it takes every core, as measure_scaling does.
    threads: workflow.cores
    resources:
        **rule_resources("predict_scaling"),
    conda:
        "../envs/deepimage.yaml"
    log:
        "logs/predict_scaling.log",
    benchmark:
        "results/benchmarks/predict_scaling.tsv"
    shell:
        "python -m deepimage.perfmodel --threads {threads} --scaling {input.scaling} --shards results/shards"
        " --config-json {params.cfg} --out {output.model} --plots results/perfmodel"
        " --report-md {output.section} {params.mlflow} > {log} 2>&1"
