"""Reward statistics and TRL-style reward-function wrappers."""

from __future__ import annotations

import asyncio
import inspect
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lmcleaner import telemetry
from lmcleaner.telemetry import reward_statistics, wrap_reward_functions

from ._helpers import read_csv


def accuracy_reward(prompts: list[str], completions: list[str], answer: list[str] | None = None, **kwargs: Any) -> list[float]:
    """1.0 when the completion contains the answer."""
    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer or [])]


def format_reward(prompts, completions, **kwargs):  # untyped, like many user scripts
    return [0.5 if c.startswith("<think>") else None for c in completions]


async def async_reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    return [float(len(c)) for c in completions]


def test_statistics() -> None:
    stats = reward_statistics([1.0, 0.0, 1.0, None, float("nan")])
    assert stats["count"] == 3
    assert stats["mean"] == pytest.approx(2 / 3)
    assert stats["std"] == pytest.approx(math.sqrt(2 / 9))
    assert (stats["min"], stats["max"]) == (0.0, 1.0)
    assert reward_statistics(torch.tensor([2.0, 4.0]))["mean"] == 3.0
    assert reward_statistics([]) == {"count": 0.0}


def test_wrappers_keep_signature_name_doc_and_return_value(session: telemetry.TelemetrySession) -> None:
    funcs = [accuracy_reward, format_reward]
    wrapped = wrap_reward_functions(funcs)
    assert isinstance(wrapped, list) and len(wrapped) == 2
    for original, wrapper in zip(funcs, wrapped):
        assert wrapper is not original
        assert inspect.signature(wrapper) == inspect.signature(original)
        assert wrapper.__name__ == original.__name__
        assert wrapper.__doc__ == original.__doc__

    prompts, completions = ["p1", "p2", "p3"], ["<think>x</think> 4", "5", "<think>4"]
    sentinel_result = accuracy_reward(prompts, completions, answer=["4", "4", "4"])
    result = wrapped[0](prompts, completions, answer=["4", "4", "4"])
    assert result == sentinel_result == [1.0, 0.0, 1.0]
    assert wrapped[1](prompts, completions) == [0.5, None, 0.5]


def test_wrapper_returns_the_very_same_object() -> None:
    out = [0.25, 0.75]

    def constant_reward(prompts, completions, **kwargs):
        return out

    (wrapped,) = wrap_reward_functions([constant_reward])
    assert wrapped(["p"], ["c"]) is out


def test_each_call_is_recorded_with_statistics(session: telemetry.TelemetrySession) -> None:
    acc, fmt = wrap_reward_functions([accuracy_reward, format_reward])
    acc(["a", "b"], ["4", "5"], answer=["4", "4"])                    # call 0 -> step 0
    acc(["a", "b"], ["4", "4"], answer=["4", "4"])                    # call 1 -> step 1
    fmt(["a"], ["<think>"], trainer_state=SimpleNamespace(global_step=42))  # TRL passes the state
    telemetry.shutdown()

    _, rows = read_csv(session.output_dir / "rewards.csv")
    acc_rows = [r for r in rows if r["accuracy_reward/mean"]]
    assert [(r["step"], float(r["accuracy_reward/mean"]), float(r["accuracy_reward/std"])) for r in acc_rows] == [
        ("0", 0.5, 0.5),
        ("1", 1.0, 0.0),
    ]
    assert [(r["accuracy_reward/min"], r["accuracy_reward/max"], r["accuracy_reward/count"]) for r in acc_rows] == [
        ("0.0", "1.0", "2.0"),
        ("1.0", "1.0", "2.0"),
    ]
    (fmt_row,) = [r for r in rows if r["format_reward/mean"]]
    assert fmt_row["step"] == "42" and float(fmt_row["format_reward/mean"]) == 0.5


def test_async_reward_functions_stay_async(session: telemetry.TelemetrySession) -> None:
    (wrapped,) = wrap_reward_functions([async_reward])
    assert inspect.iscoroutinefunction(wrapped)
    assert inspect.signature(wrapped) == inspect.signature(async_reward)
    assert asyncio.run(wrapped(["p"], ["abc", "de"])) == [3.0, 2.0]
    telemetry.shutdown()
    _, rows = read_csv(session.output_dir / "rewards.csv")
    assert float(rows[0]["async_reward/mean"]) == 2.5


def test_reward_models_and_model_ids_pass_through_unchanged() -> None:
    model = torch.nn.Linear(2, 1)
    out = wrap_reward_functions([model, "some/reward-model", accuracy_reward])
    assert out[0] is model and out[1] == "some/reward-model"
    assert out[2].__name__ == "accuracy_reward"


def test_single_callable_and_exceptions_propagate() -> None:
    def failing_reward(prompts, completions, **kwargs):
        raise RuntimeError("bad reward")

    wrapped = wrap_reward_functions(failing_reward)
    assert callable(wrapped) and wrapped.__name__ == "failing_reward"
    with pytest.raises(RuntimeError, match="bad reward"):
        wrapped([], [])


def test_log_reward_metrics_flat_result(tmp_path: Path) -> None:
    session = telemetry.initialize(output_dir=tmp_path)
    flat = telemetry.log_reward_metrics(5, {"acc": [0.0, 1.0], "len": torch.tensor([3.0])})
    assert flat["acc/mean"] == 0.5 and flat["len/max"] == 3.0
    telemetry.shutdown()
    header, rows = read_csv(session.output_dir / "rewards.csv")
    assert header[2:] == ["acc/count", "acc/mean", "acc/std", "acc/min", "acc/max",
                          "len/count", "len/mean", "len/std", "len/min", "len/max"]
    assert rows[0]["step"] == "5"
