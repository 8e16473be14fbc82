rule write_report:
    """results/report.md: the paper-style error table, the scaling table, plots, run ids."""
    input:
        ensemble="results/ensemble/metrics.json",
        scaling="results/scaling/scaling.json",
        robustness="results/robustness/robustness.json",
        perfmodel="results/perfmodel/perfmodel.md",
        train=expand("results/train/{res}/metrics.json", res=RESOLUTIONS),
        runs=[
            "results/dataset/mlflow_run.json",
            *expand("results/shards/{res}/{split}/mlflow_run.json", res=RESOLUTIONS, split=["train", "val"]),
            *expand("results/{stage}/{res}/mlflow_run.json", stage=["train", "evaluate"], res=RESOLUTIONS),
            "results/ensemble/mlflow_run.json",
            "results/scaling/mlflow_run.json",
            "results/robustness/mlflow_run.json",
            "results/perfmodel/mlflow_run.json",
            *[m.replace("model.pt", "mlflow_run.json") for m in ablation_models()],
        ],
    output:
        report="results/report.md",
        errors=report(
            "results/report/errors.html",
            caption="../report/errors.rst",
            category="Errors",
            labels={"model": "each resolution and the ensemble", "figure": "error table"},
        ),
        curves=report(
            "results/report/loss.png",
            caption="../report/training.rst",
            category="Training",
            labels={"model": "all resolutions", "figure": "training curves"},
        ),
        scaling=report(
            "results/report/scaling.png",
            caption="../report/scaling.rst",
            category="Scaling",
            labels={"model": f"{SCALING_RES} px", "figure": "scaling plot"},
        ),
        run="results/report/mlflow_run.json",
    params:
        mlflow=lambda wc, output: mlflow_args(output.run),
    conda:
        "../envs/deepimage.yaml"
    log:
        "logs/write_report.log",
    shell:
        "python -m deepimage.report --ensemble {input.ensemble} --scaling {input.scaling}"
        " --train-metrics {input.train} --run-records {input.runs} --out {output.report}"
        " --plots results/report --error-table {output.errors} --robustness {input.robustness}"
        " --perfmodel {input.perfmodel} {params.mlflow} > {log} 2>&1"
