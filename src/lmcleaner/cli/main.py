"""``lmcleaner`` command line: train, lr-find, unlearn, retrain, eval, inspect, demo, pretrain, plan.

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
  trainer=NAME|FILE    unlearning method (auto, the default; LMCleanerBatch, LMCleanerSample, replay,
                       rollback, sgd_formula, GradAscent, GradDiff, NPO, SimNPO; `lmcleaner unlearn
                       --help` lists their arguments) or a YAML file
common keys:
  model.name_or_path   "tiny-llama" (embedded, offline), a transformers config .json (fresh weights),
                       or a HF id / local dir
  training.dataset_name  "embedded" or a json/jsonl/csv/parquet path or a hub dataset
  training.{max_steps,num_epochs,batch_size,gradient_accumulation_steps,learning_rate,
            optimizer,scheduler,warmup_steps,max_grad_norm,mixed_precision,output_dir,
            save_steps,eval_steps,resume_from_checkpoint,seed,text_field=[instruction,input,output]}
  training.forget_request_file=FILE training.online_unlearning.{method=LMCleanerSample|replay,K}
                       deletion requests appended to FILE while the run trains
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
    "pretrain": "lmcleaner.cli.pretrain",
    "plan": "lmcleaner.plan.cli",
}


class OneLineParser(argparse.ArgumentParser):
    """Usage errors are one line too (the full usage is in ``--help``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
    from ..train.outputs import OutputError, probe_writable

    if not 0 < args.start_lr < args.end_lr:
        raise ValueError(f"need 0 < --start-lr < --end-lr, got {args.start_lr} and {args.end_lr}")
    if args.num_steps < 2:
        raise ValueError(f"--num-steps {args.num_steps}: the sweep needs at least 2 steps")
    plot = args.plot or os.path.join(cfg.training.output_dir, "lr_find.png")
    if os.path.isdir(plot):  # fail now, not after the sweep
        raise OutputError(f"--plot {plot} is a directory: give a PNG file path")
    probe_writable(plot, "--plot")
    result = find_lr(cfg, start_lr=args.start_lr, end_lr=args.end_lr, num_steps=args.num_steps, plot_path=plot)
    print(json.dumps({k: v for k, v in result.items() if k not in ("lrs", "losses", "smoothed")}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="lmcleaner",
        description="Fine-tune Hugging Face causal LMs while recording the training trajectory, then unlearn "
                    "chosen samples (during or after training) with an audit record and a measured distance "
                    "to exact retraining.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `lmcleaner demo` for the whole story on the embedded default (no network; about 190 s of CPU "
               "time: ~3 min on an idle 2-core machine, longer on a busy one).",
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
    p.add_argument("--plot", default=None, help="PNG path for the loss-vs-LR plot (default: "
                                                "<training.output_dir>/lr_find.png)")
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


def _user_errors() -> tuple[type[BaseException], ...]:
    """Every one-line user-facing error in lmcleaner is a ValueError subclass (config, data,
    checkpoint, log, forget set, output over the source, a held run lock, unlearning request),
    or the trainer's TrainingError, which can only be raised once the trainer module is loaded
    (not imported here: --help stays fast). Operating-system errors are described separately."""
    trainer = sys.modules.get("lmcleaner.train.trainer")
    return (ValueError,) + ((trainer.TrainingError,) if trainer else ())


def _quiet_library_bars() -> None:
    """transformers' per-shard save/load bars and datasets' per-file bars drown lmcleaner's own
    progress display (one bar with ETA, or plain lines in a log) under carriage-return redraws."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()  # imports nothing heavy: --help and argument errors answer at once
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if not getattr(args, "print_config", False):
        _quiet_library_bars()
    # Every failure is one line on stderr. Bad input (config, data, checkpoint, log,
    # forget set, output over the source, a run lock held by another writer: all
    # ValueError subclasses) and operating-system errors (disk full, read-only
    # output) exit 2; anything else is a bug, reported in one line with exit 1.
    # LMCLEANER_DEBUG=1 shows the traceback instead.
    if os.environ.get("LMCLEANER_DEBUG"):
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"lmcleaner {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a bug is still one line, with how to see the traceback
        from ..train.outputs import as_os_error, describe_os_error

        if isinstance(err, _user_errors()):
            print(f"lmcleaner {args.command}: error: {_first_line(err)}", file=sys.stderr)
            return 2
        os_err = err if isinstance(err, OSError) else as_os_error(err, "?")
        if os_err is not None:  # also e.g. safetensors' "No space left on device (os error 28)"
            print(f"lmcleaner {args.command}: error: {describe_os_error(os_err)}", file=sys.stderr)
            return 2
        print(f"lmcleaner {args.command}: internal error: {type(err).__name__}: {_first_line(err)} (rerun with "
              "LMCLEANER_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return 1


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


if __name__ == "__main__":
    sys.exit(main())
