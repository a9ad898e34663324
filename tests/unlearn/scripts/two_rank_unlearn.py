"""Run under `torchrun --nproc_per_node 2`: everything the two-rank unlearning tests check, in one launch.

1. trains a recorded run on two ranks (DDP);
2. unlearns it with the command line, as a user would under torchrun:
   `lmcleaner unlearn trainer=replay` and `trainer=LMCleanerSample` (data-parallel), and the
   default method (`auto`) on a requests file;
3. trains a second two-rank run where a deletion request reaches rank 1 only (the Python API)
   before step AT and is applied online by exact replay; every rank dumps its final weights.
"""

import json
import sys
from pathlib import Path

from accelerate import Accelerator
from safetensors.torch import save_file

from lmcleaner.cli.main import main
from lmcleaner.config import load_config
from lmcleaner.train import Trainer
from lmcleaner.unlearn.online import OnlineUnlearner
from tests.unlearn.scripts.cli_unlearn import unlearn_with_cli

out, forget, at, *overrides = sys.argv[1:]
acc = Accelerator(cpu=True)
rank = acc.process_index

# 1. the recorded run
Trainer(load_config(overrides=[*overrides, f"training.output_dir={out}/run"]), accelerator=acc).train()

# 2. the command line under torchrun (each call builds its own engine from the log)
codes = unlearn_with_cli(Path(out) / "run", forget, Path(out))
# ... and the default method (auto) answering a requests file, one request per forgotten id
requests = Path(out) / f"requests-rank{rank}.jsonl"
requests.write_text("".join(json.dumps({"request_id": f"r{k}", "ids": [int(i)]}) + "\n"
                            for k, i in enumerate(forget.split(","))))
codes["auto_requests"] = main(["unlearn", f"unlearn.model_dir={out}/run", f"unlearn.requests={requests}",
                               f"unlearn.output_dir={out}/auto"])

# 3. an online request that only rank 1 receives
trainer = Trainer(load_config(overrides=[*overrides, f"training.output_dir={out}/online"]), accelerator=acc,
                  online_unlearner=OnlineUnlearner("replay"))
real = trainer._apply_requests


def hook():
    if rank == 1 and trainer.state.step == int(at) and not trainer.state.processed_requests:
        trainer.request_forget([int(i) for i in forget.split(",")], request_id="r1")
    real()


trainer._apply_requests = hook
state = trainer.train()
save_file({n: p.detach().clone() for n, p in trainer.engine.trainable().items()}, f"{out}/online-rank{rank}.safetensors")
with open(f"{out}/result-rank{rank}.json", "w") as f:
    json.dump({"codes": codes, "distributed_type": str(acc.distributed_type), "num_processes": acc.num_processes,
               "events": state.unlearn_events, "excluded": sorted(state.excluded)}, f)
