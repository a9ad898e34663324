"""Online deletion requests: does continued training grow or shrink the error of a correction?

A run trains; at step ``--at`` a request arrives for samples used shortly before
(``--used``); the online unlearner corrects the live model and optimizer state,
excludes the ids, and training continues to ``--steps``. The exact answer at
every step is the run that never saw the samples (retraining with them
excluded, its checkpoints give ``theta_re`` right after the request and at the
end). Reported per method: relative parameter error right after the
correction and at the end, and the norm of the final parameters.

Online, a correction flagged by its own estimate (``>= 1``) or by the divergence
guard falls back to exact replay before it reaches the live model
(``fell_back_to_replay``). ``LMCleanerSampleLevel`` online replays the last steps before the request
exactly from its corrected state (``tail``, automatic online: the momentum
horizon, at most the steps since the last use); ``tail=0`` is the plain linear
propagation. Control rows split the plain propagation's residual (``SPLITS``): ``exact params
+ LMC state`` loads replay's parameters with LMCleaner's optimizer state, ``LMC
params + exact state`` the reverse, and further rows take AdamW's ``m`` or ``v``
alone from replay, or leave the state uncorrected. Which of them grows under
continued training says which part of a correction carries the growth. The
``auto`` row is ``training.online_unlearning.method=auto``: ``chosen`` is its
answer, ``grad_equivalents`` what it cost.

    python benchmarks/online.py --optimizer adamw --lr 1e-3 --json bench_out/online_adamw.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lmcleaner.config import load_config
from lmcleaner.evaluate import format_table
from lmcleaner.train import Trainer
from lmcleaner.train.checkpoint import load_params
from lmcleaner.unlearn.online import OnlineUnlearner

METHODS = [("replay", {}), ("LMCleanerSampleLevel", {}), ("LMCleanerSampleLevel", {"tail": 0}),
           ("LMCleanerSampleLevel", {"K": 10}),
           ("LMCleanerSampleLevel", {"propagation": "replay", "K": 10, "carry": "momentum"}), ("rollback", {}),
           ("auto", {})]
# Controls that split an approximate correction's residual. Each takes the parameters and each
# optimizer-state tensor (AdamW m = exp_avg, v = exp_avg_sq; SGD momentum_buffer) from one source:
# "exact" (replay), "lmc" (LMCleaner's full-window correction) or "recorded" (the state of the
# run that saw the samples, uncorrected)
SPLITS = [("exact params + LMC state", {"params": "exact", "state": "lmc"}),
          ("LMC params + exact state", {"params": "lmc", "state": "exact"}),
          ("LMC params + recorded state", {"params": "lmc", "state": "recorded"}),
          ("LMC params + exact m + LMC v", {"params": "lmc", "state": "lmc", "exp_avg": "exact"}),
          ("LMC params + LMC m + exact v", {"params": "lmc", "state": "lmc", "exp_avg_sq": "exact"})]


class SplitCorrection(OnlineUnlearner):
    """Loads a correction assembled from parts of exact replay's result, LMCleaner's full-window
    correction and the uncorrected state: which part of the residual does continued training grow?"""

    def __init__(self, sources: dict[str, str]) -> None:
        super().__init__("replay")
        self.sources = sources

    def compute(self, session, ids):
        exact = session.run("replay", ids)
        approx = session.run("LMCleanerSampleLevel", ids, tail=0)
        recorded = session.replayer.state_at(session.tau)[1]
        states = {"exact": exact.opt_state, "lmc": approx.opt_state, "recorded": recorded}
        exact.params = approx.params if self.sources["params"] == "lmc" else exact.params
        default = states[self.sources["state"]]
        exact.opt_state = {n: {k: (states[self.sources[k]][n][k] if k in self.sources else v)
                               for k, v in st.items()} for n, st in default.items()}
        return exact


def params(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.engine.trainable().items()}


def rel(a, b, ref) -> float:
    num = sum(float(((a[n].double() - ref[n].double()) ** 2).sum()) for n in ref) ** 0.5
    den = sum(float(((b[n].double() - ref[n].double()) ** 2).sum()) for n in ref) ** 0.5
    return num / den if den > 0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    ap.add_argument("--lr", type=float, default=None, help="default 1e-3 (adamw) / 0.02 (sgd)")
    ap.add_argument("--init", choices=["pretrained", "scratch"], default="scratch")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--at", type=int, default=150)
    ap.add_argument("--used", default="135,145", help="steps whose batches hold the forgotten samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--C", type=int, default=25)
    ap.add_argument("--json", default="bench_out/online.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lr = args.lr or (1e-3 if args.optimizer == "adamw" else 0.02)
    rows_n = args.steps * 8
    base = ["model=tiny-llama", f"training.optimizer={args.optimizer}", f"training.learning_rate={lr}",
            f"training.max_steps={args.steps}", f"training.num_samples={rows_n}",
            f"training.dataset_name=embedded:{rows_n // 8}", f"training.seed={args.seed}", "training.max_grad_norm=0",
            "training.progress_bar=false", "training.logging_steps=0", "training.torch_threads=1",
            f"training_logger.checkpoint_interval={args.C}", f"training_logger.max_steps={args.steps}"]
    if args.init == "pretrained":
        base += ["model.name_or_path=base:tiny-llama", "model.tokenizer=embedded"]
    out_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        probe = Trainer(load_config(overrides=[*base, f"training.output_dir={tmp / 'probe'}"]))
        ids = sorted(probe.plan.micro_batches(int(s))[0][0] for s in args.used.split(","))
        del probe
        oracle_run = Trainer(load_config(overrides=[*base, f"training.output_dir={tmp / 'oracle'}",
                                                    f"training.exclude_ids={ids}", f"training.save_steps={args.at}",
                                                    "training_logger.enabled=false"]))
        oracle_run.train()
        oracle_end = params(oracle_run)
        oracle_at = load_params(tmp / "oracle" / f"checkpoint-{args.at}")
        original = Trainer(load_config(overrides=[*base, f"training.output_dir={tmp / 'original'}",
                                                  f"training.save_steps={args.at}", "training_logger.enabled=false"]))
        original.train()
        original_end = params(original)
        original_at = load_params(tmp / "original" / f"checkpoint-{args.at}")
        runs = [(m, kw, OnlineUnlearner(m, **kw), None) for m, kw in METHODS]
        runs += [("split", {}, SplitCorrection(sources), label) for label, sources in SPLITS]
        for k, (method, kw, unlearner, label) in enumerate(runs):
            trainer = Trainer(load_config(overrides=[*base, f"training.output_dir={tmp / f'm{k}'}"]))
            after: dict[str, torch.Tensor] = {}
            real = trainer._apply_requests

            def hook(trainer=trainer, real=real, after=after):
                if trainer.state.step == args.at and not trainer.state.processed_requests:
                    trainer.request_forget(ids, request_id="r1")
                    real()
                    after.update(params(trainer))
                else:
                    real()

            trainer._apply_requests = hook
            trainer.online_unlearner = unlearner
            t0 = time.perf_counter()
            trainer.train()
            end = params(trainer)
            name = label or (method if not kw else f"{method}({','.join(f'{a}={b}' for a, b in kw.items())})")
            event = trainer.state.unlearn_events[0] if trainer.state.unlearn_events else {}
            out_rows.append({"method": name, "error_after": rel(after, original_at, oracle_at),
                             "error_end": rel(end, original_end, oracle_end),
                             "estimated_error": event.get("estimated_error",
                                                          (event.get("fallback_from") or {}).get("estimated_error")),
                             "fell_back_to_replay": bool(event.get("fallback_from")),
                             "chosen": event.get("chosen"),  # auto's answer
                             "grad_equivalents": event.get("grad_equivalents_total"),
                             "param_norm_end": sum(float((v.double() ** 2).sum()) for v in end.values()) ** 0.5,
                             "seconds": time.perf_counter() - t0})
    out_rows.append({"method": "oracle", "error_after": 0.0, "error_end": 0.0,
                     "param_norm_end": sum(float((v.double() ** 2).sum()) for v in oracle_end.values()) ** 0.5})
    print(format_table(out_rows))
    print(f"optimizer={args.optimizer} lr={lr} init={args.init} request at {args.at} for {ids} used at {args.used}")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": vars(args), "ids": ids, "rows": out_rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
