rule train_model:
    """One model per resolution, trained by train.np Horovod (or torchrun) workers.

    A resolution with train.per_resolution.<res>.init_from starts from that lower resolution's
    trained model.pt (an input, so its job waits for it) and trains with that entry's epochs / lr.
    Checkpoints go to results/train/{res}/checkpoints/, which is deliberately NOT an output: a
    failed or killed job's checkpoints survive Snakemake's clean-up of its outputs, and rerunning
    the workflow resumes from the newest good one (train.resume: false starts over).
    """
    input:
        train="results/shards/{res}/train/manifest.json",
        val="results/shards/{res}/val/manifest.json",
        init=init_model,
    output:
        model="results/train/{res}/model.pt",
        metrics=report(
            "results/train/{res}/metrics.json",
            caption="../report/train_metrics.rst",
            category="Training",
            labels={"model": "{res} px", "figure": "training summary (JSON)"},
        ),
        run="results/train/{res}/mlflow_run.json",
    wildcard_constraints:
        res=r"\d+",
    params:
        launcher=config["train"]["launcher"],
        np=config["train"]["np"],
        cfg=json_arg(worker_config()),
        # Folders from the declared files, so `use rule train_model as ... with:` (the
        # robustness ablation) redirects a training job by its outputs and params alone.
        shards=lambda wc, input: os.path.dirname(os.path.dirname(input.train)),
        out=lambda wc, output: os.path.dirname(output.model),
        init=init_option,
        name="train-{res}",
        registered=registered_name,
        mlflow=lambda wc, output: mlflow_args(output.run),
    # One core per worker: each worker runs threads // np compute threads.
    threads: config["train"]["np"]
    # Read by the SLURM executor (profiles/slurm): train.nodes nodes, one task per worker, and
    # with train.device cuda one GPU per task. `mpi` makes the job's script run this rule's
    # shell itself, whose launcher then starts the tasks with srun.
    resources:
        **rule_resources("train_model"),
        nodes=config["train"]["nodes"],
        tasks=config["train"]["np"],
        mpi="srun",
        gpu=lambda wc: config["train"]["np"] if config["train"]["device"] == "cuda" else 0,
        tasks_per_gpu=1,
    conda:
        "../envs/deepimage.yaml"
    log:
        "logs/train_model/{res}.log",
    benchmark:
        "results/benchmarks/train_model/{res}.tsv"
    shell:
        "python -m deepimage.launch --launcher {params.launcher} --np {params.np} --threads {threads}"
        " deepimage.train --resolution {wildcards.res}"
        " --train-shards {params.shards}/train --val-shards {params.shards}/val"
        " --out {params.out} --config-json {params.cfg} {params.init} {params.mlflow}"
        " --run-name {params.name} --registered-name {params.registered} > {log} 2>&1"
