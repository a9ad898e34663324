"""``lmcleaner retrain``: the exact-retrain oracle, a from-scratch run without the samples.

Exact means the same run with the samples removed: the recorded config
(data, model, optimizer, seed, schedule) and the recorded *global* batch.
What could make it silently something else is refused or handled:

- the data changed (dataset fingerprint differs from the recorded one): refused;
- the run was recorded with another world size: the global batch is kept by
  scaling gradient accumulation (``N`` ranks x ``a`` micro-steps = one process
  x ``N*a`` micro-steps, the same micro-batches in the same order; summation
  order differs, so equal within float tolerance, not bit for bit); refused
  when the recorded global batch cannot be split that way;
- the run was resumed with another ``training.max_steps`` (its schedule
  changed mid-run): refused, since a from-scratch run cannot reproduce it;
- the output would land on the source run: refused like ``unlearn``.

A received run is data: its ``trust_remote_code`` and telemetry YAML are
ignored (``--trust-remote-code`` is the current user's opt-in).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

EPILOG = """\
example:
  lmcleaner retrain unlearn.model_dir=outputs/run unlearn.forget=17,203 [unlearn.output_dir=outputs/retrain]
  lmcleaner retrain unlearn.model_dir=outputs/run unlearn.requests=requests.jsonl   (the oracle for their union)
