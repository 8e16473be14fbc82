# Robustness to the trained transformations and its ablation: the lowest resolution
# trained again with every augmentation off (study.ablation), so the report shows what
# augmentation buys under each transformation. Helpers: ablation_models() and
# worker_config_without_augmentation() in rules/common.smk.


use rule train_model as train_without_augmentation with:
    output:
        model="results/train/{res}-noaug/model.pt",
        metrics="results/train/{res}-noaug/metrics.json",
        run="results/train/{res}-noaug/mlflow_run.json",
    params:
        launcher=config["train"]["launcher"],
        np=config["train"]["np"],
        cfg=json_arg(worker_config_without_augmentation()),
        shards=lambda wc, input: os.path.dirname(os.path.dirname(input.train)),
        out=lambda wc, output: os.path.dirname(output.model),
        name="train-{res}-noaug",
        registered=lambda wc: f"{registered_name(wc)}-noaug",
        mlflow=lambda wc, output: mlflow_args(output.run),
    log:
        "logs/train_without_augmentation/{res}.log",
    benchmark:
        "results/benchmarks/train_without_augmentation/{res}.tsv"


rule evaluate_robustness:
    """Top-1 / top-5 error of every model and the ensemble under each transformation family."""
    input:
        models=expand("results/train/{res}/model.pt", res=RESOLUTIONS),
        ablation=ablation_models(),
        val=expand("results/shards/{res}/val/manifest.json", res=RESOLUTIONS),
    output:
        json=report(
            "results/robustness/robustness.json",
            caption="../report/robustness_json.rst",
            category="Robustness",
            labels={"model": "each model and the ensemble", "figure": "errors per transformation (JSON)"},
        ),
        plot=report(
            "results/robustness/robustness.png",
            caption="../report/robustness.rst",
            category="Robustness",
            labels={"model": "each model and the ensemble", "figure": "error against strength"},
        ),
        run="results/robustness/mlflow_run.json",
    params:
        cfg=json_arg({k: config[k] for k in ("seed", "evaluate", "robustness")}),
        mlflow=lambda wc, output: mlflow_args(output.run),
    threads: workflow.cores
    resources:
        **rule_resources("evaluate_robustness"),
    conda:
        "../envs/deepimage.yaml"
    log:
        "logs/evaluate_robustness.log",
    benchmark:
        "results/benchmarks/evaluate_robustness.tsv"
    shell:
        "python -m deepimage.robustness --models {input.models} --ablation {input.ablation}"
        " --shards results/shards --config-json {params.cfg} --threads {threads} --out results/robustness"
        " {params.mlflow} > {log} 2>&1"
