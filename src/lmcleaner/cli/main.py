"""``lmcleaner`` command line: train, lr-find, unlearn, retrain, eval, inspect, demo, plan.

Config-driven commands take Hydra-style overrides after the command
(``lmcleaner train training.max_steps=50 model=tiny-llama``) and an optional
``--config file.yaml`` merged under them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

OVERRIDES_HELP = """\
overrides (Hydra grammar, applied after --config):
  key=value            set a value, e.g. training.max_steps=200 training.optimizer=sgd
  model=NAME|FILE      model preset from the package (tiny-llama, micro-llama, tiny-mixtral) or a YAML file
  trainer=NAME|FILE    unlearning preset (LMCleanerBatch, LMCleanerSample, replay, rollback,
                       sgd_formula, GradAscent) or a YAML file
common keys:
  model.name_or_path   "tiny-llama" (embedded, offline), a transformers config .json (fresh weights),
                       or a HF id / local dir
  training.dataset_name  "embedded" or a json/jsonl/csv/parquet path or a hub dataset
  training.{max_steps,num_epochs,batch_size,gradient_accumulation_steps,learning_rate,
            optimizer,scheduler,warmup_steps,max_grad_norm,mixed_precision,output_dir,
            save_steps,eval_steps,resume_from_checkpoint,seed}
  training_logger.{enabled,storage=light|heavy|diag,max_steps,checkpoint_interval,save_interval}
  lora.{enabled,r,alpha,target_modules}
All keys and their documentation: lmcleaner.config.schema (or `lmcleaner train --print-config`)."""

# Subcommands that live with the part they drive; each module has register()/run().
PLUGINS = {
    "eval": "lmcleaner.evaluate.cli",
    "inspect": "lmcleaner.trajectory.cli",
    "unlearn": "lmcleaner.unlearn.cli",
    "retrain": "lmcleaner.unlearn.cli_retrain",
    "demo": "lmcleaner.cli.demo",
    "plan": "lmcleaner.plan.cli",
}


def _config_parser(sub, name: str, help_text: str, description: str):
    p = sub.add_parser(name, help=help_text, description=description, epilog=OVERRIDES_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file merged over the defaults (before the overrides)")
    p.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    return p


def _load(args):
    from ..config import load_config

    return load_config(args.config, args.overrides)


def _print_config(cfg) -> int:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(cfg))
    return 0


def cmd_train(args) -> int:
    cfg = _load(args)
    if args.print_config:
        return _print_config(cfg)
    from ..train import Trainer

    state = Trainer(cfg).train()
    last = state.history[-1]["loss"] if state.history else float("nan")
    summary = {"steps": state.step, "final_loss": last, "output_dir": cfg.training.output_dir,
               "stopped_early": state.stopped_early, "best_metric": state.best_metric}
    print(json.dumps(summary))
    return 0


def cmd_lr_find(args) -> int:
    cfg = _load(args)
    if args.print_config:
        return _print_config(cfg)
    from ..train.lr_finder import find_lr

    result = find_lr(cfg, start_lr=args.start_lr, end_lr=args.end_lr, num_steps=args.num_steps,
                     plot_path=args.plot)
    print(json.dumps({k: v for k, v in result.items() if k not in ("lrs", "losses", "smoothed")}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmcleaner",
        description="Fine-tune Hugging Face causal LMs while recording the training trajectory, then unlearn "
                    "chosen samples (during or after training) with an audit record and a measured distance "
                    "to exact retraining.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `lmcleaner demo` for the whole story on the embedded default (no network, ~5 min on 2 cores).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = _config_parser(sub, "train", "fine-tune a model while recording the trajectory",
                       "Fine-tune a causal LM (default: the embedded tiny Llama on generated author QA) with "
                       "the trajectory recorder on. Writes checkpoints, training_log/, final_model/.")
    p.set_defaults(func=cmd_train)
    p = _config_parser(sub, "lr-find", "exponential learning-rate sweep with a plot",
                       "Sweep the learning rate exponentially (keeping per-group ratios), stop on divergence, "
                       "restore the model, print a suggestion and write a PNG plot.")
    p.add_argument("--start-lr", type=float, default=1e-6)
    p.add_argument("--end-lr", type=float, default=1.0)
    p.add_argument("--num-steps", type=int, default=100)
    p.add_argument("--plot", default="lr_find.png", help="PNG path for the loss-vs-LR plot")
    p.set_defaults(func=cmd_lr_find)
    for name, module in PLUGINS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("lmcleaner"):
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..train import TrainingError

    parser = build_parser()
    args = parser.parse_args(argv)
    # transformers' per-shard save/load bars drown our own progress bars in a run's log
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    # Every one-line user-facing error in lmcleaner is a ValueError subclass
    # (config, data, checkpoint, log, forget set, unlearning request).
    # LMCLEANER_DEBUG=1 shows the traceback instead.
    expected = (ValueError, FileNotFoundError, FileExistsError, TrainingError)
    if os.environ.get("LMCLEANER_DEBUG"):
        expected = ()
    try:
        return int(args.func(args) or 0)
    except expected as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"lmcleaner {args.command}: error: {first}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmcleaner {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
