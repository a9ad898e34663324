"""Package exports resolved on first use (PEP 562).

Why: ``lmcleaner --help`` and argument errors must answer without importing
torch/transformers (seconds), and several packages import each other
(``train`` <-> ``trajectory`` <-> ``data``), which eager re-exports in their
``__init__`` would turn into import cycles.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, table: dict[str, str], namespace: dict[str, Any]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package`` whose name ``n`` lives in submodule ``table[n]``."""

    def __getattr__(name: str) -> Any:
        if name in table:
            value = getattr(importlib.import_module(f"{package}.{table[name]}"), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(table)

    return __getattr__, __dir__
