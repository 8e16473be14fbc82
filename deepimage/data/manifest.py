"""The manifest beside a split's Arrow shards, and the checks the loader runs against it.

    <shard_dir>/manifest.json   shards (name, rows, bytes, sha256), classes in index order,
                                build parameters, sample counts
    <shard_dir>/skipped.tsv     `path<TAB>reason` of every input that could not be decoded

Shard schema (one record batch per file, uncompressed so it memory-maps zero-copy):
    sample_id int64, label int64, path string (relative to <root>/<split>/),
    image: fixed_size_binary(S*S*3) (format raw: uint8 HWC pixels) or binary (format jpeg).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from deepimage.data.layout import DataError

MANIFEST = "manifest.json"
SKIPPED = "skipped.tsv"
VERSION = 1
FORMATS = ("raw", "jpeg")


class ShardChecksumError(DataError):
    """A shard's bytes differ from what the manifest recorded (corrupted or truncated)."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def shard_schema(fmt: str, stored_size: int) -> pa.Schema:
    """The Arrow schema of one shard: raw rows have one fixed shape, (S, S, 3) uint8."""
    if fmt not in FORMATS:
        raise ValueError(f"shard format must be one of {FORMATS}, got {fmt!r}")
    image = pa.binary(stored_size * stored_size * 3) if fmt == "raw" else pa.binary()
    return pa.schema([("sample_id", pa.int64()), ("label", pa.int64()), ("path", pa.string()),
                      ("image", image)],
                     metadata={"deepimage.format": fmt, "deepimage.stored_size": str(stored_size)})


@dataclass(frozen=True)
class ShardInfo:
    name: str
    rows: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """Everything a reader needs to trust and decode the shards of one split and resolution."""

    split: str
    resolution: int
    stored_size: int
    format: str
    classes: list[str]
    shards: list[ShardInfo]
    num_samples: int
    class_counts: list[int]
    num_candidates: int
    num_skipped: int
    params: dict = field(default_factory=dict)
    version: int = VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Manifest":
        """Build from parsed JSON; a missing or malformed key raises naming the file and key."""
        try:
            if d["version"] != VERSION:
                raise DataError(f"{where}: manifest version {d['version']}, expected {VERSION}: "
                                "rerun the shard stage")
            shards = [ShardInfo(**s) for s in d["shards"]]
            m = cls(**{**d, "shards": shards})
        except KeyError as e:
            raise DataError(f"{where}: manifest has no key {e}: rerun the shard stage") from None
        except TypeError as e:
            raise DataError(f"{where}: malformed manifest ({e}): rerun the shard stage") from None
        if m.format not in FORMATS:
            raise DataError(f"{where}: format {m.format!r} is not one of {FORMATS}")
        if sum(s.rows for s in m.shards) != m.num_samples:
            raise DataError(f"{where}: shard rows add up to {sum(s.rows for s in m.shards)}, "
                            f"num_samples says {m.num_samples}")
        return m


def write_atomic(path: Path, data: bytes) -> None:
    """Temporary file in the same folder, then rename: a reader never sees a partial file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(shard_dir: str | Path, manifest: Manifest) -> Path:
    path = Path(shard_dir) / MANIFEST
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"
    write_atomic(path, text.encode())
    return path


def load_manifest(shard_dir: str | Path) -> Manifest:
    """Read <shard_dir>/manifest.json, with an error that says how to make it if missing."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no manifest (shards incomplete or never built): "
                        "run the shard stage (python -m deepimage.shard)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}): rerun the shard stage") from None
    return Manifest.from_dict(d, str(path))


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_shards(shard_dir: str | Path, shards: list[ShardInfo]) -> None:
    """Check each shard's size and sha256 against the manifest; raise naming the first bad one."""
    for s in shards:
        path = Path(shard_dir) / s.name
        if not path.is_file():
            raise ShardChecksumError(f"{path}: shard listed in the manifest is missing "
                                     f"(expected sha256 {s.sha256}): rerun the shard stage")
        found = sha256_file(path)
        if found != s.sha256:
            size = path.stat().st_size
            raise ShardChecksumError(
                f"{path}: corrupted shard: expected sha256 {s.sha256} ({s.bytes} bytes), "
                f"found sha256 {found} ({size} bytes): rerun the shard stage")
