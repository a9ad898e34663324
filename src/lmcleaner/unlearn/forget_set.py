"""Resolve a deletion request to training sample ids.

Accepted forms: a list of ints, a string ``"17,203"``, a text file of ids
(one per line or comma-separated), a JSON file holding a list of ids, or a
dataset file (json/jsonl/csv/parquet) whose rows are matched to training rows
on their shared fields (e.g. TOFU's ``forget01.jsonl`` against ``full.jsonl``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("lmcleaner.unlearn")


class ForgetSetError(ValueError):
    pass


def _ints(values: Sequence[Any], where: str) -> list[int]:
    try:
        return [int(v) for v in values]
    except (TypeError, ValueError):
        raise ForgetSetError(f"{where}: sample ids must be integers") from None


def _row_key(row: dict, fields: list[str]) -> str:
    return json.dumps([row.get(f) for f in fields], sort_keys=True, default=str)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def match_rows(rows: list[dict], training_rows: list[dict], where: str) -> list[int]:
    if not rows:
        raise ForgetSetError(f"{where}: no rows to forget")
    fields = sorted(set(rows[0]) & set(training_rows[0]))
    if not fields:
        raise ForgetSetError(f"{where}: no field in common with the training data ({sorted(training_rows[0])})")
    index: dict[str, list[int]] = {}
    for i, r in enumerate(training_rows):
        index.setdefault(_row_key(r, fields), []).append(i)
    ids, several = [], []
    for n, r in enumerate(rows):
        hits = index.get(_row_key(r, fields))
        if not hits:
            raise ForgetSetError(f"{where}: row {n} matches no training row on fields {fields}")
        if len(hits) > 1:
            several.append(n)
        ids.extend(hits)
    unique = len(set(ids))
    repeated = len(rows) - len({_row_key(r, fields) for r in rows})
    if several or repeated:
        why = [(f"rows matching several identical training rows: {len(several)} (e.g. row {several[0]}; every "
                "copy is forgotten)")] if several else []
        why += [f"rows repeating earlier ones: {repeated}"] if repeated else []
        log.warning("%s: %s %s to %s: %s", where, _n(len(rows), "row"), "resolves" if len(rows) == 1 else "resolve",
                    _n(unique, "training sample id"), "; ".join(why))
    return ids


def resolve_forget_ids(spec: Any, training_rows: list[dict] | None = None) -> list[int]:
    """Sorted unique ids. ``training_rows`` is needed only for dataset files."""
    if spec is None or spec == "" or spec == []:
        raise ForgetSetError("nothing to forget: give forget ids (unlearn.forget=17,203), an id file or a dataset file")
    if isinstance(spec, (list, tuple)) or hasattr(spec, "__iter__") and not isinstance(spec, (str, bytes, dict)):
        ids = _ints(list(spec), "unlearn.forget")
    elif isinstance(spec, int):
        ids = [spec]
    else:
        text = str(spec).strip()
        path = Path(text)
        if path.suffix in (".jsonl", ".csv", ".parquet") or (path.suffix == ".json" and path.is_file()
                                                               and not text.replace(",", "").isdigit()):
            if not path.is_file():
                raise ForgetSetError(f"forget file not found: {path}")
            if path.suffix == ".json":
                data = json.loads(path.read_text())
                if isinstance(data, list) and all(isinstance(x, int) for x in data):
                    return sorted(set(data))
            if training_rows is None:
                raise ForgetSetError("matching a forget dataset needs the training rows")
            from ..data import load_records

            ids = match_rows(load_records(str(path)), training_rows, str(path))
        elif path.suffix == ".txt" or path.is_file():
            if not path.is_file():
                raise ForgetSetError(f"forget file not found: {path}")
            ids = _ints(path.read_text().replace(",", " ").split(), str(path))
        else:
            ids = _ints([x for x in text.replace(" ", "").split(",") if x], "unlearn.forget")
    return sorted(set(ids))


def validate_ids(ids: list[int], num_samples: int) -> None:
    bad = [i for i in ids if not 0 <= i < num_samples]
    if bad:
        raise ForgetSetError(f"unknown sample ids {bad[:5]}: the training set has ids 0..{num_samples - 1}")
