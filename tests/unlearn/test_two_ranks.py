"""Unlearning under torchrun (two real ranks over gloo), checked against one process.

One launch (``scripts/two_rank_unlearn.py``) trains a recorded two-rank run, unlearns it with
``lmcleaner unlearn`` on both ranks (replay, and LMCleaner computed data-parallel), and runs a
second two-rank training where an online deletion request reaches rank 1 only.

Why bit-identity with one process is expected: with one micro-batch per rank, DDP's averaged
all-reduce of the rank gradients (each scaled by the world size, an exact power of two) is
``g0 + g1``, the same sum one process forms by accumulating the two micro-batches; the
data-parallel unlearning sums are ``g0 + g1`` too (``unlearn.functional.DataParallel``).
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmcleaner.config import load_config
from lmcleaner.train import Trainer
from lmcleaner.train.loss import count_supervised
from lmcleaner.unlearn import FunctionalLM, make_hvp_backend
from lmcleaner.unlearn.functional import DataParallel, to_compute
from lmcleaner.unlearn.cli_retrain import retrain_config
from lmcleaner.unlearn.online import OnlineUnlearner
from lmcleaner.unlearn.session import UnlearnSession

from ..conftest import torchrun
from .unlearn_harness import TinyMLPLM, collate, make_dataset

SCRIPT = Path(__file__).parent / "scripts" / "two_rank_unlearn.py"
RUN = ["model=micro-llama", "training.num_samples=32", "training.batch_size=4", "training.max_steps=8",
       "training.warmup_steps=0", "training.progress_bar=false", "training.logging_steps=0",
       "training.torch_threads=1", "training_logger.checkpoint_interval=4"]
FORGET = [3, 17]
AT = 5  # the online request arrives before step 5


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two_rank_unlearn")
    torchrun(SCRIPT, [str(root), ",".join(map(str, FORGET)), str(AT), *RUN], port=29541)
    return root


@pytest.fixture(scope="module")
def session(root) -> UnlearnSession:
    return UnlearnSession(root / "run")  # one process, on the two-rank log


def result(root: Path, rank: int) -> dict:
    return json.loads((root / f"result-rank{rank}.json").read_text())


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    bad = [n for n in a if not torch.equal(a[n], b[n])]
    assert not bad, bad[:3]


@pytest.mark.slow
def test_replay_under_torchrun_is_bit_identical_to_one_process(root, session, tmp_path):
    for rank in (0, 1):
        r = result(root, rank)
        assert r["num_processes"] == 2 and "MULTI_CPU" in r["distributed_type"]
        assert r["codes"] == {"replay": 0, "lmcleaner": 0, "auto_requests": 0}
    assert session.log.meta["world_size"] == 2
    # the recorded two-rank trajectory replays bit for bit in one process ...
    trained = load_file(str(root / "run" / "final_model" / "model.safetensors"))
    assert_equal(session.replayer.state_at(session.tau)[0], trained)
    # ... and so does the counterfactual: torchrun's replay (recorded world size) equals one process's
    one = session.run("replay", FORGET)
    two = load_file(str(root / "replay" / "model.safetensors"))
    assert_equal(one.params, two)
    # the oracle in one process: the same global batch (accumulation 2), hence the same result
    oracle = Trainer(retrain_config(root / "run", FORGET, tmp_path / "retrain"))
    assert oracle.t.gradient_accumulation_steps == 2
    oracle.train()
    assert_equal({n: p.detach() for n, p in oracle.engine.trainable().items()}, two)
    assert not all(torch.equal(two[n], trained[n]) for n in trained)
    audit = json.loads((root / "replay" / "audit" / "audit_records.json").read_text())
    assert len(audit) == 1  # written once, by rank 0


@pytest.mark.slow
def test_auto_on_a_requests_file_under_torchrun(root, session):
    """The default method answering collected requests on two ranks: one joint result, written
    once, one audit record per request; it equals what one process computes."""
    audit = json.loads((root / "auto" / "audit" / "audit_records.json").read_text())
    assert [(r["request_id"], r["forget_ids"]) for r in audit] == [("r0", [FORGET[0]]), ("r1", [FORGET[1]])]
    assert all(r["joint_forget_ids"] == FORGET and r["method"] == "auto" for r in audit)
    two = load_file(str(root / "auto" / "model.safetensors"))
    one = session.run("auto", FORGET)
    assert one.info["chosen"] == audit[0]["chosen"]
    if one.info["chosen"] == "replay":  # exact: bit-identical across process counts
        assert_equal(one.params, two)
    else:
        for n in one.params:
            torch.testing.assert_close(two[n], one.params[n], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_lmcleaner_under_torchrun_matches_one_process(root, session):
    one = session.run("LMCleanerSampleLevel", FORGET, K=800, hessian_mode="exact")
    two = load_file(str(root / "lmcleaner" / "model.safetensors"))
    theta = session.replayer.state_at(session.tau)[0]
    for n in theta:  # the data-parallel injections and HVPs are one process's up to summation order
        torch.testing.assert_close(two[n], one.params[n], rtol=1e-5, atol=1e-7)
    delta = sum(float((two[n] - theta[n]).norm() ** 2) for n in theta) ** 0.5
    assert delta > 0.5 * one.info["correction_norm"] > 0
    audit = json.loads((root / "lmcleaner" / "audit" / "audit_records.json").read_text())
    assert len(audit) == 1 and audit[0]["method"] == "LMCleanerSampleLevel" and not audit[0]["diverged"]


@pytest.mark.slow
def test_online_request_reaching_one_rank_is_applied_by_all(root, tmp_path):
    for rank in (0, 1):  # rank 1 received it; both applied it before step AT
        r = result(root, rank)
        assert [e["step"] for e in r["events"]] == [AT] and r["events"][0]["ids"] == FORGET
        assert set(FORGET) <= set(r["excluded"])
    w0 = load_file(str(root / "online-rank0.safetensors"))
    assert_equal(w0, load_file(str(root / "online-rank1.safetensors")))
    # one process, same global batch (two accumulated micro-batches), same request: bit for bit
    trainer = Trainer(load_config(overrides=[*RUN, "training.gradient_accumulation_steps=2",
                                             f"training.output_dir={tmp_path / 'online'}"]),
                      online_unlearner=OnlineUnlearner("replay"))
    real = trainer._apply_requests

    def hook():
        if trainer.state.step == AT and not trainer.state.processed_requests:
            trainer.request_forget(FORGET, request_id="r1")
        real()

    trainer._apply_requests = hook
    trainer.train()
    assert_equal({n: p.detach() for n, p in trainer.engine.trainable().items()}, w0)


class _Rank(DataParallel):
    """One of two simulated ranks: its reduction is the identity, the test adds the ranks' outputs."""

    def sum(self, parts):
        return parts


