"""Collation: right padding, labels -100 on padding, sample ids carried along."""

from __future__ import annotations

import torch

from .labels import IGNORE_INDEX


class Collator:
    """Pads a list of dataset items. An empty list yields one all-padding row
    with no supervised token, so a rank whose micro-batch lost every sample to
    a deletion request still takes part in the gradient all-reduce with an
    exactly-zero contribution."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if not items:
            items = [{"input_ids": [self.pad_token_id], "labels": [IGNORE_INDEX], "sample_id": -1}]
        width = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, x in enumerate(items):
            n = len(x["input_ids"])
            ids[row, :n] = torch.tensor(x["input_ids"])
            labels[row, :n] = torch.tensor(x["labels"])
            mask[row, :n] = 1
        sample_ids = torch.tensor([x["sample_id"] for x in items], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "sample_ids": sample_ids}


def collate_ids(dataset, ids: list[int], collator: Collator) -> dict[str, torch.Tensor]:
    return collator([dataset[i] for i in ids])
