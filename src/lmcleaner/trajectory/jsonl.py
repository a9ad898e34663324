"""Checksummed JSON Lines and atomic JSON documents.

Why: the log must survive ``kill -9``. Every line carries a CRC32 of its own
bytes, so a reader finds exactly where a torn or corrupted tail begins and
never silently uses it. A line is a plain JSON object whose *last* key is
``"crc"``::

    {"step":3,"loss":2.5,"crc":"1a2b3c4d"}

The checksum covers the bytes of the object *without* the crc key (the line
with ``,"crc":"…"`` removed), so verification needs no re-serialisation.
Whole documents (``batch_index.json``, ``checkpoints.json``, ``meta.json``)
are written to a temporary file, fsynced and renamed into place.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_CRC_KEY = b',"crc":"'


class TrajectoryLogError(ValueError):
    """A one-line problem with a training log: names the file and what to do."""


def encode_line(obj: dict[str, Any]) -> bytes:
    """One checksummed JSONL line (bytes, newline-terminated)."""
    if not obj:
        raise ValueError("cannot encode an empty record")
    if "crc" in obj:
        raise ValueError("records may not carry a 'crc' key")
    return seal(json.dumps(obj, separators=(",", ":")).encode())


def seal(body: bytes) -> bytes:
    """Checksummed line from the compact JSON bytes of a non-empty object (fast path
    for lines the writer formats itself)."""
    return body[:-1] + _CRC_KEY + b"%08x" % zlib.crc32(body) + b'"}\n'


def decode_line(line: bytes) -> dict[str, Any] | None:
    """The object of a complete, intact line; ``None`` when torn or corrupted."""
    if not line.endswith(b'"}\n'):
        return None
    k = line.rfind(_CRC_KEY)
    if k < 0 or len(line) != k + len(_CRC_KEY) + 8 + 3:
        return None
    hexcrc = line[k + len(_CRC_KEY): k + len(_CRC_KEY) + 8]
    body = line[:k] + b"}"
    try:
        if zlib.crc32(body) != int(hexcrc, 16):
            return None
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


@dataclass
class ScanResult:
    """What a checksummed JSONL file holds: the intact prefix and the rest."""

    path: Path
    entries: list[dict[str, Any]] = field(default_factory=list)
    valid_bytes: int = 0
    total_bytes: int = 0
    bad_line: int | None = None  # 1-based line number of the first bad line
    intact_after: int = 0  # intact lines after the bad one: > 0 means damage in the middle, not a torn tail

    @property
    def torn_bytes(self) -> int:
        return self.total_bytes - self.valid_bytes

    @property
    def corrupt(self) -> bool:
        """The bad line is followed by intact ones: the file was damaged in the middle
        (a crash only ever tears the *end* of an append-only file)."""
        return self.intact_after > 0


def scan(path: str | Path) -> ScanResult:
    """Read lines until the first one that is incomplete or fails its checksum."""
    path = Path(path)
    res = ScanResult(path)
    if not path.is_file():
        return res
    data = path.read_bytes()
    res.total_bytes = len(data)
    pos, n = 0, 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            res.bad_line = n + 1
            break
        obj = decode_line(data[pos:end + 1])
        if obj is None:
            res.bad_line = n + 1
            break
        res.entries.append(obj)
        pos = end + 1
        n += 1
    res.valid_bytes = pos
    if res.bad_line is not None:
        rest = data[pos:].split(b"\n")[1:]  # the lines after the bad one
        res.intact_after = sum(1 for line in rest if line and decode_line(line + b"\n") is not None)
    return res


def rewrite_lines(path: Path, lines: list[bytes], fsync: bool = True) -> None:
    """Replace a JSONL file atomically (pruning, dropping a crashed run's tail)."""
    write_bytes_atomic(path, b"".join(lines), fsync)


def write_json_atomic(path: Path, data: Any, fsync: bool = True) -> None:
    """Write a whole JSON document so a reader sees the old or the new one, never half."""
    write_bytes_atomic(path, json.dumps(data, separators=(",", ":")).encode(), fsync)


def write_bytes_atomic(path: Path, data: bytes, fsync: bool = True) -> None:
    """Temp file + rename: a reader sees the old or the new document, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        from ..train.outputs import with_filename

        tmp.unlink(missing_ok=True)  # disk full: no temp file left behind
        raise with_filename(err, path) from None


def read_json(path: Path) -> Any:
    """A JSON document, or a one-line error naming the file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TrajectoryLogError(f"{path}: missing") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise TrajectoryLogError(f"{path}: corrupted JSON ({str(err).splitlines()[0]})") from None
