"""Tab-separated tables that round-trip any text, file names included.

    data = tsv_bytes(["path", "reason"], rows)     # bytes, for an atomic write
    header, *rows = read_tsv(path)                 # lists of str, exactly as written

csv's tab dialect: a field holding a tab, newline or double quote is quoted (so every other
line reads as plain `a<TAB>b`), and text is UTF-8 with surrogateescape, so a file name that is
not UTF-8 keeps its original bytes. Read these files with read_tsv (or csv.reader with
delimiter "\\t" on a file opened with newline="" and errors="surrogateescape").
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable

ENCODING, ERRORS = "utf-8", "surrogateescape"


def tsv_bytes(header: list[str], rows: Iterable[Iterable[object]]) -> bytes:
    """The table, header first, as the bytes of a TSV file."""
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode(ENCODING, ERRORS)


def read_tsv(path: str | Path) -> list[list[str]]:
    """Every row of a TSV file written by tsv_bytes, header first."""
    with open(path, newline="", encoding=ENCODING, errors=ERRORS) as f:
        return list(csv.reader(f, delimiter="\t"))
