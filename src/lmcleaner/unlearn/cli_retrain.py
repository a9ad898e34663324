"""``lmcleaner retrain``: the exact-retrain oracle, a from-scratch run without the samples."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EPILOG = """\
example:
  lmcleaner retrain unlearn.model_dir=outputs/run unlearn.forget=17,203 [unlearn.output_dir=outputs/run/retrain]
The run's training config (data, model, optimizer, seed, schedule) is read from its trajectory log or
trainer_state.json, so the retrain follows the same order, RNG and schedule with the samples removed from
every batch (normalisers recomputed). On CPU it is bit-identical to `lmcleaner unlearn trainer=replay`."""


def register(sub) -> None:
    p = sub.add_parser("retrain", help="exact retraining without the forgotten samples (the oracle)",
                       description="Retrain the run from scratch with the samples removed from every batch.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file merged over the defaults")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=run)


def retrain_config(run_dir: Path, forget_ids: list[int], output_dir: Path):
    """The run's own config with ``exclude_ids`` set and the recorder off."""
    from omegaconf import OmegaConf

    from ..config import load_config
    from ..train.distributed import same_global_batch
    from .session import UnlearnError

    meta = run_dir / "training_log" / "meta.json"
    state = run_dir / "trainer_state.json"
    if meta.is_file():
        recorded = json.loads(meta.read_text())
    elif state.is_file():
        recorded = json.loads(state.read_text())
    else:
        raise UnlearnError(f"{run_dir} is not a trained run (no training_log/meta.json or trainer_state.json)")
    cfg = load_config()
    cfg = OmegaConf.merge(cfg, recorded["config"])
    if "world_size" in recorded:  # same global batch at this launch's world size (the same batch plan)
        same_global_batch(cfg.training, int(recorded["world_size"]))
    cfg.training.exclude_ids = sorted(set(forget_ids) | set(cfg.training.exclude_ids))
    cfg.training.output_dir = str(output_dir)
    cfg.training.resume_from_checkpoint = None
    cfg.training.forget_request_file = None
    cfg.training_logger.enabled = False
    return cfg


def run(args) -> int:
    from ..config import load_config
    from ..data import build_dataset, load_tokenizer
    from ..train import Trainer
    from .forget_set import resolve_forget_ids, validate_ids

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.unlearn.model_dir or cfg.training.output_dir)
    out = Path(cfg.unlearn.output_dir) if cfg.unlearn.output_dir else run_dir / "retrain"
    base = retrain_config(run_dir, [], out)
    tok = load_tokenizer(base.model.tokenizer, base.model.name_or_path)
    rows = build_dataset(base.training, tok).records
    ids = resolve_forget_ids(cfg.unlearn.forget, rows)
    validate_ids(ids, len(rows))
    rcfg = retrain_config(run_dir, ids, out)
    rcfg.training.progress_bar = cfg.training.progress_bar  # this command's display, not the recorded run's
    trainer = Trainer(rcfg, tokenizer=tok)
    state = trainer.train()
    if not trainer.accelerator.is_main_process:  # under torchrun the main process reports
        return 0
    print(json.dumps({"output_dir": str(out), "model_dir": str(out / "final_model"), "forget_ids": ids,
                      "steps": state.step}))
    return 0
