#!/usr/bin/env python
"""TOFU benchmark: unlearn the forget01 author of a model fine-tuned on real TOFU data.

Needs the TOFU data (``../shared/data/tofu`` from the repository root, or
``--tofu-dir``); without it the benchmark prints a message and exits 0.

What it does (defaults in brackets):

1. Training set [400 rows]: TOFU's forget set is the *last* rows of
   ``full.jsonl`` (forget01 = the last 40 rows = the last author), so taking
   the first N rows of ``full`` would never train on it. The benchmark writes
   ``<out-dir>/train.jsonl`` = the first ``num_samples - |forget|`` rows of
   ``full`` that are not in the forget set (the first 18 authors) followed by
   the forget rows (question/answer fields only). Sample ids are row
   indices of that file; the forget rows are matched back to ids with
   ``lmcleaner.unlearn.forget_set.resolve_forget_ids``.
2. Tokenizer: a byte-level BPE [vocab 2048] trained locally on all
   question/answer text of ``full.jsonl`` with ``train_embedded_tokenizer``,
   saved as a Hugging Face tokenizer directory in ``<out-dir>/tokenizer``
   (with the package's chat template) so the unlearning session and the
   evaluation reload the very same tokenizer.
3. Model: the embedded tiny Llama (``model=tiny-llama`` preset: 2 layers,
   hidden 64; vocabulary = the tokenizer's), trained from scratch with AdamW
   and the trajectory recorder on for the whole run [4 epochs = 200 steps].
4. The exact-retrain oracle (same order, RNG and schedule without the forget
   rows), then LMCleaner sample level (exact HVP, full window and one
   truncated window K), exact replay, rollback (no propagation) and
   the fine-tuning baselines (GradAscent, GradDiff, NPO, SimNPO: ``baseline_grid``),
   each measured against the oracle in parameter space
   (``compare_methods``: rel_param_error, KL on forget/retain, cost).
5. Evaluation of original, oracle and every unlearned model against the
   oracle with ``EvalData.tofu(dir, forget="forget01")``: forget01_perturbed,
   retain_perturbed (restricted to rows that were trained on), holdout01,
   real_authors_perturbed, world_facts_perturbed, each capped to --max-rows
   [40] rows: forget quality, model utility, ROUGE-L, truth ratio, MIA AUC.

Regime (DESIGN §3 cost model): the forget rows recur every epoch, so the
earliest use is in the first epoch and every method sweeps almost the whole
trajectory; a tiny model from scratch is far from TOFU's pretrained setting,
so absolute TOFU scores are low — the point is fidelity to the oracle.

    python benchmarks/tofu.py                       # ~5-8 min on 2 CPU cores
    python benchmarks/tofu.py --epochs 2 --max-rows 20 --json bench_out/tofu_quick.json
    python benchmarks/tofu.py training.learning_rate=1e-3   # any training.* override
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOFU = REPO.parent / "shared" / "data" / "tofu"
MARKER = ".tofu_benchmark"
EVAL_SPLITS = ("forget01_perturbed", "retain_perturbed", "holdout01", "real_authors_perturbed",
               "world_facts_perturbed")
TABLE_COLUMNS = ["name", "rel_param_error", "kl_forget", "kl_retain", "seconds", "grad_equivalents",
                 "cost_vs_replay", "forget_quality", "model_utility", "forget_rougeL", "retain_rougeL",
                 "forget_truth_ratio", "forget_loss_gap", "mia_auc"]
EVAL_KEYS = ("forget_quality", "model_utility", "forget_rougeL", "retain_rougeL", "forget_prob", "retain_prob",
             "forget_truth_ratio", "retain_truth_ratio", "real_authors_rougeL", "world_facts_rougeL",
             "forget_loss_gap", "retain_loss_gap", "mia_auc", "privleak", "kl_forget", "kl_retain")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tofu.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tofu-dir", default=str(DEFAULT_TOFU), help=f"TOFU jsonl directory (default: {DEFAULT_TOFU})")
    ap.add_argument("--forget", default="forget01", help="TOFU forget split (default: forget01)")
    ap.add_argument("--num-samples", type=int, default=400,
                    help="training rows: the forget rows + the first (num_samples - |forget|) other rows of "
                         "full.jsonl (default: 400)")
    ap.add_argument("--epochs", type=int, default=4, help="training epochs (default: 4)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: 3e-3)")
    ap.add_argument("--max-length", type=int, default=160, help="token limit per row (TOFU rows: <= ~135 tokens)")
    ap.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary trained on TOFU text")
    ap.add_argument("--model", default="tiny-llama", help="model preset (default: tiny-llama)")
    ap.add_argument("--K", type=int, default=10, help="the truncated window of LMCleaner (default: 10)")
    ap.add_argument("--modes", default="exact",
                    help="comma-separated curvature modes of LMCleaner, each run with the full window and --K "
                         "(default: exact; e.g. exact,GGN)")
    ap.add_argument("--checkpoint-interval", type=int, default=None,
                    help="light-mode checkpoint spacing (default: steps // 10)")
    ap.add_argument("--max-rows", type=int, default=40, help="rows per evaluation split (default: 40)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens for ROUGE-L (default: 32)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default: 1; measured 8-30x faster than 2 on a 2-core machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="bench_out/tofu_run",
                    help="run directory: train.jsonl, tokenizer, run, oracle, eval (default: bench_out/tofu_run)")
    ap.add_argument("--keep", action="store_true", help="keep the trained run and oracle (checkpoints, logs)")
    ap.add_argument("--json", default="bench_out/tofu.json", help="results (default: bench_out/tofu.json)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    return ap


def read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def build_training_file(tofu: Path, forget: str, num_samples: int, path: Path) -> dict[str, Any]:
    """Write ``path``: first retain rows of full.jsonl + the forget rows (question/answer)."""
    full = read_jsonl(tofu / "full.jsonl")
    forget_rows = read_jsonl(tofu / f"{forget}.jsonl")
    key = lambda r: (r["question"], r["answer"])  # noqa: E731
    forget_keys = {key(r) for r in forget_rows}
    retain_pool = [r for r in full if key(r) not in forget_keys]
    n_retain = num_samples - len(forget_rows)
    if n_retain < 1:
        raise SystemExit(f"--num-samples {num_samples} must exceed the {len(forget_rows)} forget rows")
    rows = [{"question": r["question"], "answer": r["answer"]} for r in retain_pool[:n_retain] + forget_rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return {"rows": len(rows), "retain_rows": n_retain, "forget_rows": len(forget_rows),
            "retain_keys": {key(r) for r in retain_pool[:n_retain]}}


def build_tokenizer(tofu: Path, vocab_size: int, out: Path):
    """Byte-level BPE on TOFU question/answer text, saved as an HF tokenizer directory."""
    from transformers import PreTrainedTokenizerFast

    from lmcleaner.data.tokenizer import CHAT_TEMPLATE, SPECIAL, train_embedded_tokenizer

    texts = [t for r in read_jsonl(tofu / "full.jsonl") for t in (r["question"], r["answer"])]
    raw = train_embedded_tokenizer(texts, vocab_size, out / "raw" / "tokenizer.json")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(raw), bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  additional_special_tokens=SPECIAL[3:])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out / "hf"))
    return tok, out / "hf"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tofu = Path(args.tofu_dir)
    needed = ["full.jsonl", f"{args.forget}.jsonl", *[f"{s}.jsonl" for s in EVAL_SPLITS]]
    if not tofu.is_dir() or not (tofu / "full.jsonl").is_file():
        print(f"TOFU data not found at {tofu}: skipping the TOFU benchmark (give --tofu-dir).")
        return 0
    missing = [n for n in needed if not (tofu / n).is_file()]
    if missing:
        print(f"TOFU directory {tofu} lacks {missing}: skipping the TOFU benchmark.")
        return 0

    import torch

    from lmcleaner.config import load_config
    from lmcleaner.evaluate import EvalData, evaluate_models, format_table
    from lmcleaner.evaluate.compare import baseline_grid, compare_methods, row_name
    from lmcleaner.train import Trainer
    from lmcleaner.unlearn.cli_retrain import retrain_config
    from lmcleaner.unlearn.forget_set import resolve_forget_ids
    from lmcleaner.unlearn.session import UnlearnSession

    torch.set_num_threads(args.threads)
    progress = not args.no_progress
    out = Path(args.out_dir)
    if out.exists():
        if any(out.iterdir()) and not (out / MARKER).is_file():
            raise SystemExit(f"{out} exists and is not a TOFU benchmark directory: choose another --out-dir")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("lmcleaner benchmarks/tofu.py run directory (deleted and rebuilt on each run)\n")
    timings: dict[str, float] = {}

    # 1-2. data and tokenizer
    t0 = time.perf_counter()
    train_file = out / "train.jsonl"
    built = build_training_file(tofu, args.forget, args.num_samples, train_file)
    tok, tok_dir = build_tokenizer(tofu, args.vocab_size, out / "tokenizer")
    timings["data_and_tokenizer"] = time.perf_counter() - t0

    # 3. training with the recorder
    steps_per_epoch = built["rows"] // args.batch_size
    steps = args.epochs * steps_per_epoch
    run_dir = out / "run"
    cfg = load_config(overrides=[
        f"model={args.model}", f"model.tokenizer={tok_dir}", f"model.max_position_embeddings={max(256, args.max_length)}",
        f"training.dataset_name={train_file}", f"training.max_length={args.max_length}",
        f"training.batch_size={args.batch_size}", f"training.max_steps={steps}", "training.optimizer=adamw",
        f"training.learning_rate={args.lr}", f"training.warmup_steps={max(1, steps // 20)}",
        f"training.seed={args.seed}", f"training.progress_bar={str(progress).lower()}",
        "training.logging_steps=0", "training_logger.enabled=true", f"training_logger.max_steps={steps}",
        f"training_logger.checkpoint_interval={args.checkpoint_interval or max(5, steps // 10)}",
        *args.overrides,
        f"training.output_dir={run_dir}", "training.resume_from_checkpoint=null"])
    t0 = time.perf_counter()
    trainer = Trainer(cfg, tokenizer=tok)
    state = trainer.train()
    timings["train"] = time.perf_counter() - t0
    ds = trainer.dataset
    ids = resolve_forget_ids(str(tofu / f"{args.forget}.jsonl"), ds.records)
    expected = list(range(built["retain_rows"], built["rows"]))
    if ids != expected:
        raise SystemExit(f"forget rows resolved to ids {ids[:5]}..., expected {expected[:5]}...")

    # 4. oracle and unlearning methods
    t0 = time.perf_counter()
    oracle_trainer = Trainer(retrain_config(run_dir, ids, out / "oracle"), tokenizer=tok)
    oracle_trainer.train()
    timings["retrain_oracle"] = time.perf_counter() - t0
    oracle = {n: p.detach().clone() for n, p in oracle_trainer.engine.trainable().items()}
    del oracle_trainer

    session = UnlearnSession(run_dir)
    tau = session.tau
    touched = session.steps_for(ids)
    K = min(args.K, tau)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    grid = [("replay", {})]
    for mode in modes:
        grid += [("LMCleanerSampleLevel", {"hessian_mode": mode, "K": tau}),
                 ("LMCleanerSampleLevel", {"hessian_mode": mode, "K": K})]
    grid += [("rollback", {}), *baseline_grid()]
    grid = list(dict.fromkeys((m, tuple(sorted(kw.items()))) for m, kw in grid))
    grid = [(m, dict(kw)) for m, kw in grid]
    retain_ids = [i for i in range(len(ds)) if i not in set(ids)][: args.max_rows]
    unlearned: dict[str, torch.nn.Module] = {}

    def keep(name: str, res) -> None:
        unlearned[name] = session.model_with(res.params).eval()

    t0 = time.perf_counter()
    rows = compare_methods(session, ids, grid, oracle, [ds[i] for i in ids], [ds[i] for i in retain_ids],
                           on_result=keep, progress=progress)
    timings["unlearn_all_methods"] = time.perf_counter() - t0
    for r in rows:
        if r["method"] == "LMCleanerSampleLevel":
            r["name"] = f"LMC-sample-{r['hessian_mode']}-" + ("full" if r["K"] >= tau else f"K{r['K']}")

    # 5. TOFU evaluation against the oracle
    data = EvalData.tofu(tofu, forget=args.forget)
    trained = built["retain_keys"]
    kept = [i for i, r in enumerate(data.retain) if (r["question"], r["answer"]) in trained]
    data.retain = [data.retain[i] for i in kept]
    data.ids["retain"] = kept  # row indices in retain_perturbed.jsonl
    data = data.capped(args.max_rows)
    models: dict[str, Any] = {"oracle": str(out / "oracle" / "final_model"), "original": str(run_dir / "final_model")}
    names = {row_name(m, kw): r["name"] for (m, kw), r in zip(grid, rows)}
    models.update({names[k]: v for k, v in unlearned.items()})
    t0 = time.perf_counter()
    _, summary = evaluate_models(models, data, oracle="oracle", original="original", tokenizer=tok,
                                 out_dir=out / "eval", max_new_tokens=args.max_new_tokens, progress=progress)
    timings["eval"] = time.perf_counter() - t0
    ms = summary["models"]
    for r in rows:
        m = ms.get(r["name"], {})
        for key in EVAL_KEYS:
            if key in ("kl_forget", "kl_retain"):
                r[f"eval_{key}"] = m.get(key)  # on the TOFU eval rows (forget01_perturbed / retain_perturbed)
            else:
                r[key] = m.get(key)
    for base in ("original", "oracle"):
        m = ms[base]
        rows.append({"name": base, "method": base, "rel_param_error": 1.0 if base == "original" else 0.0,
                     **{k: m.get(k) for k in EVAL_KEYS}})

    result = {
        "benchmark": "tofu", "tofu_dir": str(tofu), "forget": args.forget, "forget_ids": ids,
        "training_rows": built["rows"], "retain_rows": built["retain_rows"], "steps": tau,
        "steps_touched": touched, "first_step": touched[0],
        "regime": f"old request: forget rows used in {len(touched)} of {tau} steps, first at step {touched[0]}",
        "model": args.model, "params": sum(p.numel() for p in oracle.values()), "vocab_size": len(tok),
        "final_train_loss": state.history[-1]["loss"] if state.history else None,
        "eval_data": data.description, "eval_splits": summary["splits"], "threads": args.threads,
        "eval_summary": str(out / "eval" / "summary.json"), "timings": timings, "rows": rows, "args": vars(args), "command": " ".join(sys.argv),
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    if not args.keep:
        for sub in ("run", "oracle"):
            shutil.rmtree(out / sub, ignore_errors=True)

    print(format_table(rows, columns=TABLE_COLUMNS))
    print(f"\n{result['regime']}; {result['params']} params, vocab {result['vocab_size']}, "
          f"final train loss {result['final_train_loss']:.3f}")
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print(f"eval: {data.description}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
