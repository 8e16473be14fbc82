"""Worker for tests/test_cma.py: the same-host message path's matching, errors and a peer that
exits, under a real torchrun launch of 2 processes. Writes <out>/rank<r>.json."""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
import traceback
from pathlib import Path

import torch

from deepimage.runtime import apply_thread_limit
from deepimage.parallel.transport import TransportError, init_transport


def message(call) -> str:
    """The error text `call` raises ('' when it raises nothing)."""
    try:
        call()
    except (RuntimeError, TransportError) as err:
        return str(err)
    return ""


def waiters_read_the_socket(ch, me: int, peer: int) -> bool:
    """Rank 0 waits for tags 50 and 51 in two threads; rank 1 sends 51, then 50 a little later."""
    if any(th.name.startswith("deepimage-cma") for th in threading.enumerate()):
        return False
    if me == 1:
        late = torch.full((100,), 50.0)
        first = ch.isend(torch.full((100,), 51.0), peer, tag=51)
        time.sleep(0.2)
        second = ch.isend(late, peer, tag=50)
        first.wait()
        second.wait()
        return True
    outs = {tag: torch.empty(100) for tag in (50, 51)}
    works = {tag: ch.irecv(out, peer, tag) for tag, out in outs.items()}
    errors = []

    def wait(tag):
        try:
            works[tag].wait()
        except RuntimeError as err:
            errors.append(str(err))

    threads = [threading.Thread(target=wait, args=(tag,)) for tag in (50, 51)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    return not errors and all(bool((out == tag).all()) for tag, out in outs.items())


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    apply_thread_limit()
    t = init_transport("torchrun", data_path="cma")
    ch, me = t.paths.opened["cma"].channels, t.rank
    peer = 1 - me
    checks, texts = {}, {}
    try:
        # Receive posted long before the message, and message arriving long before the receive.
        got = torch.empty(1000)
        if me == 0:
            recv = ch.irecv(got, peer, tag=10)
            ch.isend(torch.full((1000,), 7.0), peer, tag=11).wait()
            recv.wait()
        else:
            send = ch.isend(torch.full((1000,), 7.0), peer, tag=10)
            time.sleep(0.3)  # rank 0's message under tag 11 arrives first and waits
            ch.irecv(got, peer, tag=11).wait()
            send.wait()
        checks["both_orders_deliver"] = bool((got == 7.0).all())
        # Messages matched by tag, not by order.
        outs = [torch.empty(10) for _ in range(3)]
        recvs = [ch.irecv(outs[i], peer, tag=20 + i) for i in (2, 0, 1)]
        sends = [ch.isend(torch.full((10,), float(i)), peer, tag=20 + i) for i in range(3)]
        for w in recvs + sends:
            w.wait()
        checks["matched_by_tag"] = all(bool((outs[i] == i).all()) for i in range(3))
        # A size mismatch fails both sides with the sizes named.
        if me == 0:
            texts["size_mismatch"] = message(lambda: ch.isend(torch.zeros(5), peer, tag=30).wait())
        else:
            texts["size_mismatch"] = message(lambda: ch.irecv(torch.zeros(6), peer, tag=30).wait())
        checks["size_mismatch_named"] = ("20 bytes" in texts["size_mismatch"] and "24" in texts["size_mismatch"]
                                         or "could not read" in texts["size_mismatch"])
        checks["use_data_path_error"] = "not open here" in message(lambda: t.use_data_path("tcp"))
        # No receiver thread: the threads that wait read the socket, one at a time, each
        # finishing the other's message when it reads it first.
        checks["waiters_read_the_socket"] = waiters_read_the_socket(ch, me, peer)
        # A wait with nothing coming fails after the channel's timeout, naming it.
        if me == 0:
            ch.timeout_s, timeout = 0.3, ch.timeout_s
            texts["timeout"] = message(lambda: ch.irecv(torch.zeros(4), peer, tag=60).wait())
            ch.timeout_s = timeout
            checks["wait_times_out"] = "no answer in 0.3 s" in texts["timeout"]
        t.barrier()
        # Rank 1 exits without a word; rank 0's pending receive fails instead of hanging.
        if me == 0:
            texts["peer_exit"] = message(lambda: ch.irecv(torch.zeros(4), peer, tag=40).wait())
            checks["peer_exit_fails_the_receive"] = "rank 1 closed its connection" in texts["peer_exit"]
            texts["after_exit"] = message(lambda: ch.isend(torch.zeros(4), peer, tag=41))
            checks["later_send_fails_at_once"] = "rank 1" in texts["after_exit"]
    except Exception:
        texts["error"] = traceback.format_exc()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"rank{me}.json").write_text(json.dumps({"rank": me, "checks": checks, "texts": texts}))
    if me == 1:
        os._exit(0)  # no shutdown, no goodbye: the connection just ends


if __name__ == "__main__":
    main()
