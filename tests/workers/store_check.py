"""Worker for tests/test_trust_channels.py: after the transport (--transport, default horovod)
is up on one host, rank 0 tries every TCP port its process listens on at each non-loopback
address of this host. Writes <out>/rank<r>.json: {"rank", "data_path", "listening": [[ip, port], ...],
"reachable": [[address, port], ...]} (reachable: the connections a non-loopback peer got)."""
from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

import psutil

from deepimage.parallel.transport import init_transport
from deepimage.runtime import apply_thread_limit


def non_loopback_addresses() -> list[str]:
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


def reachable(ports: list[int]) -> list[list]:
    got = []
    for address in non_loopback_addresses():
        for port in ports:
            with socket.socket() as s:
                s.settimeout(2)
                if s.connect_ex((address, port)) == 0:
                    got.append([address, port])
    return got


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--transport", default="horovod")
    args = parser.parse_args()
    apply_thread_limit()
    transport = init_transport(args.transport, data_path="gloo")
    report = {"rank": transport.rank, "data_path": transport.data_path}
    if transport.rank == 0:
        listening = [c.laddr for c in psutil.Process().net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN]
        report["listening"] = [[ip, port] for ip, port in listening]
        report["reachable"] = reachable(sorted({port for _, port in listening}))
    transport.barrier()
    (args.out / f"rank{transport.rank}.json").write_text(json.dumps(report))
    transport.shutdown()


if __name__ == "__main__":
    main()
