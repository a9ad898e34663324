"""``lmcleaner eval``: evaluate original / unlearned / oracle models in one go.

``register(subparsers)`` adds the subcommand to the main CLI; ``run(args)``
executes it and returns the exit code (0 ok, 2 bad input: model path, data,
arguments). ``python -m lmcleaner.evaluate.cli`` runs it standalone.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

# Everything heavy (torch, transformers) is imported in run(): `lmcleaner eval --help` answers at once.

EXAMPLES = """\
examples:
  lmcleaner eval --model original=runs/a/final --model unlearned=runs/a/unlearned \\
      --model retrain=runs/a/retrain --oracle retrain --original original \\
      --data embedded --forget-authors 0,1 --out runs/a/eval
  lmcleaner eval --model m=out/model --data tofu:data/tofu --tofu-forget forget05
  lmcleaner eval --model m=out/model --data forget=f.jsonl,retain=r.jsonl,holdout=h.jsonl

data files: json/jsonl/csv/parquet in any format training reads: question/answer (TOFU),
messages, conversations (ShareGPT), prompt/response, or several fields (--text-field
instruction,input,output); the last assistant turn is the answer, what precedes it the prompt.
Truth ratio, forget quality and model utility also need the TOFU fields paraphrased_answer
(forget/retain) and perturbed_answer (a list of wrong answers); without them these metrics are
null and summary.json says which field is missing. Forget quality, privleak, KL and the
parameter error need --oracle; membership inference needs a holdout split.

