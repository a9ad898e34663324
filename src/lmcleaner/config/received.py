"""A config read from a run directory someone else produced is data, not instructions.

Why: ``unlearn``, ``retrain``, replay and batch reconstruction rebuild the
model and data from the config recorded in the run (``meta.json`` or
``trainer_state.json``). A crafted run could carry settings that run code or
write elsewhere when honoured: ``model.trust_remote_code`` (the model's own
Python files), ``telemetry_config`` (a logging YAML whose ``()`` factories
call arbitrary functions), W&B uploads, a deletion-request file and online
unlearning, a resume path, a pretraining cache directory. :func:`as_received` turns those off; only the current user's own
command line (``--trust-remote-code``) turns remote code back on.

Remote code: a model directory whose ``config.json`` or
``tokenizer_config.json`` carries an ``auto_map`` (or a model config ``.json``
given as ``model.name_or_path`` that does) ships Python files that
``transformers`` would import. :func:`guard_remote_code` refuses such a
directory with one line, before ``transformers`` sees it, unless the current
user asked for it (``model.trust_remote_code=true`` in their own training
config, ``--trust-remote-code`` on the command line).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .loader import ConfigError, _one_line
from .schema import RootConfig

log = logging.getLogger("lmcleaner")


class RemoteCodeError(ValueError):
    """A model would run its own Python code and the user did not allow it (one line)."""


REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def remote_code_entry(name_or_path: str | Path | None) -> str | None:
    """The file of a local model directory (or the model config ``.json`` file itself) that maps a
    class to shipped code (``auto_map``), if any."""
    if not name_or_path:
        return None
    p = Path(name_or_path)
    if p.is_file() and p.suffix == ".json":  # model.name_or_path=<config>.json: built from the config
        files = [p]
    elif p.is_dir():
        files = [p / name for name in REMOTE_CODE_FILES]
    else:
        return None  # a hub id: transformers itself refuses remote code unless trust_remote_code=True
    for f in files:
        if not f.is_file():
            continue
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            continue  # transformers will report the broken file itself
        if isinstance(doc, dict) and doc.get("auto_map"):
            return str(f)
    return None


def guard_remote_code(name_or_path: str | Path | None, trust_remote_code: bool, key: str = "model.name_or_path") -> bool:
    """Refuse a model that ships code unless trusted; returns the ``trust_remote_code`` to pass on."""
    entry = remote_code_entry(name_or_path)
    if entry is None:
        return bool(trust_remote_code)
    if not trust_remote_code:
        raise RemoteCodeError(f"{key}={name_or_path} ships its own Python code (auto_map in {entry}); lmcleaner "
                              "runs no code from a model or run you received: inspect it, and if you trust it pass "
                              "--trust-remote-code (train: model.trust_remote_code=true)")
    log.warning("trusting remote code: %s maps classes to Python files (auto_map in %s) that will be imported",
                name_or_path, entry)
    return True


def merge_recorded(recorded: Any, where: str) -> DictConfig:
    """The recorded config on the typed schema; a one-line error naming ``where`` and the key."""
    if not isinstance(recorded, dict):
        raise ConfigError(f"{where}: 'config' must be a JSON object (got {type(recorded).__name__}); "
                          "the file is damaged or was not written by lmcleaner")
    try:
        return OmegaConf.merge(OmegaConf.structured(RootConfig), OmegaConf.create(recorded))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}: {_one_line(err)}") from None


def as_received(cfg: DictConfig, trust_remote_code: bool = False) -> DictConfig:
    """Neutralise the settings of a received config that could run code or write elsewhere."""
    cfg.model.trust_remote_code = bool(trust_remote_code)
    cfg.telemetry_config = None  # the current user's default telemetry, never the run's YAML
    cfg.training.log_to_wandb = False
    cfg.training.forget_request_file = None
    cfg.training.online_unlearning.method = None
    cfg.training.resume_from_checkpoint = None
    cfg.pretrain.cache_dir = None  # a base:<preset> model comes from the current user's cache, never a path the run names
    cfg.training_logger.enabled = False
    cfg.training_logger.log_dir = None
    return cfg
