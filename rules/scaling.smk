rule measure_scaling:
    """Training throughput at each worker count in scaling.np; speed-up and efficiency."""
    input:
        train=f"results/shards/{config['scaling']['resolution']}/train/manifest.json",
    output:
        scaling="results/scaling/scaling.json",
        run="results/scaling/mlflow_run.json",
    params:
        sc=config["scaling"],
        nps=" ".join(str(n) for n in config["scaling"]["np"]),
        launcher=config["train"]["launcher"],
        cfg=json_arg(worker_config()),
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
        "{PYTHON} -m deepimage.scaling --launcher {params.launcher} --np {params.nps}"
        " --threads {threads} --train-shards results/shards/{params.sc[resolution]}/train"
        " --resolution {params.sc[resolution]} --steps {params.sc[steps]}"
        " --warmup-steps {params.sc[warmup_steps]} --batch-size {params.sc[batch_size]}"
        " --allreduce-mib {params.sc[allreduce_mib]} --config-json {params.cfg}"
        " --out {output.scaling} {params.mlflow} > {log} 2>&1"