Writes OUT/eval.json (per sample), OUT/summary.json (per model; null + "reasons" for metrics
that cannot be computed), OUT/forget_vs_utility.png, OUT/mia_auc.png, and for each model
OUT/open_unlearning/NAME/TOFU_EVAL.json + TOFU_SUMMARY.json under open-unlearning's key names
(use --convention open-unlearning for numbers comparable with their tables).
"""

TABLE_COLUMNS = ["model", "forget_prob", "forget_rougeL", "forget_truth_ratio", "forget_quality", "model_utility",
                 "mia_auc", "privleak", "kl_forget", "kl_retain", "rel_param_error"]


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _model_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got '{text}'")
    return name, path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``eval`` options (shared by the main CLI and the standalone entry point)."""
    p.add_argument("--model", dest="models", action="append", type=_model_spec, required=True, metavar="NAME=DIR",
                   help="a model directory (AutoModelForCausalLM) under a name; repeat for several models")
    p.add_argument("--oracle", metavar="NAME",
                   help="the exact-retrain model (reference for forget quality, privleak, KL, parameter error)")
    p.add_argument("--original", metavar="NAME",
                   help="the model before unlearning (denominator of the relative parameter error)")
    p.add_argument("--data", default="embedded", metavar="SPEC",
                   help="'embedded' (default), 'tofu:DIR', or 'forget=F,retain=R,holdout=H"
                        "[,real_authors=A,world_facts=W]' (json/jsonl/csv/parquet files)")
    p.add_argument("--forget-authors", type=_csv_ints, default=None, metavar="I,J",
                   help="embedded data: author indices to forget (default 0 when --forget-ids is not given)")
    p.add_argument("--forget-ids", type=_csv_ints, default=None, metavar="I,J",
                   help="embedded data: training sample ids to forget")
    p.add_argument("--text-field", default=None, metavar="F[,G,...]",
                   help="like training.text_field: the field holding the conversation, or several fields whose "
                        "last one is the answer (e.g. instruction,input,output)")
    p.add_argument("--convention", default="lmcleaner", choices=["lmcleaner", "open-unlearning"],
                   help="metric definitions: lmcleaner (default) or open-unlearning's (last answer token left out "
                        "of EM/ES/Min-K, ES floor 1/n, zlib of the decoded answer tokens, Min-K%%++ variance floor "
                        "1e-6); see docs/evaluation.md")
    p.add_argument("--tofu-forget", default="forget01", metavar="NAME",
                   help="TOFU forget split (forget01/forget05/forget10; default forget01)")
    p.add_argument("--max-rows", type=int, default=None, metavar="N",
                   help="cap every split to N rows (deterministic subsample) for a quick run")
    p.add_argument("--out", default="lmcleaner_out/eval", metavar="DIR",
                   help="output directory for eval.json and summary.json (default lmcleaner_out/eval); never a "
                        "model directory or inside one")
    p.add_argument("--overwrite", action="store_true",
                   help="replace eval.json/summary.json already in --out (refused otherwise)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let models that ship Python code (auto_map in config.json) run it; off by default")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer directory (default: the oracle's or first model's; embedded if it has none)")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                   help="greedy generation length for ROUGE-L (default 200; 0 disables generation)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="evaluation batch size (default 8)")
    p.add_argument("--max-length", type=int, default=512, metavar="N",
                   help="token limit of a rendered question+answer (default 512)")
    p.add_argument("--min-k", type=float, default=0.4, metavar="F",
                   help="fraction of tokens for the Min-K%% / Min-K%%++ attacks (default 0.4)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                   help="dtype to load models in (metrics are computed in float32; default float32)")
    p.add_argument("--device", default=None, help="device for loaded models (default cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "eval", help="evaluate original / unlearned / oracle models (forgetting, utility, MIA, fidelity)",
        description="Evaluate models on forget / retain / holdout data: answer probability, ROUGE-L, truth ratio, "
                    "forget quality, model utility, extraction strength, exact memorisation, membership-inference "
                    "AUC and privleak, KL and parameter distance to the exact-retrain oracle.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def build_data(args: argparse.Namespace):
    """The :class:`~lmcleaner.evaluate.EvalData` named by ``--data`` (and its companion options)."""
    from .data import EvalData, EvalDataError

    spec = args.data
    if spec == "embedded":
        authors = args.forget_authors
        if authors is None and not args.forget_ids:
            authors = [0]
        return EvalData.embedded(forget_author_indices=authors, forget_ids=args.forget_ids).capped(args.max_rows)
    if spec.startswith("tofu:"):
        return EvalData.tofu(spec[len("tofu:"):], forget=args.tofu_forget, max_rows=args.max_rows)
    parts = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in ("forget", "retain", "holdout", "real_authors", "world_facts"):
            raise EvalDataError(f"bad --data '{spec}': use embedded, tofu:DIR or forget=F,retain=R,holdout=H")
        parts[key] = value
    if "forget" not in parts:
        raise EvalDataError(f"bad --data '{spec}': forget=FILE is required")
    text_field = args.text_field.split(",") if args.text_field and "," in args.text_field else args.text_field
    return EvalData.from_paths(**parts, max_rows=args.max_rows, text_field=text_field)


def check_out(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` over a model (the sources) or over earlier results, and fail now
    (before any evaluation) when it cannot be written."""
    from ..train.outputs import OutputError, check_output, probe_writable

    sources = [path for _, path in args.models] + ([args.tokenizer] if args.tokenizer else [])
    out = check_output(args.out, sources, overwrite=True, key="--out")
    if not args.overwrite and any((out / f).exists() for f in ("eval.json", "summary.json")):
        raise OutputError(f"--out {args.out} already holds eval.json/summary.json: choose a new directory "
                          "or pass --overwrite")
    probe_writable(out, "--out")


def run(args: argparse.Namespace) -> int:
    """Run ``lmcleaner eval``; returns the exit code."""
    from .data import EvalDataError
    from .report import format_table
    from .runner import ModelLoadError, evaluate_models

    names = [n for n, _ in args.models]
    dup = sorted({n for n in names if names.count(n) > 1})
    try:
        if dup:
            raise ValueError(f"model name(s) given twice: {dup}")
        for role in ("oracle", "original"):
            if getattr(args, role) is not None and getattr(args, role) not in names:
                raise ValueError(f"--{role} '{getattr(args, role)}' is not a --model name (have {names})")
        check_out(args)
        if args.trust_remote_code:
            print("lmcleaner eval: warning: --trust-remote-code: Python files shipped with the models will be "
                  "imported and run with your permissions", file=sys.stderr)
        data = build_data(args)
        tokenizer = None
        if args.tokenizer:
            from .runner import load_eval_tokenizer

            tokenizer = load_eval_tokenizer(args.tokenizer, args.trust_remote_code)
        _, summary = evaluate_models(
            dict(args.models), data, oracle=args.oracle, original=args.original, tokenizer=tokenizer,
            out_dir=args.out, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            max_length=args.max_length, min_k=args.min_k, dtype=args.dtype, device=args.device,
            progress=not args.no_progress, trust_remote_code=args.trust_remote_code,
            convention=args.convention,
        )
    except OSError as err:
        from ..train.outputs import describe_os_error

        print(f"lmcleaner eval: error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except (ModelLoadError, EvalDataError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"lmcleaner eval: error: {first}", file=sys.stderr)
        return 2
    rows = [{"model": name, **res} for name, res in summary["models"].items()]
    print(format_table(rows, TABLE_COLUMNS))
    print(f"wrote {args.out}/eval.json, summary.json, forget_vs_utility.png, mia_auc.png and "
          f"open_unlearning/<model>/TOFU_SUMMARY.json ({summary['convention']} convention)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (``python -m lmcleaner.evaluate.cli``)."""
    parser = argparse.ArgumentParser(prog="lmcleaner eval", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    logging.basicConfig(level=logging.WARNING)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
