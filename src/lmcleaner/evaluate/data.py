"""Evaluation data: named splits of question/answer rows.

Why a separate container: every metric needs to know which *role* a set of
rows plays (forget, retain, holdout, general-knowledge utility sets), because
TOFU aggregates the same per-sample statistic differently per role (truth
ratio: ``min(TR, 1/TR)`` on forget, ``max(0, 1-TR)`` elsewhere) and the
membership-inference attacks need forget (members) against holdout
(non-members).

Rows may be in any format training reads (:mod:`lmcleaner.data.formats`):
``question``/``answer`` (TOFU), ``messages``, ``conversations``,
``prompt``/``response``, or several fields (``text_field=[instruction, input,
output]``). The *answer* is the last assistant turn, and everything before it
is the prompt (rendered as in training); ``question`` is set to the last user
turn for display. Extra fields used by some metrics (TOFU layout):

- ``paraphrased_answer``: the truth-ratio reference on forget/retain;
- ``perturbed_answer``: list of wrong answers (truth ratio, hence forget
  quality and model utility, and the normalised probability of the
  real-authors / world-facts sets). Without them those metrics are ``null``
  with a reason naming the missing field.

For ``real_authors`` / ``world_facts`` the truth-ratio reference is the
answer itself (TOFU has no paraphrase there), see :data:`TRUTH_RATIO_BASE`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..data import load_records
from ..data.formats import FormatError, detect_format, to_messages

SPLITS = ("forget", "retain", "holdout", "real_authors", "world_facts")
# Which field is the truth-ratio reference answer on each split (TOFU convention).
TRUTH_RATIO_BASE = {"forget": "paraphrased_answer", "retain": "paraphrased_answer",
                    "holdout": "paraphrased_answer", "real_authors": "answer", "world_facts": "answer"}
Row = dict[str, Any]


class EvalDataError(ValueError):
    """A one-line problem with evaluation data, naming the split/file and field."""


def _check_rows(split: str, rows: list[Row], text_field: Any = None) -> list[Row]:
    """Rows with ``question`` and ``answer`` (and ``prompt_messages`` when the prompt is a conversation)."""
    if not rows:
        raise EvalDataError(f"evaluation split '{split}' is empty")
    if all(r.get("question") is not None and r.get("answer") is not None for r in rows) and not text_field:
        return rows
    columns = [c for c in rows[0] if c not in ("input_ids", "labels")]
    try:
        fmt = detect_format(columns, text_field, "instruction_finetuning")
    except FormatError as err:
        why = str(err).replace("set training.text_field", "give --text-field")
        raise EvalDataError(f"evaluation split '{split}': {why}") from None
    return [_conversation_row(split, i, r, fmt) for i, r in enumerate(rows)]


def _conversation_row(split: str, i: int, row: Row, fmt: Any) -> Row:
    try:
        messages = to_messages(row, fmt)
    except (KeyError, TypeError, FormatError) as err:
        raise EvalDataError(f"evaluation split '{split}' row {i}: {err}") from None
    last = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise EvalDataError(f"evaluation split '{split}' row {i} has no assistant turn to score")
    context = messages[:last]
    users = [m["content"] for m in context if m["role"] == "user"]
    out = {**row, "question": users[-1] if users else "", "answer": messages[last]["content"]}
    if [m["role"] for m in context] != ["user"]:
        out["prompt_messages"] = context
    return out


def prompt_of(row: Row) -> str | list[dict]:
    """What precedes the answer: the question, or the conversation before the last assistant turn."""
    return row.get("prompt_messages") or str(row["question"])


def _cap(rows: list[Row], max_rows: int | None, seed: int = 0) -> list[Row]:
    """Deterministic subsample that keeps the original order."""
    if max_rows is None or len(rows) <= max_rows:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), max_rows))
    return [rows[i] for i in keep]


@dataclass
class EvalData:
    """Named evaluation splits; ``None`` means "not provided" (its metrics are
    reported as null with a reason). ``ids`` maps a split to the source row
    index of each row (e.g. training sample ids for the embedded data)."""

    forget: list[Row]
    retain: list[Row] | None = None
    holdout: list[Row] | None = None
    real_authors: list[Row] | None = None
    world_facts: list[Row] | None = None
    ids: dict[str, list[int]] = field(default_factory=dict)
    description: str = ""
    text_field: Any = None  # like training.text_field: a field name or [instruction, input, output]

    def __post_init__(self) -> None:
        for name in SPLITS:
            rows = getattr(self, name)
            if rows is None:
                if name == "forget":
                    raise EvalDataError("evaluation data needs a 'forget' split")
                continue
            rows = _check_rows(name, rows, self.text_field)
            setattr(self, name, rows)
            if name in self.ids and len(self.ids[name]) != len(rows):
                raise EvalDataError(f"split '{name}': {len(self.ids[name])} ids for {len(rows)} rows")

    def splits(self) -> dict[str, list[Row]]:
        """The provided splits, in canonical order."""
        return {name: getattr(self, name) for name in SPLITS if getattr(self, name) is not None}

    def row_ids(self, split: str) -> list[int]:
        rows = getattr(self, split)
        return list(self.ids.get(split, range(len(rows) if rows else 0)))

    def capped(self, max_rows: int | None, seed: int = 0) -> "EvalData":
        """A copy with every split deterministically capped to ``max_rows`` rows (for quick runs)."""
        if max_rows is None:
            return self
        kwargs: dict[str, Any] = {}
        ids: dict[str, list[int]] = {}
        for name, rows in self.splits().items():
            keep = _cap(list(range(len(rows))), max_rows, seed)
            kwargs[name] = [rows[i] for i in keep]
            src = self.row_ids(name)
            ids[name] = [src[i] for i in keep]
        return EvalData(**kwargs, ids=ids, description=f"{self.description} (max {max_rows} rows/split)")

    # ----------------------------------------------------------------- loaders
    @classmethod
    def from_paths(cls, forget: str | Path, retain: str | Path | None = None, holdout: str | Path | None = None,
                   real_authors: str | Path | None = None, world_facts: str | Path | None = None,
                   max_rows: int | None = None, text_field: Any = None) -> "EvalData":
        """Load each split from a json/jsonl/csv/parquet file (``lmcleaner.data.load_records``),
        in any format training reads (``text_field`` as in training)."""
        paths = {"forget": forget, "retain": retain, "holdout": holdout,
                 "real_authors": real_authors, "world_facts": world_facts}
        kwargs: dict[str, Any] = {}
        for name, path in paths.items():
            if path is None:
                continue
            if not Path(path).is_file():
                raise EvalDataError(f"evaluation split '{name}': file not found: {path}")
            try:
                kwargs[name] = load_records(str(path))
            except ValueError as err:
                raise EvalDataError(f"evaluation split '{name}' ({path}): {err}") from None
        desc = ", ".join(f"{k}={v}" for k, v in paths.items() if v is not None)
        return cls(**kwargs, description=desc, text_field=text_field).capped(max_rows)

    @classmethod
    def tofu(cls, directory: str | Path, forget: str = "forget01", retain: str = "retain_perturbed",
             holdout: str | None = None, general: bool = True, max_rows: int | None = None) -> "EvalData":
        """TOFU layout: ``{forget}_perturbed.jsonl`` (falls back to ``{forget}.jsonl``),
        ``{retain}.jsonl``, ``holdoutNN.jsonl`` matching the forget percentage, and
        ``real_authors_perturbed.jsonl`` / ``world_facts_perturbed.jsonl`` when present
        and ``general`` is true."""
        root = Path(directory)
        if not root.is_dir():
            raise EvalDataError(f"TOFU directory not found: {root}")

        def pick(*names: str) -> Path | None:
            for n in names:
                p = root / f"{n}.jsonl"
                if p.is_file():
                    return p
            return None

        forget_path = pick(f"{forget}_perturbed", forget)
        if forget_path is None:
            raise EvalDataError(f"TOFU forget split '{forget}' not found in {root} "
                                f"(expected {forget}_perturbed.jsonl)")
        if holdout is None:
            suffix = forget[len("forget"):] if forget.startswith("forget") else ""
            holdout = f"holdout{suffix}"
        holdout_path = pick(holdout)
        if holdout_path is None:
            raise EvalDataError(f"TOFU holdout split '{holdout}' not found in {root}")
        retain_path = pick(retain)
        if retain_path is None:
            raise EvalDataError(f"TOFU retain split '{retain}' not found in {root}")
        ra = pick("real_authors_perturbed") if general else None
        wf = pick("world_facts_perturbed") if general else None
        data = cls.from_paths(forget_path, retain_path, holdout_path, ra, wf, max_rows=max_rows)
        data.description = f"tofu:{root} forget={forget_path.name} retain={retain_path.name} " \
                           f"holdout={holdout_path.name}" + (" +real_authors" if ra else "") + \
                           (" +world_facts" if wf else "") + (f" (max {max_rows} rows/split)" if max_rows else "")
        return data

    @classmethod
    def embedded(cls, forget_author_indices: Iterable[int] | None = None, forget_ids: Iterable[int] | None = None,
                 max_retain: int | None = 100, max_holdout: int | None = None, seed: int = 0) -> "EvalData":
        """The embedded fictitious-author data exactly as ``load_records("embedded")``
        gives it to training. Forget = rows of ``forget_author_indices`` and/or the
        training rows ``forget_ids`` (sample ids); retain = the other training rows,
        deterministically capped to ``max_retain``; holdout = the holdout authors
        (never trained on). ``ids`` hold training sample ids (holdout: row index)."""
        train = load_records("embedded", "train")
        hold = load_records("embedded", "holdout")
        authors = set(int(a) for a in (forget_author_indices or []))
        chosen = set(int(i) for i in (forget_ids or []))
        bad = [i for i in chosen if not 0 <= i < len(train)]
        if bad:
            raise EvalDataError(f"forget sample ids {bad} out of range: embedded training data has {len(train)} rows")
        n_authors = len({r["author_index"] for r in train})
        bad = [a for a in authors if not 0 <= a < n_authors]
        if bad:
            raise EvalDataError(f"forget authors {bad} out of range: embedded data has {n_authors} training authors")
        if not authors and not chosen:
            raise EvalDataError("choose what to forget: forget_author_indices and/or forget_ids")
        forget_idx = [i for i, r in enumerate(train) if r["author_index"] in authors or i in chosen]
        forget_set = set(forget_idx)
        retain_idx = _cap([i for i in range(len(train)) if i not in forget_set], max_retain, seed)
        hold_idx = _cap(list(range(len(hold))), max_holdout, seed)
        desc = "embedded" + (f" forget_authors={sorted(authors)}" if authors else "") + \
               (f" forget_ids={sorted(chosen)}" if chosen else "")
        return cls(
            forget=[train[i] for i in forget_idx], retain=[train[i] for i in retain_idx],
            holdout=[hold[i] for i in hold_idx],
            ids={"forget": forget_idx, "retain": retain_idx, "holdout": hold_idx}, description=desc,
        )


def missing_field(rows: list[Row], key: str) -> int | None:
    """Index of the first row lacking a usable ``key`` (None: all rows have it)."""
    for i, row in enumerate(rows):
        value = row.get(key)
        if value is None or (isinstance(value, (list, str)) and len(value) == 0):
            return i
    return None


def perturbed_list(row: Row) -> list[str]:
    """``perturbed_answer`` as a list (some exports store a single string)."""
    value = row.get("perturbed_answer")
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]
