"""Audit records for deletion requests (``audit/audit_records.json``).

The file is a JSON list; each request appends one record by rewriting the file
atomically (temp + rename), so a reader never sees a half-written record.
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


def append_audit_record(audit_dir: str | Path, record: dict[str, Any]) -> Path:
    audit_dir = Path(audit_dir)
    audit_dir.mkdir(parents=True, exist_ok=True)
    path = audit_dir / AUDIT_FILE
    records = json.loads(path.read_text()) if path.is_file() else []
    records.append({"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record})
    write_json_atomic(path, json.loads(json.dumps(records, default=float)))
    return path