The run's training config (data, model, optimizer, seed, schedule) is read from its trajectory log or
trainer_state.json, so the retrain follows the same order, RNG and schedule with the samples removed from
every batch (normalisers recomputed). On CPU it is bit-identical to `lmcleaner unlearn trainer=replay`.
The output defaults to a fresh <run>/retrain[-N]; an existing one is refused unless unlearn.overwrite=true."""


def register(sub) -> None:
    from .cli import add_trust_flag

    p = sub.add_parser("retrain", help="exact retraining without the forgotten samples (the oracle)",
                       description="Retrain the run from scratch with the samples removed from every batch.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file merged over the defaults")
    add_trust_flag(p)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=run)


def recorded_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(recorded config, recorded run facts, the file they came from) of a trained run."""
    from ..trajectory import TrajectoryLog
    from .session import UnlearnError

    meta = run_dir / "training_log" / "meta.json"
    state = run_dir / "trainer_state.json"
    if meta.is_file():
        facts = TrajectoryLog(meta.parent).meta  # checked: keys and types, one-line errors
        return facts["config"], facts, meta
    if state.is_file():
        try:
            facts = json.loads(state.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise UnlearnError(f"{state}: unreadable ({str(err).splitlines()[0]})") from None
        if not isinstance(facts, dict) or not isinstance(facts.get("config"), dict):
            raise UnlearnError(f"{state}: no 'config' object; the file is damaged or was not written by lmcleaner")
        return facts["config"], facts, state
    raise UnlearnError(f"{run_dir} is not a trained run (no training_log/meta.json or trainer_state.json)")


def retrain_config(run_dir: Path, forget_ids: list[int], output_dir: Path, world_size: int | None = None,
                   trust_remote_code: bool = False):
    """The run's own config with ``exclude_ids`` set, the recorder off, the recorded global batch
    kept for ``world_size`` processes (default: this launch's), and nothing from the run that could
    run code."""
    from ..config.received import as_received, merge_recorded
    from ..train.distributed import DistributedConfigError, same_global_batch
    from .session import UnlearnError

    recorded, facts, source = recorded_run(Path(run_dir))
    cfg = as_received(merge_recorded(recorded, str(source)), trust_remote_code)
    cfg.training.exclude_ids = sorted(set(forget_ids) | set(cfg.training.exclude_ids))
    cfg.training.output_dir = str(output_dir)
    try:  # same global batch at this launch's world size (the same batch plan)
        same_global_batch(cfg.training, int(facts.get("world_size") or 1), world_size)
    except DistributedConfigError as err:
        raise UnlearnError(f"{source}: {err}") from None
    return cfg


def _check_recorded(run_dir: Path, rcfg, plan, dataset_fp: str, ids: list[int]) -> dict[str, Any]:
    """Refuse a retrain that would not be the recorded run without ``ids``; returns facts for the summary."""
    from ..trajectory import TrajectoryLog
    from .session import UnlearnError

    _, facts, source = recorded_run(run_dir)
    want = facts.get("dataset_fingerprint")
    if want is not None and want != dataset_fp:
        raise UnlearnError(f"dataset fingerprint mismatch: {source} was recorded on other data (fingerprint {want}, "
                           f"now {dataset_fp}); restore the training data (same rows, tokenizer and max_length)")
    total = rcfg.training.max_steps if rcfg.training.max_steps > 0 else rcfg.training.num_epochs * plan.steps_per_epoch
    log_dir = run_dir / "training_log"
    if (log_dir / "meta.json").is_file():
        log = TrajectoryLog(log_dir, tolerant=True)
        if log.barrier_steps:
            raise UnlearnError(f"{log_dir}: the run was resumed at step {log.barrier_steps[0]} with another "
                               "training.max_steps, so its learning-rate schedule changed mid-run and a from-scratch "
                               "retrain cannot reproduce it; use exact replay (lmcleaner unlearn trainer=replay)")
        for rec in log.records():
            if rec.step < total and plan.micro_batches(rec.step) != rec.micro_batches:
                raise UnlearnError(f"{log_dir}: retrain's batch plan does not reproduce recorded step {rec.step} "
                                   "(batch size, accumulation, world size or seed differ from the recorded run)")
            break
        late = {i: steps[0] for i in ids if (steps := [u.step for u in log.sample_uses(i) if u.step >= total])}
        if late:
            first = min(late, key=late.get)
            raise UnlearnError(f"samples {sorted(late)[:5]} were used after the steps retrain re-runs (0..{total - 1}); "
                               f"earliest such use: sample {first} at step {late[first]}: retrain cannot forget them")
    used: dict[int, int] = {}
    wanted = set(ids)
    for epoch in range((total - 1) // plan.steps_per_epoch + 1 if total > 0 else 0):
        n = min(plan.steps_per_epoch, total - epoch * plan.steps_per_epoch)
        for pos, i in enumerate(plan.epoch_order(epoch)[: n * plan.global_batch]):
            if i in wanted and i not in used:
                used[i] = epoch * plan.steps_per_epoch + pos // plan.global_batch
    return {"steps": total, "unused_ids": sorted(wanted - set(used)),
            "earliest_use": min(used.values()) if used else None}


def run(args) -> int:
    from accelerate import PartialState

    from ..config import load_config
    from ..data import BatchPlan, build_dataset, load_tokenizer
    from ..train import Trainer
    from ..train.distributed import main_process_pid
    from ..train.outputs import AtomicDir, check_output, fresh_child, is_within, resolved
    from .cli import warn_trust
    from .forget_set import resolve_forget_ids, validate_ids
    from .requests import forget_spec
    from .session import UnlearnError

    cfg = load_config(args.config, args.overrides)
    spec, _ = forget_spec(cfg.unlearn)  # unlearn.requests: the oracle for their union
    run_dir = Path(cfg.unlearn.model_dir or cfg.training.output_dir)
    if not run_dir.is_dir():
        raise UnlearnError(f"unlearn.model_dir={run_dir}: no such directory (give a trained run)")
    out = Path(cfg.unlearn.output_dir) if cfg.unlearn.output_dir else fresh_child(run_dir, "retrain")
    sources = [run_dir, run_dir / "training_log"]
    state0 = PartialState()
    world, main = state0.num_processes, state0.is_main_process
    final = check_output(out, sources, overwrite=cfg.unlearn.overwrite, key="unlearn.output_dir",
                         overwrite_key="unlearn.overwrite",
                         allowed_inside=lambda o, s: o.parent == s and o.name.startswith("retrain"))
    warn_trust("retrain", args.trust_remote_code)
    base = retrain_config(run_dir, [], final, world, args.trust_remote_code)
    tok = load_tokenizer(base.model.tokenizer, base.model.name_or_path, args.trust_remote_code)
    dataset = build_dataset(base.training, tok)
    ids = resolve_forget_ids(spec, dataset.records)
    validate_ids(ids, len(dataset))
    rcfg = retrain_config(run_dir, ids, final, world, args.trust_remote_code)
    rcfg.training.progress_bar = cfg.training.progress_bar  # this command's display, not the recorded run's
    t = rcfg.training
    plan = BatchPlan(len(dataset), t.batch_size, t.gradient_accumulation_steps, world, t.seed)
    facts = _check_recorded(run_dir, rcfg, plan, dataset.fingerprint, ids)
    # Train into a temporary directory outside the source run (reserved now: a read-only output
    # fails before any training) and rename it into place at the end. Under torchrun every rank
    # trains into the one directory the main rank reserved (named with its PID) and only it renames.
    outer = [s for s in map(resolved, sources) if is_within(final, s)]
    overwrite = cfg.unlearn.overwrite
    owner = str(main_process_pid(state0.device))
    target = (AtomicDir(final, outer[0].parent, prefix=f".{outer[0].name}--", replace=overwrite, tag=owner) if outer
              else AtomicDir(final, replace=overwrite, tag=owner))
    try:
        if main:
            target.reserve()
        state0.wait_for_everyone()
        trainer = Trainer(rcfg, tokenizer=tok)
        trainer.output_dir = target.tmp  # the config (and trainer_state.json) names the final directory
        state = trainer.train()
        if main:
            target.commit()
        state0.wait_for_everyone()
    except BaseException:
        if main:
            target.abort()
        raise
    if not main:  # under torchrun the main process reports
        return 0
    print(json.dumps({"output_dir": str(final), "model_dir": str(final / "final_model"), "forget_ids": ids,
                      "unused_ids": facts["unused_ids"], "earliest_use": facts["earliest_use"],
                      "steps": state.step, "gradient_accumulation_steps": t.gradient_accumulation_steps,
                      "world_size": world}))
    return 0
