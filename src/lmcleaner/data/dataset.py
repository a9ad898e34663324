"""Loading records and turning them into tokenised training examples.

A sample's stable id is its row index in the dataset as loaded (after
``num_samples``); the fingerprint hashes the tokenised rows, so it changes
when the data, the tokenizer, the template or ``max_length`` change.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..telemetry.progress import progress_bar
from .formats import FormatError, detect_format, to_messages
from .synthetic import generate_authors_qa
from .tokenize import encode_record

EMBEDDED = "embedded"
_EXT = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A one-line data problem naming the file/field and the fix."""


def load_records(source: str, split: str = "train", subset: str | None = None,
                 num_samples: int | None = None) -> list[dict[str, Any]]:
    """Rows as dicts from the embedded set (``embedded`` or ``embedded:N`` authors),
    a local file/dir, or a hub dataset."""
    if source == EMBEDDED or source.startswith(EMBEDDED + ":"):
        # "embedded:N" generates N training authors (8 rows each) for larger runs.
        n = source.partition(":")[2]
        if n and not n.isdigit():
            raise DataError(f"bad dataset name '{source}': use embedded or embedded:<number of authors>")
        splits = generate_authors_qa(num_authors=int(n)) if n else generate_authors_qa()
        key = {"train": "full", "full": "full", "holdout": "holdout", "validation": "holdout"}.get(split)
        if key is None:
            raise DataError(f"embedded data has splits train/holdout, not '{split}'")
        rows = splits[key]
    else:
        import datasets

        path = Path(source)
        try:
            if path.suffix in _EXT:
                if not path.is_file():
                    raise DataError(f"data file not found: {path} (check training.dataset_name)")
                if path.stat().st_size == 0:
                    raise DataError(f"data file {path} is empty: nothing to train on")
                ds = datasets.load_dataset(_EXT[path.suffix], data_files=str(path), split="train")
            elif path.is_dir():
                ds = datasets.load_dataset(str(path), subset, split=split)
            elif source.startswith((".", "/")) or path.suffix:
                raise DataError(f"data file not found or unsupported: {source} (json/jsonl/parquet/csv or a hub name)")
            else:
                ds = datasets.load_dataset(source, subset, split=split)
        except DataError:
            raise
        except Exception as err:
            first = (str(err).splitlines() or [type(err).__name__])[0]
            raise DataError(f"cannot load dataset '{source}': {first}") from None
        rows = ds.to_list()
    if num_samples is not None:
        rows = rows[:num_samples]
    if not rows:
        raise DataError(f"dataset '{source}' (split {split}) is empty: nothing to train on")
    return rows


def _pretokenised(row: dict, i: int, max_length: int) -> dict:
    ids, labels = [int(x) for x in row["input_ids"]], [int(x) for x in row["labels"]]
    if len(ids) != len(labels):
        raise FormatError(f"row {i}: input_ids ({len(ids)}) and labels ({len(labels)}) differ in length")
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


class TextDataset(torch.utils.data.Dataset):
    """Tokenised examples with loss masks; item ``i`` is sample id ``i``."""

    def __init__(self, records: list[dict], tokenizer, training_mode: str = "instruction_finetuning",
                 text_field: Any = None, max_length: int = 128, progress: bool = False):
        if not records:
            raise DataError("dataset is empty: nothing to train on")
        columns = list(records[0].keys())
        try:
            fmt = detect_format(columns, text_field, training_mode)
            if fmt[0] == "tokens":
                self.examples = [_pretokenised(r, i, max_length) for i, r in enumerate(records)]
            else:
                self.examples = [
                    encode_record(tokenizer, to_messages(r, fmt), max_length)
                    for r in progress_bar(records, desc="tokenising", enabled=progress, leave=False)
                ]
        except (FormatError, KeyError) as err:
            raise DataError(f"bad record format: {err}") from None
        self.records = records
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        for ex in self.examples:
            h.update(np.asarray(ex["input_ids"], dtype=np.int64).tobytes())
            h.update(np.asarray(ex["labels"], dtype=np.int64).tobytes())
            h.update(b"|")
        return h.hexdigest()[:32]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return {**self.examples[i], "sample_id": i}

    def supervised_tokens(self, i: int) -> int:
        labels = self.examples[i]["labels"]
        return sum(1 for x in labels[1:] if x != -100)


def build_dataset(cfg_training, tokenizer, source: str | None = None, split: str | None = None,
                  progress: bool = False) -> TextDataset:
    t = cfg_training
    records = load_records(source or t.dataset_name, split or t.dataset_split, t.dataset_subset, t.num_samples)
    return TextDataset(records, tokenizer, t.training_mode, t.text_field, t.max_length, progress=progress)
