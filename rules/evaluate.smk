rule evaluate_model:
    """Softmax posteriors of one resolution's model on val; top-1 / top-5 error."""
    input:
        model="results/train/{res}/model.pt",
        val="results/shards/{res}/val/manifest.json",
    output:
        posteriors="results/evaluate/{res}/posteriors.npz",
        metrics="results/evaluate/{res}/metrics.json",
        per_class=report(
            "results/evaluate/{res}/per_class.tsv",
            caption="../report/per_class.rst",
            category="Per-class errors",
            subcategory="{res} px",
            labels={"model": "{res} px", "figure": "per-class errors"},
        ),
        confusion=report(
            "results/evaluate/{res}/confusion.png",
            caption="../report/confusion.rst",
            category="Per-class errors",
            subcategory="{res} px",
            labels={"model": "{res} px", "figure": "confusion matrix"},
        ),
        run="results/evaluate/{res}/mlflow_run.json",
    wildcard_constraints:
        res=r"\d+",
    params:
        cfg=json_arg({"evaluate": config["evaluate"]}),
        mlflow=lambda wc, output: mlflow_args(output.run),
    threads: workflow.cores
    resources:
        **rule_resources("evaluate_model"),
    conda:
        "../envs/deepimage.yaml"
    log:
        "logs/evaluate_model/{res}.log",
    benchmark:
        "results/benchmarks/evaluate_model/{res}.tsv"
    shell:
        "python -m deepimage.evaluate --model {input.model} --val-shards results/shards/{wildcards.res}/val"
        " --config-json {params.cfg} --threads {threads} --out results/evaluate/{wildcards.res}"
        " {params.mlflow} --run-name evaluate-{wildcards.res} > {log} 2>&1"
