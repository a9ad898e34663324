"""Run under `torchrun --nproc_per_node 2`: trains and dumps losses + weights (rank 0)."""

import json
import sys

from accelerate import Accelerator
from safetensors.torch import save_file

from lmcleaner.config import load_config
from lmcleaner.train import Trainer

out_dir, *overrides = sys.argv[1:]
acc = Accelerator(cpu=True)
cfg = load_config(overrides=overrides + [f"training.output_dir={out_dir}/run"])
trainer = Trainer(cfg, accelerator=acc)
state = trainer.train()
if acc.is_main_process:
    with open(f"{out_dir}/result.json", "w") as f:
        json.dump({"distributed_type": str(acc.distributed_type), "num_processes": acc.num_processes,
                   "losses": [h["loss"] for h in state.history]}, f)
    save_file({k: v.detach().clone() for k, v in trainer.engine.trainable().items()}, f"{out_dir}/weights.safetensors")
