"""Program names for the command lines' --help: the console script's own name when run as one
(deepimage-predict), `python -m <module>` when run as a module."""
from __future__ import annotations

import os
import sys


def prog(module: str) -> str:
    """argparse's `prog` for `module`: what the user typed to run it."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name.startswith("deepimage-") else f"python -m {module}"
