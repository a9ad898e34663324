"""Child process: ``lmcleaner unlearn`` that SIGKILLs itself at the rename of its result.

usage: python unlearn_killed_at_rename.py MODE ARG [ARG ...]
MODE ``commit``: killed just before the temporary result is renamed into place;
MODE ``swap``: (with unlearn.overwrite=true) killed after the old result was moved
aside and before the new one is renamed in, the worst moment of a replacement.
"""

import os
import signal
import sys
from pathlib import Path

from lmcleaner.cli.main import main
from lmcleaner.train import outputs

mode, args = sys.argv[1], sys.argv[2:]
real_replace = os.replace
dir_renames = []


def replace(src, dst, *a, **k):
    if Path(src).is_dir() and outputs.TMP_PATTERN.match(Path(src).name) or Path(dst).name.endswith(f".old-{os.getpid()}"):
        dir_renames.append((src, dst))
        if mode == "commit" or (mode == "swap" and len(dir_renames) == 2):
            print(f"KILLED {src}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *a, **k)


outputs.os.replace = replace
sys.exit(main(["unlearn", *args]))
