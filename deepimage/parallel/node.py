"""The name of the node this process runs on, for "same host" decisions.

    python -m deepimage.parallel.node        # prints it

Under SLURM two node names may share one machine (a test cluster runs n1 and n2 on localhost),
and a site's node names need not be its hostnames: SLURMD_NODENAME, which slurmd sets for every
task, is the node SLURM placed the rank on. Elsewhere the hostname is the node.
"""
from __future__ import annotations

import os
import socket


def node_name() -> str:
    """SLURMD_NODENAME when set (inside a SLURM job step), else this machine's hostname."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


if __name__ == "__main__":
    print(node_name())
