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
  lmcleaner unlearn unlearn.model_dir=outputs/run unlearn.requests=requests.jsonl
  lmcleaner unlearn trainer=LMCleanerSample unlearn.model_dir=outputs/run unlearn.forget=17 \\
      trainer.method_args.certify.epsilon=1 trainer.method_args.certify.delta=1e-5

keys:
  unlearn.forget          ids (17,203), a file of ids, or a dataset file matched to training rows
  unlearn.requests        instead of forget: a JSONL file of requests, {{"request_id": "r1", "ids": [17]}} per
                          line, answered by ONE joint computation (one replay serves all: 1/k of the cost
                          each), with one audit record per request
  unlearn.model_dir       the trained run (default: training.output_dir)
  unlearn.output_dir      where the unlearned model goes (default: a fresh <run>/unlearned-<method>[-N]);
                          refused when it is the run, inside it, contains it, or exists
  unlearn.overwrite=true  replace an existing output_dir (its audit records are kept; never the run)
  unlearn.max_error       trainer=auto: the accepted estimated relative error
  unlearn.export          merged (from_pretrained model, default) | adapter (LoRA runs: the unlearned
                          adapter for peft.PeftModel.from_pretrained(base, dir))
  training.progress_bar=false
                          no progress display (a bar with ETA on a terminal, plain lines otherwise)
  trainer=METHOD          a registered method (below), or a YAML file with handler: and method_args:
  trainer.method_args.KEY the method's arguments (below), and for every method:
                          training_log_dir, apply_immediately, audit_dir, fallback_to_replay,
                          certify.{{epsilon,delta,subspace_rank,bound,assume,seed,...}}: Gaussian noise
                          for an (epsilon, delta) guarantee (docs/certification.md)
The run's own training config is read from its trajectory log; only the keys above matter here.
A received run is data: its trust_remote_code setting is ignored (see --trust-remote-code).

methods:
{methods}"""


class _Help(argparse.Action):
    """``-h``: the method list comes from the registry, read only when help is asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from .registry import describe_methods

        parser.epilog = OVERRIDES.format(methods=describe_methods())
        parser.print_help()
        parser.exit()


def register(sub) -> None:
    p = sub.add_parser("unlearn", help="remove training samples from a trained run (LMCleaner, replay, baselines)",
                       description="Compute the unlearned model for a deletion request from the recorded trajectory "
                                   "and write it (from_pretrained directory) with an audit record. The source run "
                                   "is not modified.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    p.add_argument("-h", "--help", action=_Help, help="show this help (with every method and its arguments) and exit")
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
    from ..config import load_config, to_dict
    from .registry import canonical_method, method_config, split_method_args
    from .requests import forget_spec
    from .result import UnlearnError
    from .session import UnlearnSession

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg))
        return 0
    ma, margs = split_method_args(to_dict(cfg.trainer.method_args))
    method = canonical_method(cfg.trainer.handler)
    if cfg.unlearn.max_error is not None and method == "auto":
        margs["max_error"] = cfg.unlearn.max_error
    method_config(method, margs)  # a bad argument fails before the run is opened
    if ma.get("certify"):
        from .certify import certify_config

        certify_config(ma["certify"])
    log_dir = ma.get("training_log_dir")
    run_dir = cfg.unlearn.model_dir or (None if log_dir else cfg.training.output_dir)
    warn_trust("unlearn", args.trust_remote_code)
    session = UnlearnSession(run_dir, log_dir, trust_remote_code=args.trust_remote_code)
    session.progress = bool(cfg.training.progress_bar)  # this command's display (false: no progress lines)
    session.check_export(cfg.unlearn.export)  # before any work
    spec, requests = forget_spec(cfg.unlearn)  # a requests file is checked whole before anything is reserved
    for req in requests or []:
        try:
            session.resolve(req["ids"])
        except ValueError as err:
            raise UnlearnError(f"unlearn.requests: request {req['request_id']!r}: {err}") from None
    out = Path(cfg.unlearn.output_dir) if cfg.unlearn.output_dir else session.default_output(method)
    # Refusals (output over the source, existing, read-only) happen now, before any computation;
    # under torchrun only the main rank reserves and writes (the others get None).
    target = session.reserve_output(out, cfg.unlearn.overwrite)
    try:
        ids = session.resolve(spec)  # with requests: their union, answered by one joint computation
        result = session.run(method, ids, fallback_to_replay=bool(ma.get("fallback_to_replay", True)),
                             certify=ma.get("certify"), **margs)
        out = session.save(result, out, ma.get("audit_dir"), apply=bool(ma.get("apply_immediately", True)),
                           reserved=target, export=cfg.unlearn.export, requests=requests)
    except BaseException:
        if target is not None:
            target.abort()
        raise
    if not session.is_main_process:  # under torchrun every rank computes, the main one reports
        return 0
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
    cert = result.info.get("certification")
    if cert:
        cert = {k: cert.get(k) for k in ("guarantee", "epsilon", "delta", "sigma", "bound", "bound_source",
                                          "mode", "noise_seed")}
    joint = {}
    if requests:  # the audit has one record per request; the summary names them and their share
        joint = {"requests": [r["request_id"] for r in requests],
                 "grad_equivalents_share": (result.info.get("grad_equivalents_total") or 0.0) / len(requests)}
    print(json.dumps({"output_dir": str(out), "forget_ids": ids, **{k: result.info.get(k) for k in keys},
                      **joint, **({"certification": cert} if cert else {})}))
    return 0
