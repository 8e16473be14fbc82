# Deep Image (Baidu, 2015) reproduced as a workflow: shard -> train per resolution (Horovod)
# -> evaluate -> ensemble -> scaling -> report, every job logged to MLflow.
#   snakemake --cores 2                       # default config, built-in synthetic dataset
#   snakemake --cores 2 --configfile my.yaml  # override any key of config.yaml
from snakemake.utils import min_version

min_version("9.0")


configfile: f"{workflow.basedir}/config.yaml"


# `snakemake --report results/report.html`: one self-contained HTML page (report/*.rst captions).
report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/dataset.smk"
include: "rules/shard.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/ensemble.smk"
include: "rules/scaling.smk"
include: "rules/perfmodel.smk"
include: "rules/report.smk"
include: "rules/robustness.smk"


# Rules that take seconds run on the submitting host under a cluster profile.
localrules:
    all,
    ensemble_models,
    write_report,


rule all:
    input:
        final_targets(),
