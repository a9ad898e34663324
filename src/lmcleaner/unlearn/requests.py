"""Deletion requests answered together: ``lmcleaner unlearn unlearn.requests=FILE``.

The file holds one request per line, the format of the online request file
(``training.forget_request_file``)::

    {"request_id": "r1", "ids": [17, 203]}
    {"request_id": "r2", "ids": [1044]}

All requests are answered by **one** computation on the union of their ids:
one replay from the earliest use (or one ``auto`` decision, one propagation)
removes every requested sample, and the unlearned model is exact for the
union when the method is (``replay``, ``auto`` choosing replay). Each request
still gets its own audit record (its own ``request_id`` and ``forget_ids``),
naming the requests it was answered with (``joint_with``), the union
(``joint_forget_ids``) and its share of the cost (``grad_equivalents_share``
= the joint total / k).

Why: exact replay's cost is set by the *earliest* use, ``tau - (restore point
before it)``, and barely depends on how many samples are removed. For old
requests, where no approximation we measured reaches a tenth of replay's cost
(``docs/unlearning.md``), k requests collected (a deletion law's deadline is
typically weeks) cost one replay: ``1/k`` each (``benchmarks/batched.py``).

A requests file is input, maybe received: it is parsed as JSON only, every
line is checked before anything runs, and a bad one is a one-line error
naming the line and the expected format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .result import UnlearnError

EXAMPLE = '{"request_id": "r1", "ids": [17, 203]}'


def read_requests(path: str | Path) -> list[dict[str, Any]]:
    """The requests of a JSONL file, in file order: ``[{"request_id": str, "ids": [int, ...]}]``.
    Blank lines are skipped; request ids must be unique and non-empty, ids non-negative ints."""
    path = Path(path)
    if not path.is_file():
        raise UnlearnError(f"unlearn.requests: {path} is not a file; write one request per line, like {EXAMPLE}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UnlearnError(f"unlearn.requests: {path} is unreadable ({str(err).splitlines()[0]})") from None
    requests: list[dict[str, Any]] = []
    seen: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"unlearn.requests: {path}:{n}"
        try:
            req = json.loads(line)
        except json.JSONDecodeError:
            raise UnlearnError(f"{where}: not JSON; write one request per line, like {EXAMPLE}") from None
        ids = req.get("ids") if isinstance(req, dict) else None
        rid = req.get("request_id") if isinstance(req, dict) else None
        if not (isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                      for i in ids)):
            raise UnlearnError(f"{where}: needs \"ids\", a non-empty list of sample ids (ints >= 0), like {EXAMPLE}")
        if not (isinstance(rid, str) and rid.strip()):
            raise UnlearnError(f"{where}: needs a non-empty string \"request_id\", like {EXAMPLE}")
        if rid in seen:
            raise UnlearnError(f"{where}: request_id {rid!r} appears twice; give each request its own id")
        seen.add(rid)
        requests.append({"request_id": rid, "ids": sorted(set(ids))})
    if not requests:
        raise UnlearnError(f"unlearn.requests: {path} holds no request; write one per line, like {EXAMPLE}")
    return requests


def union_ids(requests: list[dict[str, Any]]) -> list[int]:
    return sorted({i for r in requests for i in r["ids"]})


def forget_spec(unlearn_cfg) -> tuple[Any, list[dict[str, Any]] | None]:
    """What a command forgets: ``(unlearn.forget, None)``, or with ``unlearn.requests`` the
    union of the requests' ids and the requests (read and checked whole, before any work)."""
    if unlearn_cfg.requests is None:
        return unlearn_cfg.forget, None
    if unlearn_cfg.forget not in (None, "", []):
        raise UnlearnError("give either unlearn.forget or unlearn.requests, not both (the requests file "
                           "names its own ids)")
    requests = read_requests(unlearn_cfg.requests)
    return union_ids(requests), requests


def joint_records(base: dict[str, Any], requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One audit record per request from the joint result's record ``base``."""
    k = len(requests)
    total = base.get("grad_equivalents_total")
    out = []
    for req in requests:
        rec = {**base, "request_id": req["request_id"], "forget_ids": req["ids"],
               "joint_forget_ids": base.get("forget_ids"),
               "joint_with": [r["request_id"] for r in requests if r is not req]}
        if isinstance(total, (int, float)):
            rec["grad_equivalents_share"] = float(total) / k
        out.append(rec)
    return out
