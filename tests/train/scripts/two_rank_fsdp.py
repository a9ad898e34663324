"""Run under `torchrun --nproc_per_node 2`: FSDP2 on two CPU ranks (gloo), everything in one launch.

1. `a`: a recorded FSDP run (sharded checkpoints, gathered final export);
2. `b`: the same run resumed from a copy of a's mid-run sharded checkpoint;
3. `ddp`: the same run with DDP, for comparison;
4. the FSDP log unlearned under torchrun: `lmcleaner unlearn trainer=replay` and
   `trainer=LMCleanerSample`, and the exact retrain `lmcleaner retrain`;
5. `online`: run a again with a deletion request (queued on rank 1 only) applied online by replay;
6. the error for a recorder storage mode FSDP cannot feed.
Rank 0 writes result.json (losses and accelerator type of each run, exit codes, the error).
"""

import json
import shutil
import sys
from pathlib import Path

from accelerate import Accelerator

from lmcleaner.cli.main import main
from lmcleaner.config import load_config
from lmcleaner.train import Trainer, TrainingError
from lmcleaner.unlearn.online import OnlineUnlearner
from tests.unlearn.scripts.cli_unlearn import unlearn_with_cli

out, resume_at, forget, *overrides = sys.argv[1:]
out = Path(out)
acc = Accelerator(cpu=True)


def train(name: str, *extra: str, request_at: int | None = None) -> tuple[list[float], str]:
    cfg = load_config(overrides=[*overrides, *extra, f"training.output_dir={out / name}"])
    trainer = Trainer(cfg, online_unlearner=OnlineUnlearner("replay"))
    assert trainer.accelerator.num_processes == 2
    if request_at is not None:
        real = trainer._apply_requests

        def hook():
            if trainer.accelerator.process_index == 1 and trainer.state.step == request_at:
                trainer.request_forget([int(i) for i in forget.split(",")], request_id="r1")
            real()

        trainer._apply_requests = hook
    state = trainer.train()
    return [h["loss"] for h in state.history], str(trainer.accelerator.distributed_type)


losses, kinds = {}, {}
losses["a"], kinds["a"] = train("a", "training.distributed_strategy=fsdp")
if acc.is_main_process:
    shutil.copytree(out / "a" / f"checkpoint-{resume_at}", out / "b" / f"checkpoint-{resume_at}")
acc.wait_for_everyone()
losses["b"], kinds["b"] = train("b", "training.distributed_strategy=fsdp", "training.resume_from_checkpoint=latest")
losses["ddp"], kinds["ddp"] = train("ddp", "training.distributed_strategy=ddp")

codes = unlearn_with_cli(out / "a", forget, out)
codes["retrain"] = main(["retrain", f"unlearn.model_dir={out / 'a'}", f"unlearn.forget={forget}",
                         f"unlearn.output_dir={out / 'retrain'}"])
losses["online"], kinds["online"] = train("online", "training.distributed_strategy=fsdp", request_at=4)
try:
    train("heavy", "training.distributed_strategy=fsdp", "training_logger.storage=heavy")
    error = None
except TrainingError as err:
    error = str(err)
if acc.is_main_process:
    (out / "result.json").write_text(json.dumps({"losses": losses, "kinds": kinds, "codes": codes, "error": error}))
