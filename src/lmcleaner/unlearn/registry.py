"""Unlearning methods by name: one registry, one file per method in ``unlearn/handlers``.

A method is a class registered with :func:`register_method`:

- ``name``: the canonical name (``trainer.handler`` / ``trainer=NAME``), ``aliases``;
- ``Config``: a dataclass whose fields are the method's ``trainer.method_args``
  (its docstring and comments are the documentation; ``lmcleaner unlearn
  --help`` lists them);
- ``run(session, ids, cfg) -> UnlearnResult``: the unlearned state for the
  sample ids (already checked to be used inside the window), nothing written;
- ``exact``: whether the result equals retraining by construction;
- ``certifiable`` (optional, default False): whether the formal residual bound of
  ``unlearn/certify/bound.py`` applies to its results (``trainer.method_args.certify``).

A new method is one file in ``handlers/`` plus one import line in
``handlers/__init__.py``.

Keys of ``trainer.method_args`` that belong to the session rather than to a
method (where the log is, whether to apply, where the audit goes, the
divergence fallback) are :data:`SESSION_KEYS`; :func:`split_method_args`
separates them and :func:`method_config` type-checks the rest against the
method's ``Config`` with a one-line error naming the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

from .result import UnlearnError, UnlearnResult

SESSION_KEYS = ("training_log_dir", "apply_immediately", "audit_dir", "batch_size_at_training",
                "fallback_to_replay", "overwrite", "certify")


class UnlearnMethod(Protocol):
    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]]
    exact: ClassVar[bool]
    Config: ClassVar[type]

    def run(self, session: Any, ids: list[int], cfg: Any) -> UnlearnResult: ...


METHODS: dict[str, type] = {}
ALIASES: dict[str, str] = {}


def register_method(cls: type) -> type:
    """Class decorator: make ``cls`` selectable as ``trainer=cls.name`` (and its aliases)."""
    if not getattr(cls, "name", None) or not dataclasses.is_dataclass(getattr(cls, "Config", None)):
        raise TypeError(f"{cls.__name__} needs a ``name`` and a dataclass ``Config``")
    METHODS[cls.name] = cls
    for a in getattr(cls, "aliases", ()):
        ALIASES[a] = cls.name
    return cls


def _load() -> None:
    if not METHODS:
        from . import handlers  # noqa: F401 - registers every method


def method_names() -> list[str]:
    _load()
    return list(METHODS)


def get_method(name: str) -> type:
    """The registered class for ``name`` (canonical or alias); one-line error otherwise."""
    _load()
    canonical = ALIASES.get(name, name)
    if canonical not in METHODS:
        raise UnlearnError(f"unknown unlearning method '{name}': choose one of {list(METHODS)} "
                           f"(aliases: {sorted(ALIASES)})")
    return METHODS[canonical]


def canonical_method(name: str) -> str:
    return get_method(name).name


def split_method_args(args: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(session keys, method keys) of a ``trainer.method_args`` mapping."""
    session = {k: v for k, v in args.items() if k in SESSION_KEYS}
    method = {k: v for k, v in args.items() if k not in SESSION_KEYS}
    return session, method


def method_config(method: str | type, args: Mapping[str, Any] | None = None) -> Any:
    """``cls.Config`` filled from ``args``: unknown keys and wrong types are one-line errors.

    ``None`` values mean "the method's default" (presets and the schema use them
    for keys a method may not have)."""
    cls = get_method(method) if isinstance(method, str) else method
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    given = {k: v for k, v in (args or {}).items() if v is not None}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise UnlearnError(f"{cls.name} has no argument {unknown[0]!r} (trainer.method_args.{unknown[0]}): "
                           f"its arguments are {sorted(fields) or 'none'}")
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls.Config), given)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None)
        raise UnlearnError(f"bad value for trainer.method_args.{key} of {cls.name}: "
                           f"{str(err).splitlines()[0]}") from None
    check = getattr(cfg, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as err:
            raise UnlearnError(str(err)) from None
    return cfg


def describe_methods() -> str:
    """One paragraph per method for ``--help``: name, aliases, arguments with defaults."""
    _load()
    lines = []
    for name, cls in METHODS.items():
        alias = f" (alias {', '.join(cls.aliases)})" if getattr(cls, "aliases", ()) else ""
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        args = ", ".join(f"{f.name}={_default(f)}" for f in dataclasses.fields(cls.Config)) or "no arguments"
        lines.append(f"  {name}{alias}: {doc}\n      args: {args}")
    return "\n".join(lines)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return "?"
