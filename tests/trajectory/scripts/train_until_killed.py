"""Child process for the crash test: trains with the recorder and, after step STOP,
waits for the writer to finish its last flush, prints READY and sleeps until killed.

usage: python train_until_killed.py STOP override [override ...]
"""

import sys
import time
from pathlib import Path

from lmcleaner.config import load_config
from lmcleaner.train import Trainer
from lmcleaner.trajectory import TrainingLogger


class StopAndWait(TrainingLogger):
    def __init__(self, stop: int, *args):
        super().__init__(*args)
        self.stop = stop

    def on_step_end(self, engine, record, batches):
        super().on_step_end(engine, record, batches)
        if record.step == self.stop:
            last_flush = (self.stop + 1) // self.settings.save_interval * self.settings.save_interval - 1
            while self.writer.committed_step < last_flush:
                time.sleep(0.01)
            print(f"READY {self.writer.committed_step}", flush=True)
            time.sleep(600)


def main() -> None:
    stop, overrides = int(sys.argv[1]), sys.argv[2:]
    cfg = load_config(overrides=overrides)
    rec = StopAndWait(stop, cfg.training_logger, Path(cfg.training.output_dir) / "training_log")
    Trainer(cfg, recorder=rec).train()


if __name__ == "__main__":
    main()
