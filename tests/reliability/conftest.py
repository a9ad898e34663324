"""Shared pieces of the reliability tests (issue 10): one tiny recorded run, copies of it to
damage, a one-line CLI runner, tree hashes, crafted inputs and tmpfs mounts.

Every test that expects a failure checks the same contract: exit status 2, exactly one
line on stderr naming the problem, nothing written, the source bytes unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmcleaner.cli.main import main

# micro-llama, 48 samples, batch 4 (12 steps per epoch), 24 steps, checkpoints every 8 steps.
RUN = ["model=micro-llama", "training.num_samples=48", "training.batch_size=4", "training.max_steps=24",
       "training.progress_bar=false", "training.logging_steps=0", "training.torch_threads=1",
       "training.optimizer=adamw", "training.learning_rate=3e-3", "training.max_grad_norm=0.5",
       "training_logger.checkpoint_interval=8", "training_logger.save_interval=4"]
FORGET = "3,17"  # used at steps 8, 11, 14, 16: replay restores checkpoint-8
REPO_SRC = Path(__file__).resolve().parents[2] / "src"


def tree_hash(root: Path, skip: tuple[str, ...] = ()) -> str:
    """Names and bytes of everything under ``root`` (directories included: an empty one is a write)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if any(rel.startswith(s) for s in skip):
            continue
        h.update(rel.encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    c = capsys.readouterr()
    return rc, c.out, c.err


def assert_one_line_error(rc: int, out: str, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err[-2000:])
    assert len(lines) == 1, err[-3000:]
    assert out.strip() == "", out[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO_SRC), *sys.path])}


@pytest.fixture(scope="session")
def base_run(tmp_path_factory) -> Path:
    """A finished recorded run; never modified (tests copy it before damaging anything)."""
    root = tmp_path_factory.mktemp("base")
    n = torch.get_num_threads()
    try:
        assert main(["train", *RUN, f"training.output_dir={root / 'run'}"]) == 0
    finally:
        torch.set_num_threads(n)
    return root / "run"


@pytest.fixture
def run_copy(base_run, tmp_path) -> Path:
    dst = tmp_path / "src" / "run"
    shutil.copytree(base_run, dst)
    return dst


def edit_json(path: Path, fn) -> None:
    """Apply ``fn`` to the parsed document in place and write it back."""
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def rehash_checkpoint(run: Path, step: int) -> None:
    """What a hostile sender would do after swapping files: make checksums.json and the
    log's recorded hashes agree with the new bytes, so only the loader can catch them."""
    from lmcleaner.train.checkpoint import CHECKSUMS, file_sha256

    ck = run / f"checkpoint-{step}"
    files = {p.name: file_sha256(p) for p in ck.iterdir() if p.is_file() and p.name != CHECKSUMS}
    (ck / CHECKSUMS).write_text(json.dumps({"algorithm": "sha256", "files": files}))

    def fix(doc):
        for rp in doc["restore_points"]:
            if rp["step"] == step and rp["kind"] == "checkpoint":
                rp["files"] = files

    edit_json(run / "training_log" / "checkpoints.json", fix)


def safetensors_claiming(size_bytes: int) -> bytes:
    """A safetensors header describing one tensor of ``size_bytes`` that is not there."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [size_bytes], "data_offsets": [0, size_bytes]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 16


def safetensors_header_length(n: int) -> bytes:
    return struct.pack("<Q", n) + b'{"w":' + b"\0" * 64


def write_evil_model(directory: Path, marker: Path) -> Path:
    """A model directory whose config maps classes to its own Python file, which creates
    ``marker`` when imported: loading it must never happen without --trust-remote-code."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    (directory / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('code ran')\n"
        "from transformers import PretrainedConfig, PreTrainedModel\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
        "class EvilModel(PreTrainedModel):\n    config_class = EvilConfig\n")
    return directory


@contextlib.contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False):
    """A small tmpfs at ``path`` (skips the test where mounting is not permitted)."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(r.stderr or r.stdout).strip()[:120]})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, size: str) -> None:
    r = subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot resize the tmpfs ({r.stderr.strip()[:120]})")
