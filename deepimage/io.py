"""Files the stages write for other jobs to read."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic JSON write: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
