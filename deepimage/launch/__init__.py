"""Start N worker processes of a deepimage module under srun, horovodrun or torchrun, and stop
them all in bounded time when one is lost: the one launch path of training, the scaling study
and the benchmarks.

    python -m deepimage.launch --launcher auto --np 2 --threads 2 -- deepimage.train --help
    launch.run("horovod", 2, "deepimage.train", [...], threads=2)

`slurm` finds the SLURM job and the srun rendezvous, `command` builds the launcher's command
line and the workers' environment, `supervise` runs and watches the launch (and each worker's
rank guard). What each worker sets up for itself is deepimage.runtime.
"""
from deepimage.launch.command import LAUNCHERS, launch_command, worker_env
from deepimage.launch.slurm import resolve_launcher
from deepimage.launch.supervise import STOP_GRACE_S, LaunchFailed, failure_dir_prefix, main, run

__all__ = ["LAUNCHERS", "STOP_GRACE_S", "LaunchFailed", "failure_dir_prefix", "launch_command", "main",
           "resolve_launcher", "run", "worker_env"]
