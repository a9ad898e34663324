"""Compose a config: schema defaults <- ``--config`` YAML <- CLI overrides.

Overrides use the Hydra grammar users already type: ``a.b=c`` sets a value,
``group=name`` selects a preset YAML from ``conf/<group>/`` (``model=tiny-llama``,
``trainer=LMCleanerBatch``), ``group=path/to/file.yaml`` merges a file into the
block. Hydra users can instead compose with ``@hydra.main`` against the schema
registered by :func:`register_with_hydra`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError
from omegaconf.nodes import StringNode

from .schema import RootConfig

CONF_DIR = Path(__file__).parent / "conf"


class ConfigError(ValueError):
    """A one-line configuration problem naming the key and the fix."""


def available_presets(group: str) -> list[str]:
    """Preset YAMLs of ``group`` (``trainer=NAME`` instead names a registered unlearning method)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _groups() -> set[str]:
    return {p.name for p in CONF_DIR.iterdir() if p.is_dir()}


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError):
        return f"unknown config key '{key}': check the spelling (see `lmcleaner train --help` / the schema in lmcleaner.config.schema)"
    if isinstance(err, ValidationError):
        return f"bad value for config key '{key}': {msg}"
    return f"config error at '{key}': {msg}" if key else f"config error: {msg}"


def _merge(base: DictConfig, other: Any, what: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{_one_line(err)} (in {what})") from None


def _load_yaml(path: str | os.PathLike) -> DictConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (give an existing YAML path)")
    try:
        data = OmegaConf.load(p)
    except Exception as err:  # yaml.YAMLError and friends
        raise ConfigError(f"cannot parse config file {p}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"config file {p} must hold a mapping at top level")
    return data


def _group_file(group: str, value: str) -> Path:
    if value.endswith((".yaml", ".yml")):
        return Path(value)
    path = CONF_DIR / group / f"{value}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown {group} preset '{value}': choose one of {available_presets(group)} or give a YAML path"
        )
    return path


def _quote_for_string_field(cfg: DictConfig, item: str) -> str:
    """``key=no`` for a string field means the string "no": YAML 1.1, which the override
    parser follows, would read ``no/yes/on/off`` as booleans (``training.mixed_precision=no``)."""
    key, value = item.split("=", 1)
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig) or leaf not in node:
        return item
    if not isinstance(node._get_node(leaf), StringNode):
        return item
    if value in ("", "null", "~") or value[:1] in ("'", '"') or value.startswith("${"):
        return item
    return f"{key}={json.dumps(value)}"


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Build the run config. Raises :class:`ConfigError` with a one-line message."""
    cfg = OmegaConf.structured(RootConfig)
    if path is not None:
        cfg = _merge(cfg, _load_yaml(path), str(path))
    groups = _groups()
    dotted: list[str] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.lstrip("+")
        if key == "trainer" and not value.endswith((".yaml", ".yml")):
            # unlearning methods live in a registry (lmcleaner.unlearn.registry), checked by `unlearn`
            dotted.append(f"trainer.handler={value}")
        elif key in groups or key == "trainer":
            block = _load_yaml(_group_file(key, value))
            cfg = _merge(cfg, {key: block}, f"{key}={value}")
        else:
            dotted.append(f"{key}={value}")
    if dotted:
        dotted = [_quote_for_string_field(cfg, item) for item in dotted]
        try:
            cli = OmegaConf.from_dotlist(dotted)
        except OmegaConfBaseException as err:
            raise ConfigError(_one_line(err)) from None
        cfg = _merge(cfg, cli, "command-line overrides")
    validate(cfg)
    return cfg


_CHOICES = {
    "training.optimizer": ("adamw", "sgd"),
    "training.scheduler": ("cosine", "linear", "constant"),
    "training.mixed_precision": ("no", "fp16", "bf16"),
    "training.training_mode": ("pretraining", "instruction_finetuning"),
    "training.distributed_strategy": ("ddp", "fsdp"),
    "training_logger.storage": ("light", "heavy", "diag"),
    "training_logger.mode": ("batch", "sample"),
    "unlearn.export": ("merged", "adapter"),
}


def validate(cfg: DictConfig) -> None:
    """Semantic checks the type system cannot express."""
    if cfg.training.mixed_precision == "False":  # `mixed_precision: no` in a YAML file (YAML 1.1 reads no as false)
        cfg.training.mixed_precision = "no"
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"unknown {key.split('.')[-1]} '{value}' ({key}): choose one of {list(choices)}")
    t = cfg.training
    if t.max_length < 8:
        raise ConfigError(f"training.max_length={t.max_length} is too small: use at least 8 tokens")
    if t.batch_size < 1 or t.gradient_accumulation_steps < 1:
        raise ConfigError("training.batch_size and training.gradient_accumulation_steps must be >= 1")
    if t.max_steps <= 0 and t.num_epochs < 1:
        raise ConfigError("set training.max_steps > 0 or training.num_epochs >= 1")
    if cfg.training_logger.max_steps < 1:
        raise ConfigError(f"training_logger.max_steps={cfg.training_logger.max_steps}: the window must be >= 1 step")
    if cfg.training_logger.checkpoint_interval < 1:
        raise ConfigError("training_logger.checkpoint_interval must be >= 1")


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def register_with_hydra(name: str = "lmcleaner_schema") -> None:
    """Register the schema in Hydra's ConfigStore for ``@hydra.main`` users."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=name, node=RootConfig)
