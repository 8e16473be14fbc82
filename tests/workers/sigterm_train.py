"""deepimage.train that sends itself SIGTERM right after its global step G on rank R, as a
scheduler's stop landing at a step the test chooses (tests/test_resume.py):

    SIGTERM_AT=4:1 python -m deepimage.launch --np 2 ... tests.workers.sigterm_train <train's arguments>

G counts the steps this job runs, so G is the global step of a fresh run (one that does not
resume). The signal reaches train's own handler, as one from outside would.
"""
from __future__ import annotations

import os
import signal

from deepimage import train


def main() -> None:
    at_step, at_rank = (int(x) for x in os.environ["SIGTERM_AT"].split(":"))
    rank = int(os.environ.get("HOROVOD_RANK", os.environ.get("RANK", "0")))
    step, done = train.step, 0

    def step_then_signal(*args, **kwargs):
        nonlocal done
        stats = step(*args, **kwargs)
        done += 1
        if rank == at_rank and done == at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return stats

    train.step = step_then_signal
    train.main()


if __name__ == "__main__":
    main()
