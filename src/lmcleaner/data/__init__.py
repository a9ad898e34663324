"""Datasets, tokenisation with loss masks, stable sample ids, the batch plan."""

from .collate import Collator, collate_ids
from .dataset import EMBEDDED, DataError, TextDataset, build_dataset, load_records
from .formats import FormatError, prompt_text
from .tokenize import encode_prompt, encode_qa, encode_record
from .sampler import BatchPlan
from .synthetic import QUESTIONS_PER_AUTHOR, generate_authors_qa, write_authors_qa
from .tokenizer import embedded_tokenizer, load_tokenizer

__all__ = [
    "Collator", "collate_ids", "EMBEDDED", "DataError", "TextDataset", "build_dataset", "load_records",
    "FormatError", "prompt_text", "encode_prompt", "encode_qa", "encode_record", "BatchPlan", "QUESTIONS_PER_AUTHOR", "generate_authors_qa",
    "write_authors_qa", "embedded_tokenizer", "load_tokenizer",
]
