"""Reward statistics, and wrappers that record them from TRL-style reward functions.

TRL's ``GRPOTrainer`` calls each reward function as
``func(prompts, completions, **kwargs) -> list[float | None]`` and uses
``func.__name__`` to name its own columns. :func:`wrap_reward_functions`
returns drop-in replacements: same signature (``inspect.signature``), same
name, same return value (the very same object), plus one metric record per
call with the mean/std/min/max of the rewards it returned.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .names import REWARD_LOGGER
from .records import as_scalar, emit_metrics

_log = logging.getLogger(REWARD_LOGGER)


def _flatten(values: Any) -> list[float]:
    """Rewards as floats; ``None`` (TRL: "not applicable") and non-numbers skipped."""
    if values is None:
        return []
    tolist = getattr(values, "tolist", None)
    if callable(tolist):  # tensors / arrays
        values = tolist()
    if not isinstance(values, (list, tuple)):
        values = [values]
    out: list[float] = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out.extend(_flatten(v))
            continue
        scalar = as_scalar(v)
        if scalar is not None and not math.isnan(scalar):
            out.append(scalar)
    return out


def reward_statistics(values: Any) -> dict[str, float]:
    """``count``, ``mean``, ``std`` (population), ``min``, ``max`` of ``values``."""
    xs = _flatten(values)
    if not xs:
        return {"count": 0.0}
    n = len(xs)
    mean = math.fsum(xs) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / n)
    return {"count": float(n), "mean": mean, "std": std, "min": min(xs), "max": max(xs)}


def log_reward_metrics(step: int | None, rewards_dict: Mapping[str, Any]) -> dict[str, float]:
    """Log per-reward-function statistics as one record; return them flat.

    ``rewards_dict`` maps a reward function name to its rewards (list,
    tensor or single number). Columns / TensorBoard tags are
    ``<name>/mean``, ``<name>/std``, ``<name>/min``, ``<name>/max``,
    ``<name>/count`` (``reward/<name>/mean`` in TensorBoard).
    """
    flat: dict[str, float] = {}
    for name, values in rewards_dict.items():
        for stat, value in reward_statistics(values).items():
            flat[f"{name}/{stat}"] = value
    emit_metrics(_log, flat, step=step)
    return flat


def _step_from_kwargs(kwargs: Mapping[str, Any]) -> int | None:
    """TRL passes ``trainer_state`` to reward functions in recent versions."""
    state = kwargs.get("trainer_state")
    step = getattr(state, "global_step", None)
    return step if isinstance(step, int) else None


def _is_plain_callable(func: Any) -> bool:
    """Reward *models* (nn.Module / model ids) are handled by TRL itself; leave them alone."""
    if isinstance(func, str):
        return False
    if hasattr(func, "forward") and hasattr(func, "parameters"):
        return False
    return callable(func)


def wrap_reward_function(func: Callable[..., Any], name: str | None = None) -> Callable[..., Any]:
    """One recording wrapper; see :func:`wrap_reward_functions`."""
    reward_name = name or getattr(func, "__name__", None) or type(func).__name__
    calls = [0]
    calls_lock = threading.Lock()

    def record(result: Any, kwargs: Mapping[str, Any]) -> None:
        with calls_lock:
            call_index = calls[0]
            calls[0] += 1
        step = _step_from_kwargs(kwargs)
        try:
            log_reward_metrics(call_index if step is None else step, {reward_name: result})
        except Exception:  # telemetry must never break training
            _log.debug("could not record rewards of %s", reward_name, exc_info=True)

    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            result = await func(*args, **kwargs)
            record(result, kwargs)
            return result

        wrapper: Callable[..., Any] = async_wrapper
    else:

        @functools.wraps(func)
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            result = func(*args, **kwargs)
            record(result, kwargs)
            return result

        wrapper = sync_wrapper
    try:
        wrapper.__signature__ = inspect.signature(func)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        pass
    wrapper.__name__ = reward_name
    wrapper.__qualname__ = getattr(func, "__qualname__", reward_name)
    return wrapper


def wrap_reward_functions(funcs: Callable[..., Any] | Iterable[Any]) -> Any:
    """Wrap reward functions so every call's rewards are recorded.

    Accepts one callable or a sequence (as TRL's ``reward_funcs``) and returns
    the same shape. Reward models (``nn.Module``) and model-id strings are
    returned unchanged, since TRL scores them itself.
    """
    if callable(funcs) and not isinstance(funcs, Sequence):
        return wrap_reward_function(funcs) if _is_plain_callable(funcs) else funcs
    return [wrap_reward_function(f) if _is_plain_callable(f) else f for f in funcs]
