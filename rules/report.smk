rule write_report:
    """results/report.md: the paper-style error table, the scaling table, plots, run ids."""
    input:
        unpack(lambda wc: scaling_outputs()),
        ensemble="results/ensemble/metrics.json",
        robustness="results/robustness/robustness.json",
        train=expand("results/train/{res}/metrics.json", res=RESOLUTIONS),
        runs=[
            "results/dataset/mlflow_run.json",
            *expand("results/shards/{res}/{split}/mlflow_run.json", res=RESOLUTIONS, split=["train", "val"]),
            *expand("results/{stage}/{res}/mlflow_run.json", stage=["train", "evaluate"], res=RESOLUTIONS),
            "results/ensemble/mlflow_run.json",
            "results/robustness/mlflow_run.json",
            *[os.path.join(os.path.dirname(p), "mlflow_run.json") for p in scaling_outputs().values()],
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
        run="results/report/mlflow_run.json",
    params:
        studies=lambda wc, input: " ".join(f"--{k} {input[k]}" for k in scaling_outputs()),
        mlflow=lambda wc, output: mlflow_args(output.run),
    resources:
        **rule_resources("write_report"),
    conda:
        "../envs/deepimage.yaml"
    log:
        "logs/write_report.log",
    shell:
        "python -m deepimage.report --ensemble {input.ensemble} {params.studies}"
        " --train-metrics {input.train} --run-records {input.runs} --out {output.report}"
        " --plots results/report --error-table {output.errors} --robustness {input.robustness}"
        " {params.mlflow} > {log} 2>&1"
