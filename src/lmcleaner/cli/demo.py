"""``lmcleaner demo``: the whole story in one command, offline.

Trains the embedded model with the recorder, issues a deletion request for a
few authors' samples, computes the exact-retrain oracle, runs LMCleaner
(batch and sample level, several K and curvature modes), exact replay and the
baselines, evaluates every model against the oracle, certifies the windowed
LMCleaner result with calibrated noise at a few epsilons (membership inference
and utility of the certified model next to the oracle with the same noise) and
writes ``<out_dir>/report.md`` with plots and ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

EPILOG = """\
scale it up with overrides:
  lmcleaner demo demo.steps=600 demo.Ks=[10,50,200] demo.hessian_modes=[GGN,exact]
  lmcleaner demo demo.model=micro-llama demo.forget_authors=[3] demo.optimizer=sgd demo.learning_rate=0.05
  lmcleaner demo demo.model=my_model.yaml demo.data=path/to/qa.jsonl demo.forget_ids=[0,1,2]
  lmcleaner demo demo.max_grad_norm=1.0 demo.certify_epsilons=[0.5,1,2,4,8]   # certification at more epsilons
  lmcleaner demo demo.certify_epsilons=[]                                      # no certification section
  any training.* key applies to the recorded run, e.g. training.batch_size=16"""

MARKER = "demo.json"


def register(sub) -> None:
    p = sub.add_parser("demo", help="train, unlearn with every method, compare to exact retraining, report",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file merged over the defaults")
    p.add_argument("overrides", nargs="*", help="key=value overrides (demo.*, training.*)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config

    cfg = load_config(args.config, args.overrides)
    result = run_demo(cfg)
    print(result["table"])
    print(f"\nreport: {result['report']}")
    return 0


def _training_config(cfg, run_dir: Path):
    from omegaconf import OmegaConf

    from ..config.loader import CONF_DIR, ConfigError

    d = cfg.demo
    cfg = cfg.copy()
    preset = Path(d.model) if d.model.endswith((".yaml", ".yml")) else CONF_DIR / "model" / f"{d.model}.yaml"
    if not preset.is_file():
        raise ConfigError(f"demo.model '{d.model}' is neither a model preset nor a YAML file")
    cfg.model = OmegaConf.merge(cfg.model, OmegaConf.load(preset))
    if d.init not in ("pretrained", "scratch"):
        raise ConfigError(f"demo.init={d.init!r}: choose pretrained (fine-tune the project's base) or scratch")
    if d.init == "pretrained" and cfg.model.name_or_path == "tiny-llama":
        # the project's own pretrained base of this preset (built once, cached: `lmcleaner pretrain`)
        cfg.model.name_or_path, cfg.model.tokenizer = f"base:{d.model}", "embedded"
    t = cfg.training
    t.max_steps, t.optimizer, t.learning_rate, t.max_grad_norm = d.steps, d.optimizer, d.learning_rate, d.max_grad_norm
    t.dataset_name, t.output_dir, t.resume_from_checkpoint = d.data, str(run_dir), None
    t.exclude_ids, t.logging_steps = [], max(t.logging_steps, 0)
    lg = cfg.training_logger
    lg.enabled, lg.max_steps = True, max(lg.max_steps, d.steps)
    lg.checkpoint_interval = max(5, d.steps // 10)
    return cfg


def _forget_ids(cfg, rows: list[dict]) -> list[int]:
    d = cfg.demo
    if d.forget_ids:
        return sorted(int(i) for i in d.forget_ids)
    if rows and "author_index" in rows[0]:
        ids = [i for i, r in enumerate(rows) if r["author_index"] in set(d.forget_authors)]
        if ids:
            return ids
    return list(range(min(8, len(rows))))


def run_demo(cfg) -> dict[str, Any]:
    from ..evaluate import EvalData, evaluate_models, format_table, write_report
    from ..evaluate.certification import certification_sweep
    from ..evaluate.compare import compare_methods, default_grid, merge_eval, row_name, windowed_grid
    from ..evaluate.report import certification_markdown, plot_certification
    from ..train import Trainer
    from ..train.export import export_model
    from ..unlearn.cli_retrain import retrain_config
    from ..unlearn.session import UnlearnSession

    import torch

    d = cfg.demo
    show = bool(cfg.training.progress_bar)
    started = time.perf_counter()

    def phase(i: int, what: str) -> None:
        """One line per phase (each phase then shows its own progress with an ETA)."""
        if show:
            total = 5 if d.certify_epsilons else 4
            print(f"demo [{i}/{total}] {what} (elapsed {time.perf_counter() - started:.0f} s)", file=sys.stderr,
                  flush=True)

    # Tiny models: one intra-op thread is fastest, and on a busy 2-core machine
    # two threads spin against each other (measured >10x slower sweeps).
    torch.set_num_threads(max(1, int(d.threads)))
    out = Path(d.out_dir)
    run_dir, models_dir = out / "run", out / "models"
    train_cfg = _training_config(cfg, run_dir)  # bad input fails here, before anything is written
    if out.exists():
        if not (out / MARKER).is_file():
            raise FileExistsError(f"demo.out_dir={out} exists and is not a demo output: choose another demo.out_dir")
        shutil.rmtree(out)  # an earlier demo's own output (it carries the marker), never anything else
    out.mkdir(parents=True)
    (out / MARKER).write_text(json.dumps({"status": "running"}))
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    phase(1, f"training {d.steps} steps with the trajectory recorder")
    model_name = str(train_cfg.model.name_or_path)
    trainer = Trainer(train_cfg)
    state = trainer.train()
    timings["train"] = time.perf_counter() - t0
    session = UnlearnSession(run_dir)
    wanted = _forget_ids(cfg, trainer.dataset.records)
    ids = [i for i in wanted if session.log.steps_containing([i])]
    if not ids:
        raise ValueError(f"none of the samples to forget {wanted[:8]} was used in the {session.tau} recorded "
                         "steps: raise demo.steps")

    t0 = time.perf_counter()
    phase(2, f"exact retraining without the {len(ids)} forgotten samples (the oracle)")
    oracle_cfg = retrain_config(run_dir, ids, out / "retrain")
    oracle_cfg.training.progress_bar = show
    oracle_trainer = Trainer(oracle_cfg, tokenizer=trainer.tokenizer)
    oracle_trainer.train()
    timings["retrain"] = time.perf_counter() - t0
    oracle = {n: p.detach().clone() for n, p in oracle_trainer.engine.trainable().items()}

    dataset = trainer.dataset
    retain_ids = [i for i in range(len(dataset)) if i not in set(ids)][: d.eval_max_retain]
    model_dirs = {"original": run_dir / "final_model", "oracle": out / "retrain" / "final_model"}

    unlearned = {}  # row name -> UnlearnResult (the certification section uses one of them)

    def export(name, res):
        unlearned[name] = res
        model_dirs[name] = export_model(session.model_with(res.params), trainer.tokenizer, models_dir / name)

    t0 = time.perf_counter()
    grid = default_grid(session.tau, d.Ks, d.hessian_modes) + windowed_grid(d.Ks) + [("auto", {})]
    phase(3, f"unlearning with {len(grid)} method settings, each measured against the oracle")
    rows = compare_methods(session, ids, grid, oracle, [dataset[i] for i in ids], [dataset[i] for i in retain_ids],
                           on_result=export, progress=cfg.training.progress_bar, include_original=True)
    timings["unlearn_all_methods"] = time.perf_counter() - t0

    data = (EvalData.embedded(forget_ids=ids, max_retain=d.eval_max_retain, max_holdout=d.eval_max_holdout)
            if d.data == "embedded" else None)
    if data is not None:
        t0 = time.perf_counter()
        phase(4, f"evaluating {len(model_dirs)} models (forgetting, utility, membership inference)")
        _, summary = evaluate_models({k: str(v) for k, v in model_dirs.items()}, data, oracle="oracle",
                                     original="original", out_dir=out / "eval", max_new_tokens=d.eval_max_new_tokens,
                                     progress=cfg.training.progress_bar)
        timings["eval"] = time.perf_counter() - t0
        merge_eval(rows, summary)
    sections, certification = [], None
    # certify the windowed correction (exact windows: the approximation auto uses), else the full-window one
    candidates = [row_name("LMCleanerSampleLevel", {"propagation": "replay", "K": int(k), "carry": "frozen"})
                  for k in d.Ks[:1]]
    candidates.append(row_name("LMCleanerSampleLevel", {"hessian_mode": d.hessian_modes[0], "K": session.tau}))
    chosen = next((name for name in candidates if name in unlearned), None)
    if data is not None and d.certify_epsilons and chosen is not None:
        t0 = time.perf_counter()
        phase(5, f"certified removal of {chosen}: calibrated noise at epsilon {list(d.certify_epsilons)}, "
                 "certified vs oracle + the same noise")
        certification = certification_sweep(session, unlearned[chosen], oracle, data,
                                            [*d.certify_epsilons, math.inf], list(d.certify_variants),
                                            max_new_tokens=d.eval_max_new_tokens, rank=8,
                                            progress=cfg.training.progress_bar)
        certification["unlearned"] = chosen
        timings["certify"] = time.perf_counter() - t0
        png = plot_certification(certification, out / "certification.png")
        sections.append(certification_markdown(certification, png.name if png else None))
    skipped = sorted(set(wanted) - set(ids))
    init = ("fine-tuned from the project's pretrained base" if model_name.startswith("base:")
            else "trained from random initialisation")
    notes = (f"Run: {state.step} steps, {init}, {d.optimizer} lr {d.learning_rate}. "
             f"Forgot {len(ids)} samples (ids {ids[:8]}{'...' if len(ids) > 8 else ''}) used in "
             f"{len(session.steps_for(ids))} of {session.tau} steps"
             + (f" ({len(skipped)} requested samples were never used and need no unlearning)" if skipped else "")
             + ". rel_param_error = ||theta_hat - theta_retrain|| / "
             "||theta - theta_retrain|| against exact retraining (sample-level counterfactual); batch-level "
             "LMCleaner removes whole batches, a different counterfactual, so its error against this oracle is "
             "not a fidelity figure. cost_vs_replay counts gradient-equivalents (HVPs at their measured cost, "
             "replayed steps to recover past parameters included). Timings (s): "
             + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    history = [(h["step"], h["loss"]) for h in state.history]
    paths = write_report(rows, out, loss_history=history, title="lmcleaner demo", notes=notes, sections=sections)
    results = {"forget_ids": ids, "tau": session.tau, "rows": rows, "timings": timings,
               "report": str(paths["report"]), "certification": certification}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / MARKER).write_text(json.dumps({"status": "done"}))
    return {**results, "table": format_table(rows)}
