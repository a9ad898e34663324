"""``lmcleaner plan``: print what recording and unlearning a run will cost (table or ``--json``)."""

from __future__ import annotations

import argparse
import json

EPILOG = """\
examples:
  lmcleaner plan --model meta-llama/Llama-3.2-1B --samples 10000 training.batch_size=4 \\
      training.gradient_accumulation_steps=8 training.max_steps=2000 training_logger.max_steps=1000
  lmcleaner plan --model meta-llama/Llama-3.2-1B --samples 10000 lora.enabled=true lora.r=16 --age 50 500
  lmcleaner plan --model path/to/config.json --samples 4000 --json

--model: an embedded preset (tiny-llama, micro-llama, tiny-mixtral), a transformers config JSON, a local
model directory, a known model ({known}) or a hub id (its config is downloaded when reachable).
The overrides are those of `lmcleaner train` (batch, steps, optimizer, model.dtype, lora.*,
training_logger.storage|max_steps|checkpoint_interval, trainer.method_args.K|hessian_mode).
Sizes use the encoders the trainer and the recorder use; costs follow DESIGN §3 with the measured
HVP cost (gradient-equivalents: one training step = 1)."""


class _Intermixed(argparse.ArgumentParser):
    """Options and ``key=value`` overrides in any order (``--model X lora.r=16 --samples 10``)."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def register(sub) -> None:
    from ..plan.known import KNOWN_CONFIGS  # a plain dict, no heavy import

    p = sub.add_parser("plan", help="what recording and unlearning will cost, before anything runs",
                       description="Print the storage (bytes per checkpoint and for the window, trajectory log, "
                                   "exports) and the unlearning cost (exact replay and LMCleaner, in gradient-"
                                   "equivalents) of a training run, from its config alone. Nothing is trained or "
                                   "downloaded (except a hub model's config.json when reachable).",
                       epilog=EPILOG.format(known=", ".join(KNOWN_CONFIGS)),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model: preset, config JSON, local dir, known model or hub id "
                                   "(default: model.name_or_path of the config)")
    p.add_argument("--samples", type=int, help="training rows (default: training.num_samples, or counted from a "
                                               "local/embedded dataset)")
    p.add_argument("--age", type=int, nargs="+", help="request ages in steps before the end of training "
                                                      "(default: 1%%, 10%% and 50%% of the steps)")
    p.add_argument("--world-size", type=int, default=1, help="data-parallel processes (default 1)")
    p.add_argument("--seq-len", type=int, help="padded tokens per row (default: training.max_length)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--config", help="YAML file merged over the defaults (before the overrides)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for `lmcleaner train`")
    p.set_defaults(func=run)
    p.__class__ = _Intermixed


def _overrides(args) -> list[str]:
    from ..config.loader import available_presets

    out = []
    if args.model:
        out.append(f"model={args.model}" if args.model in available_presets("model")
                   else f"model.name_or_path={args.model}")
    return out + list(args.overrides)


def _samples(args, cfg) -> int:
    if args.samples is not None:
        if args.samples < 1:
            raise ValueError(f"--samples={args.samples}: give the number of training rows (>= 1)")
        return args.samples
    t = cfg.training
    from pathlib import Path

    if t.dataset_name.startswith("embedded") or Path(t.dataset_name).exists():
        from ..data.dataset import load_records

        n = len(load_records(t.dataset_name, t.dataset_split, t.dataset_subset))
        return min(n, t.num_samples) if t.num_samples else n
    if t.num_samples:
        return int(t.num_samples)
    raise ValueError(f"cannot count the rows of {t.dataset_name!r} here: give --samples N")


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_table(plan: dict) -> str:
    m, r, s = plan["model"], plan["run"], plan["storage"]
    lines = [
        f"lmcleaner plan: {m['name']}  [{m['source']}]",
        f"  {m['architecture']}: {m['parameters']:,} parameters"
        + (f" ({m['active_parameters']:,} active: top-{m['top_k']} of {m['experts']} experts)" if m["experts"] else "")
        + f"; trained: {m['trainable_parameters']:,} in {m['trainable_tensors']} tensors"
        + (f" (LoRA r={r['lora_r']})" if r["lora_r"] else "") + f"; weights {m['param_dtype']}; {r['optimizer']}",
        (f"  run: {r['samples']:,} samples, global batch {r['global_batch']} ({r['batch_size']} x "
         f"{r['gradient_accumulation_steps']} accumulation x {r['world_size']} ranks), {r['steps']:,} steps "
         f"({r['epochs']:.2f} epochs), {r['seq_len']} tokens/row"),
        (f"  recorder: storage={r['storage']}, window {r['window']:,} steps, checkpoint every "
         f"{r['checkpoint_interval']} steps"),
        "",
        "storage (1 kB = 1000 B)",
    ]
    ck, log = s["checkpoint"], s["log"]
    rows = [("one checkpoint: weights", ck["weights"]), ("one checkpoint: optimizer state", ck["optimizer"]),
            ("one checkpoint: json, rng, schedule", ck["other"]), ("one checkpoint", ck["total"]),
            (f"checkpoints kept at the end ({len(s['checkpoints_kept'])})", s["checkpoints_total"]),
            ("trajectory log per step", log["per_step"]["total"]),
            (f"trajectory log, retained {log['retained_steps']:,} steps", log["total"]),
            ("final model (merged)", s["export"]["merged_model"])]
    if "adapter" in s["export"]:
        rows.append(("unlearned adapter (unlearn.export=adapter)", s["export"]["adapter"]))
    rows.append(("total on disk at the end", s["total"]))
    width = max(len(k) for k, _ in rows) + 2
    lines += [f"  {k:<{width}}{human(v):>10}" for k, v in rows]
    lines += ["", ("unlearning one sample used once, `age` steps before the end (gradient-equivalents, "
                   "1 = one training step)")]
    head = f"  {'age':>7} {'step':>7} {'restore':>8} {'replay':>9} {'LMCleaner':>10}  {'ratio':>6}  detail"
    lines.append(head)
    for q in plan["requests"]:
        if "error" in q:
            lines.append(f"  {q['age']:>7} {'':>7} {q['error']}")
        elif not q["in_window"]:
            lines.append(f"  {q['age']:>7} {q['step']:>7} {q['note']}")
        else:
            lm = q["lmcleaner"]
            lines.append(f"  {q['age']:>7} {q['step']:>7} {q['restored_from']:>8} {q['replay']['grad_equivalents']:>9.0f} "
                         f"{lm['grad_equivalents']:>10.0f}  {q['lmcleaner_over_replay']:>6.2f}  K={lm['K']} "
                         f"{lm['hessian_mode']}: {lm['recovery_steps']} replayed + 1 + {lm['hvp_directions']} HVPs x "
                         f"{lm['hvp_cost_in_grads']} + {lm['error_probe_steps']} probe; {q['regime']}")
    lines += ["", f"  one gradient-equivalent ~ {plan['flops_per_grad_equivalent']:.3g} FLOPs (estimate)"]
    lines += [f"  note: {n}" for n in plan["notes"]]
    return "\n".join(lines)


def run(args) -> int:
    from ..config import load_config
    from .estimate import make_plan
    from .shapes import model_shape

    cfg = load_config(args.config, _overrides(args))
    samples = _samples(args, cfg)
    if args.world_size < 1:
        raise ValueError(f"--world-size={args.world_size}: use at least 1 process")
    shape = model_shape(cfg.model, cfg.lora)
    plan = make_plan(cfg, shape, samples, args.age, args.world_size, args.seq_len)
    print(json.dumps(plan, indent=2) if args.json else format_table(plan))
    return 0
