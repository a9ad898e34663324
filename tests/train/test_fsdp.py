"""FSDP2 (through Accelerate's plugin) on two CPU ranks over gloo.

One launch (``scripts/two_rank_fsdp.py``) trains a recorded FSDP run with sharded checkpoints,
resumes a copy of it from a mid-run checkpoint, trains the same run with DDP, unlearns the FSDP
log under torchrun (replay, LMCleaner, and the exact retrain), and runs it again with an online
deletion request.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmcleaner.train import Trainer
from lmcleaner.train.checkpoint import CheckpointError, file_sha256, load_params, verify_checkpoint
from lmcleaner.trajectory import TrajectoryLog
from lmcleaner.unlearn.session import UnlearnSession

from ..conftest import tiny_config, torchrun

SCRIPT = Path(__file__).parent / "scripts" / "two_rank_fsdp.py"
# accumulation exercises FSDP's no-sync micro-steps; clipping is active (global norm over shards)
RUN = ["model=micro-llama", "training.num_samples=32", "training.batch_size=2", "training.gradient_accumulation_steps=2",
       "training.max_steps=6", "training.warmup_steps=0", "training.max_grad_norm=0.05", "training.progress_bar=false",
       "training.logging_steps=0", "training.torch_threads=1", "training_logger.checkpoint_interval=3"]
RESUME_AT = 3
FORGET = [3, 17]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    torchrun(SCRIPT, [str(root), str(RESUME_AT), ",".join(map(str, FORGET)), *RUN], port=29551)
    return root


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    bad = [n for n in a if not torch.equal(a[n], b[n])]
    assert not bad, bad[:3]


def load_params_verified(path: Path, expected: dict[str, str]) -> dict[str, torch.Tensor]:
    verify_checkpoint(path, expected)  # what replay and unlearning do before reading a checkpoint
    return load_params(path)


def rel_error(x, oracle, original) -> float:
    def dist(a, b):
        return sum(float(((a[n] - b[n]).double() ** 2).sum()) for n in a) ** 0.5

    return dist(x, oracle) / dist(original, oracle)


@pytest.mark.slow
def test_fsdp_trains_sharded_and_resumes_bit_exact(root):
    result = json.loads((root / "result.json").read_text())
    assert result["kinds"] == {"a": "DistributedType.FSDP", "b": "DistributedType.FSDP",
                               "ddp": "DistributedType.MULTI_CPU", "online": "DistributedType.FSDP"}
    # resume checkpoints are per-rank safetensors parts + JSON: nothing gathered, nothing pickled
    ck = root / "a" / f"checkpoint-{RESUME_AT}"
    names = {p.name for p in ck.iterdir()}
    assert {"model-rank00000-of-00002.safetensors", "model-rank00001-of-00002.safetensors",
            "optimizer-rank00000-of-00002.safetensors", "sharding.json"} <= names
    assert all(n.endswith((".safetensors", ".json")) for n in names) and "model.safetensors" not in names
    part = load_file(str(ck / "model-rank00001-of-00002.safetensors"))
    assert part["lm_head.weight"].shape[0] == 1024 // 2  # a real shard
    # integrity: one checksums.json covers every rank's parts (each rank hashed its own), as the log recorded
    sums = json.loads((ck / "checksums.json").read_text())["files"]
    assert set(sums) == names - {"checksums.json"}
    assert all(sums[n] == file_sha256(ck / n) for n in sums)
    recorded = {p.step: p.files for p in TrajectoryLog(root / "a" / "training_log").all_restore_points}
    assert recorded[RESUME_AT] == sums
    leftovers = [p for p in root.rglob("*") if ".tmp-" in p.name or p.name.startswith(".sha256-rank")]
    assert not leftovers, leftovers
    flipped = root / "flipped"  # a bit flipped in rank 1's part is refused, naming the part
    shutil.copytree(ck, flipped)
    data = bytearray((flipped / "model-rank00001-of-00002.safetensors").read_bytes())
    data[-1] ^= 1
    (flipped / "model-rank00001-of-00002.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model-rank00001-of-00002.safetensors: sha256"):
        load_params_verified(flipped, recorded[RESUME_AT])
    # the resumed run is the uninterrupted one, bit for bit
    assert result["losses"]["b"] == result["losses"]["a"]
    final = weights(root / "a" / "final_model")  # gathered to rank 0 for export
    assert_equal(weights(root / "b" / "final_model"), final)
    # FSDP computes DDP's step: the same losses; weights equal up to the sharded gradient-norm summation
    assert result["losses"]["ddp"] == pytest.approx(result["losses"]["a"], rel=1e-6)
    ddp = weights(root / "ddp" / "final_model")
    for n in final:
        torch.testing.assert_close(final[n], ddp[n], rtol=1e-5, atol=1e-6)
    assert result["error"] and "storage=heavy" in result["error"] and "\n" not in result["error"]


@pytest.mark.slow
def test_fsdp_log_unlearned_under_torchrun_and_in_one_process(root):
    result = json.loads((root / "result.json").read_text())
    assert result["codes"] == {"replay": 0, "lmcleaner": 0, "retrain": 0}
    oracle = weights(root / "retrain" / "final_model")
    assert_equal(weights(root / "replay"), oracle)  # FSDP replay at the recorded world size = FSDP retrain
    original = weights(root / "a" / "final_model")
    two = weights(root / "lmcleaner")
    assert rel_error(two, oracle, original) < 0.5
    # one process reads the sharded checkpoints (parts joined) and replays the FSDP trajectory
    session = UnlearnSession(root / "a")
    assert session.log.meta["world_size"] == 2
    theta = session.replayer.state_at(session.tau)[0]
    for n in original:
        torch.testing.assert_close(theta[n], original[n], rtol=1e-5, atol=1e-6)
    one = session.run("LMCleanerSampleLevel", FORGET, K=800, hessian_mode="exact")
    # Same maths, other summation order: two micro-batches per rank are summed per rank first (the
    # recorded gradients, the data-parallel HVPs), and AdamW's m / sqrt(v) amplifies last-bit differences
    # on coordinates with v ~ 0 (measured: 1.3e-3 of the correction's norm, a few entries off by 2.5e-4).
    diff = sum(float(((two[n] - one.params[n]).double() ** 2).sum()) for n in two) ** 0.5
    assert diff < 1e-2 * one.info["correction_norm"]
    # the errors themselves are ~2e-3 (curvature at the midpoint): compare them to within 2e-4 absolute
    assert rel_error(one.params, oracle, original) == pytest.approx(rel_error(two, oracle, original), rel=0.02,
                                                                     abs=2e-4)


@pytest.mark.parametrize("override,match", [
    ("training.distributed_strategy=zero3", "distributed_strategy"),
    ("training.fsdp_sharding_strategy=NO_SHARD", "that is distributed_strategy=ddp"),
    ("training.fsdp_sharding_strategy=HYBRID_SHARD", "choose one of"),
])
def test_bad_strategy_is_a_one_line_error(tmp_path, override, match):
    with pytest.raises(ValueError, match=match) as err:  # ConfigError / DistributedConfigError
        Trainer(tiny_config(tmp_path, "training.distributed_strategy=fsdp", override))
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_online_request_under_fsdp_ends_at_the_retrain(root):
    """A request reaching rank 1 only, applied by replay before step 4 on sharded state, ends the
    run bit for bit at the exact retrain; the anchor after the correction is sharded too."""
    assert_equal(weights(root / "online" / "final_model"), weights(root / "retrain" / "final_model"))
    anchors = list((root / "online" / "training_log" / "anchors").iterdir())
    assert len(anchors) == 1 and (anchors[0] / "sharding.json").is_file()
    assert (anchors[0] / "model-rank00001-of-00002.safetensors").is_file()
