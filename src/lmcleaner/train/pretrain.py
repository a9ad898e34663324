"""The project's own pretrained base model (the fine-tuning regime of DESIGN §3).

Why: users fine-tune a *pretrained* model with small learning rates for 1-3
epochs; linearisation is far more accurate there than when training from a
random initialisation with large steps, and unlearning must be measured
where users live. Nothing can be downloaded, so ``lmcleaner pretrain`` (and
``ensure_base_model``) pretrains a model preset (default: the embedded tiny
Llama) on the generated corpus of ``data.pretrain_corpus`` -- entities
disjoint from every fine-tuning author -- with the project's own trainer.

Cache: the result is a ``from_pretrained`` directory under
``$LMCLEANER_CACHE`` (else ``$XDG_CACHE_HOME/lmcleaner``, else
``~/.cache/lmcleaner``) at ``base/<preset>-<key>``, where ``key`` hashes every
setting that changes the weights (model shape, corpus, schedule, tokenizer,
torch version). It is built once, under a file lock (two processes asking at
once build it once), into a temporary directory renamed into place.

Use it with ``model.name_or_path=base:tiny-llama`` (built on first use with
the default ``pretrain`` settings), or pass the printed directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

log = logging.getLogger("lmcleaner.training")
BASE_PREFIX = "base:"
FORMAT = 1  # bump when the corpus or the recipe changes meaning


def cache_root() -> Path:
    if os.environ.get("LMCLEANER_CACHE"):
        return Path(os.environ["LMCLEANER_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lmcleaner"


def _model_block(preset: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from ..config.loader import CONF_DIR, ConfigError
    from ..config.schema import ModelConfig

    path = Path(preset) if preset.endswith((".yaml", ".yml")) else CONF_DIR / "model" / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"pretrain.model '{preset}' is neither a model preset nor a YAML file")
    block = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))
    if block["name_or_path"] != "tiny-llama":
        raise ConfigError(f"pretrain.model '{preset}' is not an embedded model: only presets built from a config "
                          "(name_or_path: tiny-llama) can be pretrained here")
    return block


def check_settings(pcfg) -> None:
    """One-line errors for settings that would silently pretrain something else (``steps=0``
    would mean "train by epochs"), before anything is created."""
    from ..config.loader import ConfigError

    for key, ok, want in (("steps", pcfg.steps >= 1, ">= 1"), ("batch_size", pcfg.batch_size >= 1, ">= 1"),
                          ("learning_rate", pcfg.learning_rate > 0, "> 0"),
                          ("num_entities", pcfg.num_entities >= 1, ">= 1"), ("max_length", pcfg.max_length >= 8, ">= 8")):
        if not ok:
            raise ConfigError(f"pretrain.{key}={getattr(pcfg, key)!r}: must be {want}")


def base_key(pcfg) -> tuple[str, dict[str, Any]]:
    """(cache key, the settings it hashes)."""
    import torch

    from ..data.tokenizer import ASSET

    settings = {"format": FORMAT, "pretrain": dict(pcfg) if not hasattr(pcfg, "__dataclass_fields__") else asdict(pcfg),
                "model": _model_block(pcfg.model), "torch": torch.__version__.split("+")[0],
                "tokenizer": hashlib.sha256(ASSET.read_bytes()).hexdigest()[:16]}
    for k in ("cache_dir", "progress_bar", "threads"):  # do not change the weights
        settings["pretrain"].pop(k, None)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return digest, settings


def base_dir(pcfg) -> Path:
    root = Path(pcfg.cache_dir) if getattr(pcfg, "cache_dir", None) else cache_root()
    preset = Path(pcfg.model).stem
    return root / "base" / f"{preset}-{base_key(pcfg)[0]}"


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pretrain_config(pcfg, data_path: Path, out: Path):
    from omegaconf import OmegaConf

    from ..config import load_config

    cfg = load_config(overrides=[
        "training.training_mode=pretraining", f"training.dataset_name={data_path}", "training.text_field=text",
        f"training.max_steps={pcfg.steps}", f"training.batch_size={pcfg.batch_size}",
        f"training.learning_rate={pcfg.learning_rate}", "training.optimizer=adamw", "training.scheduler=cosine",
        f"training.warmup_steps={max(1, pcfg.steps // 20)}", f"training.max_length={pcfg.max_length}",
        f"training.seed={pcfg.seed}", "training.weight_decay=0.0", "training.max_grad_norm=1.0",
        f"training.output_dir={out}", "training.logging_steps=0", "training_logger.enabled=false",
        f"training.progress_bar={str(pcfg.progress_bar).lower()}", f"training.torch_threads={pcfg.threads}",
    ])
    cfg.model = OmegaConf.merge(cfg.model, _model_block(pcfg.model))
    cfg.model.tokenizer = "embedded"
    return cfg


def ensure_base_model(pcfg=None) -> Path:
    """The cached base directory for ``pcfg`` (a ``PretrainConfig``), pretraining it if missing."""
    from ..config.schema import PretrainConfig

    pcfg = pcfg or PretrainConfig()
    check_settings(pcfg)
    target = base_dir(pcfg)
    if (target / "config.json").is_file():
        return target
    with _locked(target.with_name(target.name + ".lock")):
        if (target / "config.json").is_file():  # built by another process meanwhile
            return target
        log.info("pretraining the base model %s (%d steps; cached in %s)", pcfg.model, pcfg.steps, target)
        _build(pcfg, target)
    return target


def _build(pcfg, target: Path) -> None:
    import torch

    from ..data.pretrain_corpus import generate_pretraining_corpus
    from ..data.tokenizer import embedded_tokenizer
    from .trainer import Trainer

    from .outputs import pid_alive

    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*-*"):  # a killed build's (under the same lock)
        pid = stale.name[len(f".{target.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        rows = generate_pretraining_corpus(pcfg.num_entities, pcfg.seed, embedded_tokenizer())
        data = work / "corpus.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        threads = torch.get_num_threads()
        try:
            state = Trainer(_pretrain_config(pcfg, data, work / "run")).train()
        finally:
            torch.set_num_threads(threads)
        final = work / "run" / "final_model"
        losses = [h["loss"] for h in state.history]
        tail = losses[-max(1, len(losses) // 10):]
        _, settings = base_key(pcfg)
        (final / "lmcleaner_base.json").write_text(json.dumps(
            {**settings, "rows": len(rows), "final_loss": sum(tail) / len(tail), "first_loss": losses[0]}, indent=2))
        os.replace(final, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resolve_base(name_or_path: str, pcfg=None) -> str:
    """``base:<preset>`` -> the cached directory (built on first use); anything else unchanged."""
    if not name_or_path.startswith(BASE_PREFIX):
        return name_or_path
    from ..config.schema import PretrainConfig

    preset = name_or_path[len(BASE_PREFIX):] or "tiny-llama"
    pcfg = pcfg or PretrainConfig()
    if pcfg.model != preset:
        pcfg = PretrainConfig(**{**asdict(pcfg), "model": preset})
    return str(ensure_base_model(pcfg))
