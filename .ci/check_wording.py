"""Finds development-diary wording in the project's prose: the README, docs, config, schema,
rules, docstrings and comments speak of the software, and history belongs in commit messages.

    python .ci/check_wording.py [PATH ...]      # default: the tracked files of the checkout

Prints `path:line: phrase` for each hit and exits 1 when there is any. The patterns catch the
obvious cases (issue and session numbers, "this session", "pre-registered", machine-load notes);
they are no substitute for reading.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".md", ".py", ".yaml", ".yml", ".smk", ".rst", ".sh", ".toml", ".json", ".txt", ".cfg", ""}
SKIP = {".ci/check_wording.py"}

PATTERNS = [re.compile(p, re.IGNORECASE) for p in (
    r"\bissue\s+#?\d+",
    r"\bissues?\s+#\d+",
    r"\b(this|that|last|previous|next|earlier|later|first|second|third|fourth|fifth|sixth|seventh|"
    r"eighth|ninth|tenth)\s+session'?s?\b",
    r"\bsessions?\s+\d+",
    r"\bpre-?registered\b",
    r"\bnothing else (was )?running\b",
    r"\bwith (tests|test runs|other work|unit tests) beside (it|them)\b",
    r"\b(stop|try|attempt)\s+#?\d+\b(?! ?(s|ms|%|x|px|MiB|GiB|steps?|epochs?|workers?|ranks?|bytes?)\b)",
    r"\brun [A-H]\b(?=[,;:.)]| \()",
)]
# In prose only: the benchmarks print the load average beside their timings.
PROSE_PATTERNS = [re.compile(p, re.IGNORECASE) for p in (r"\bload average\b", r"\bthe machine's load\b")]
PROSE = {".md", ".rst", ".yaml", ".yml", ".txt"}


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in out.splitlines() if line]


def hits(path: Path) -> list[tuple[int, str]]:
    """(line number, matched phrase) for each diary phrase in the file."""
    try:
        text = path.read_text()
    except (UnicodeDecodeError, OSError):
        return []
    patterns = PATTERNS + (PROSE_PATTERNS if path.suffix in PROSE else [])
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for pattern in patterns:
            if m := pattern.search(line):
                found.append((n, m.group(0)))
                break
    return found


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or tracked_files()
    bad = 0
    for path in paths:
        rel = path.resolve().relative_to(ROOT).as_posix() if path.resolve().is_relative_to(ROOT) else str(path)
        if rel in SKIP or path.suffix not in SUFFIXES or not path.is_file():
            continue
        for n, phrase in hits(path):
            print(f"{rel}:{n}: {phrase!r}")
            bad += 1
    if bad:
        print(f"check_wording: {bad} development-diary phrase(s); say what the software does, and keep "
              "its history in commit messages", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