@pytest.mark.parametrize("mode", ["exact", "GGN"])
def test_data_parallel_shares_add_up_to_one_process(mode):
    """What each rank evaluates (its share of the micro-batches) and reduces gives one process's
    gradient and curvature products; the normaliser is applied once, after the reduction."""
    torch.manual_seed(0)
    model = TinyMLPLM()
    data = make_dataset(8)
    batches = [collate(data, [0, 1]), collate(data, [2, 3, 4]), collate(data, [5, 6])]
    n = sum(count_supervised(b["labels"]) for b in batches)
    names = [k for k, _ in model.named_parameters()]
    params = to_compute(dict(model.named_parameters()))
    vectors = {k: torch.randn(2, *p.shape) for k, p in params.items()}
    one = FunctionalLM(model, names, dp=DataParallel())
    ranks = [FunctionalLM(model, names, dp=_Rank(r, 2)) for r in (0, 1)]
    assert [len(fl.dp.share(batches)) for fl in ranks] == [2, 1]  # the trainer's rank::world_size split
    grads = [fl.grad_nll_sum(params, batches) for fl in ranks]
    hvps = [make_hvp_backend(mode, fl).hvp(params, batches, n, vectors) for fl in ranks]
    ref_g = one.grad_nll_sum(params, batches)
    ref_h = make_hvp_backend(mode, one).hvp(params, batches, n, vectors)
    for k in names:
        torch.testing.assert_close(grads[0][k] + grads[1][k], ref_g[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hvps[0][k] + hvps[1][k], ref_h[k], rtol=1e-5, atol=1e-6)


def test_other_world_sizes_keep_the_recorded_global_batch():
    from types import SimpleNamespace

    from lmcleaner.train.distributed import DistributedConfigError, same_global_batch

    t = SimpleNamespace(gradient_accumulation_steps=2)
    same_global_batch(t, recorded_world_size=2, world_size=1)
    assert t.gradient_accumulation_steps == 4  # 2 ranks x 2 micro-steps = 4 micro-steps in one process
    t = SimpleNamespace(gradient_accumulation_steps=1)
    with pytest.raises(DistributedConfigError, match="--nproc_per_node 2") as err:
        same_global_batch(t, recorded_world_size=2, world_size=4)  # would leave two ranks without a batch
    assert "\n" not in str(err.value)
