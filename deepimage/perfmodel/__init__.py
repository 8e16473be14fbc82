"""The performance model of a training step at N workers (the predict_scaling stage).

    python -m deepimage.perfmodel --help

spec.py        the models it validates and projects, the hardware folder, PerfModelError
profile.py     one worker's profile of the training step (per layer, per bucket)
host.py        N profiling workers at once on this host, on the shards' batches
costs.py       links and their fit, collective costs, step_time
projection.py  the paper's widths on each hardware file
stage.py       the stage: fit, validate against real workers, project (and `profile`)
report.py      plots, the report's section, MLflow metrics
"""
