"""Helpers shared by the telemetry tests."""

from __future__ import annotations

import csv
from pathlib import Path


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows; asserts every row has exactly as many cells as the header."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = []
        for line_no, cells in enumerate(reader, start=2):
            assert len(cells) == len(header), f"{path}:{line_no}: {len(cells)} cells for {len(header)} columns"
            rows.append(dict(zip(header, cells)))
    return header, rows
