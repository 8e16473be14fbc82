"""Rank 0's rendezvous store, listening on one address only.

    store, (address, port) = listening_store("127.0.0.1", 0, size, timeout)   # rank 0
    store = env_store(rank, size, timeout)        # every rank of an env:// launch (srun tasks)

torch's TCPStore given a host name still listens on every address of the host; a store that
any host of the network can reach is a door into the job. So the master's store gets a socket
already bound to the address the job needs (loopback when every rank is on one host).
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta


def listening_store(address: str, port: int, size: int, timeout: timedelta):
    """(TCPStore of the master, (address, port)) listening on `address` only (port 0: a free one)."""
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((address, port))
        sock.listen(max(size, 128))
        port = sock.getsockname()[1]
        store = dist.TCPStore(address, port, size, is_master=True, wait_for_workers=False,
                              timeout=timeout, master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store closes the descriptor
    return store, (address, port)


def env_store(rank: int, size: int, timeout: timedelta):
    """The store of an env:// launch (MASTER_ADDR / MASTER_PORT, as srun tasks get them): rank 0
    listens on MASTER_ADDR's address only, the others connect to it."""
    import torch.distributed as dist

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    address = socket.gethostbyname(host)
    if rank == 0:
        return listening_store(address, port, size, timeout)[0]
    return dist.TCPStore(address, port, size, is_master=False, timeout=timeout)
