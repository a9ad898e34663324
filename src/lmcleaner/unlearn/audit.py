"""Audit records for deletion requests (``audit/audit_records.json``).

The file is a JSON list, append-only across requests: each request adds one
record by rewriting the file atomically (temp + rename), so a reader never
sees a half-written record. When an output directory is replaced
(``unlearn.overwrite=true``) the new directory's audit starts with the old
one's records; an unreadable audit is an error, never silently dropped.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from ..train.checkpoint import write_json_atomic

AUDIT_FILE = "audit_records.json"


class AuditError(ValueError):
    """An existing audit log cannot be read (one line): appending would lose its history."""


def weights_fingerprint(params: dict[str, torch.Tensor]) -> str:
    """Hash of parameter values: proves the output differs from the input."""
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:32]


def new_request_id() -> str:
    return f"req-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


def read_audit_records(audit_dir: str | Path) -> list[dict[str, Any]]:
    """The records already in ``audit_dir`` (empty when there is none)."""
    path = Path(audit_dir) / AUDIT_FILE
    if not path.is_file():
        return []
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise AuditError(f"{path}: unreadable audit log ({str(err).splitlines()[0]}); repair or move it away "
                         "before writing more requests (its history would be lost)") from None
    if not isinstance(records, list):
        raise AuditError(f"{path}: expected a JSON list of records; repair or move it away first")
    return records


def append_audit_record(audit_dir: str | Path, record: dict[str, Any],
                        previous: list[dict[str, Any]] | None = None) -> Path:
    """Append ``record`` to ``audit_dir/audit_records.json`` (after ``previous``, the history of
    the output this one replaces, when the file does not exist yet)."""
    audit_dir = Path(audit_dir)
    audit_dir.mkdir(parents=True, exist_ok=True)
    path = audit_dir / AUDIT_FILE
    records = read_audit_records(audit_dir) if path.is_file() else list(previous or [])
    records.append({"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record})
    write_json_atomic(path, json.loads(json.dumps(records, default=float)))
    return path
