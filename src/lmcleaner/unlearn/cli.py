"""``lmcleaner unlearn``: remove samples from a trained run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OVERRIDES = """\
examples:
  lmcleaner unlearn trainer=LMCleanerSample unlearn.model_dir=outputs/run unlearn.forget=17,203
  lmcleaner unlearn trainer=LMCleanerBatch trainer.method_args.K=50 trainer.method_args.hessian_mode=exact \\
      unlearn.model_dir=outputs/run unlearn.forget=forget_ids.txt
  lmcleaner unlearn trainer=replay unlearn.model_dir=outputs/run unlearn.forget=data/forget.jsonl

keys:
  unlearn.forget          ids (17,203), a file of ids, or a dataset file matched to training rows
  unlearn.model_dir       the trained run (default: training.output_dir)
  unlearn.output_dir      where the unlearned model goes (default: a fresh <run>/unlearned-<method>[-N]);
                          refused when it is the run, inside it, contains it, or exists
  unlearn.overwrite=true  replace an existing output_dir (its audit records are kept; never the run)
  trainer=PRESET          LMCleanerBatch | LMCleanerSample | replay | rollback | sgd_formula | GradAscent
  trainer.method_args.{training_log_dir, K, hessian_mode=GGN|exact|diag, damping, apply_immediately, audit_dir}
The run's own training config is read from its trajectory log; only the keys above matter here.
A received run is data: its trust_remote_code setting is ignored (see --trust-remote-code)."""


def register(sub) -> None:
    p = sub.add_parser("unlearn", help="remove training samples from a trained run (LMCleaner, replay, baselines)",
                       description="Compute the unlearned model for a deletion request from the recorded trajectory "
                                   "and write it (from_pretrained directory) with an audit record. The source run "
                                   "is not modified.",
                       epilog=OVERRIDES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file merged over the defaults")
    p.add_argument("--print-config", action="store_true")
    add_trust_flag(p)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=run)


def add_trust_flag(p) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the run's model import its own Python code (auto_map in its config.json); off by "
                        "default, and never taken from the run itself")


def warn_trust(command: str, enabled: bool) -> None:
    if enabled:
        print(f"lmcleaner {command}: warning: --trust-remote-code: Python files shipped with the model will be "
              "imported and run with your permissions", file=sys.stderr)


def run(args) -> int:
    from ..config import load_config
    from .session import UnlearnSession, canonical_method

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg))
        return 0
    ma = cfg.trainer.method_args
    method = canonical_method(cfg.trainer.handler)
    run_dir = cfg.unlearn.model_dir or (None if ma.training_log_dir else cfg.training.output_dir)
    warn_trust("unlearn", args.trust_remote_code)
    session = UnlearnSession(run_dir, ma.training_log_dir, trust_remote_code=args.trust_remote_code)
    out = Path(cfg.unlearn.output_dir) if cfg.unlearn.output_dir else session.default_output(method)
    # Refusals (output over the source, existing, read-only) happen now, before any computation.
    target = session.reserve_output(out, cfg.unlearn.overwrite)
    try:
        ids = session.resolve(cfg.unlearn.forget)
        result = session.run(method, ids, K=ma.K, hessian_mode=ma.hessian_mode, damping=ma.damping, lr=ma.lr,
                             steps=ma.steps, fallback_to_replay=ma.fallback_to_replay and method != "replay")
        out = session.save(result, out, ma.audit_dir, apply=ma.apply_immediately, reserved=target)
    except BaseException:
        target.abort()
        raise
    if result.info.get("fallback_from"):
        print(f"lmcleaner unlearn: warning: {method} diverged (retain loss "
              f"{result.info['fallback_from']['retain_loss_after']:.3f}); the result is exact replay instead "
              "(trainer.method_args.fallback_to_replay=false keeps the correction)", file=sys.stderr)
    elif result.info.get("diverged"):
        print(f"lmcleaner unlearn: warning: the correction raised the retain loss from "
              f"{result.info['retain_loss_before']:.3f} to {result.info['retain_loss_after']:.3f}; "
              "consider trainer=replay (exact)", file=sys.stderr)
    keys = ("method", "K", "hessian_mode", "steps_touched", "correction_norm", "seconds", "grad_equivalents_total",
            "diverged", "retain_loss_before", "retain_loss_after", "fallback_from")
    print(json.dumps({"output_dir": str(out), "forget_ids": ids, **{k: result.info.get(k) for k in keys}}))
    return 0
