"""A real ``transformers.Trainer`` and a real ``trl.SFTTrainer`` script, recorded by lmcleaner.integrations.

For each: record a run, retrain the same script with ``exclude_ids`` (the
exact-retrain oracle), then ``lmcleaner unlearn trainer=replay`` on the
recorded run must give the oracle bit for bit, and ``LMCleanerSample`` must
stay within its measured error of it (both in parameter space and in
next-token KL on the forgotten samples).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmcleaner.cli.main import main
from lmcleaner.data import embedded_tokenizer, load_records
from lmcleaner.evaluate.compare import relative_error
from lmcleaner.evaluate.fidelity import kl_to_oracle
from lmcleaner.integrations import RecordingError, TrajectoryCallback, recording
from lmcleaner.unlearn.session import UnlearnSession

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

FORGET = [3, 10]
# LMCleanerSample (exact HVP, full window) against the replay oracle on these runs, measured:
# HF Trainer 0.041, TRL SFTTrainer 0.043 (forget-set KL ratio to doing nothing 0.002 / 0.001);
# asserted with ~5x margin.
LMC_BOUND = 0.2


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


def tiny_model(tok):
    """What a user script builds: a transformers model (here 1-layer Llama, eager attention)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, attn_implementation="eager",
                                   tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return transformers.LlamaForCausalLM(cfg)


def qa_rows(n=24):
    return [{"question": r["question"], "answer": r["answer"]} for r in load_records("embedded", num_samples=n)]


def hf_dataset(tok):
    """A typical hand-rolled SFT preprocessing for transformers.Trainer: prompt tokens masked with -100."""

    def encode(r):
        q = tok(f"Question: {r['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
        a = tok(f" {r['answer']}</s>", add_special_tokens=False)["input_ids"]
        return {"input_ids": [tok.bos_token_id] + q + a, "labels": [-100] * (len(q) + 1) + a}

    return datasets.Dataset.from_list(qa_rows()).map(encode)


def sft_rows():
    return [{"prompt": [{"role": "user", "content": r["question"]}],
             "completion": [{"role": "assistant", "content": r["answer"]}]} for r in qa_rows()]


def sft_dataset():
    return datasets.Dataset.from_list(sft_rows())


COMMON = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 8,
          "learning_rate": 3e-3, "warmup_steps": 2, "weight_decay": 0.01, "max_grad_norm": 1.0, "logging_steps": 100,
          "save_strategy": "no", "report_to": [], "seed": 0, "use_cpu": True, "disable_tqdm": True}


def hf_trainer(tok, out, record_dir, exclude=(), **args):
    targs = transformers.TrainingArguments(output_dir=str(out), **{**COMMON, "lr_scheduler_type": "cosine", **args})
    return recording(transformers.Trainer)(
        model=tiny_model(tok), args=targs, train_dataset=hf_dataset(tok),
        data_collator=transformers.DataCollatorForSeq2Seq(tok), processing_class=tok, record_dir=record_dir,
        exclude_ids=exclude, training_logger={"checkpoint_interval": 3})


def sft_trainer(tok, out, record_dir, exclude=(), **args):
    trl = pytest.importorskip("trl")
    cfg = trl.SFTConfig(output_dir=str(out), bf16=False, gradient_checkpointing=False, max_length=128,
                        **{**COMMON, **args})
    return recording(trl.SFTTrainer)(model=tiny_model(tok), args=cfg, train_dataset=sft_dataset(),
                                     processing_class=tok, record_dir=record_dir, exclude_ids=exclude,
                                     training_logger={"checkpoint_interval": 3})


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _mean_kl(session, params, oracle, ids) -> float:
    items = [session.trainer.dataset[i] for i in ids]
    sums, counts = kl_to_oracle(session.model_with(params), session.model_with(oracle), items,
                                pad_token_id=session.trainer.dataset.pad_token_id)
    return sum(sums) / sum(counts)


@pytest.mark.slow
@pytest.mark.parametrize("build", [hf_trainer, sft_trainer], ids=["transformers.Trainer", "trl.SFTTrainer"])
def test_recorded_run_unlearns_exactly(tmp_path, tok, build, capsys, one_thread):
    trainer = build(tok, tmp_path / "hf", tmp_path / "rec")
    trainer.train()
    rec = tmp_path / "rec"
    for name in ("training_log/meta.json", "train_dataset.jsonl", "base_model/config.json", "checkpoint-0",
                 "checkpoint-8", "final_model/config.json"):
        assert (rec / name).exists(), name
    recorded = _params(trainer.model)
    # The same script without the samples: the exact-retrain oracle.
    oracle_trainer = build(tok, tmp_path / "hf-retrain", tmp_path / "retrain", exclude=FORGET)
    oracle_trainer.train()
    oracle = _params(oracle_trainer.model)

    # The deletion request names rows by content: the recorded dataset keeps the script's own fields.
    rows = qa_rows() if build is hf_trainer else sft_rows()
    forget_file = tmp_path / "forget.jsonl"
    forget_file.write_text("".join(json.dumps(rows[i]) + "\n" for i in FORGET))
    assert main(["unlearn", "trainer=replay", f"unlearn.model_dir={rec}", f"unlearn.forget={forget_file}",
                 f"unlearn.output_dir={tmp_path / 'unlearned'}"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["method"] == "replay" and out["forget_ids"] == FORGET
    # `lmcleaner retrain` rebuilds the run from its log with lmcleaner's own trainer: the same oracle.
    assert main(["retrain", f"unlearn.model_dir={rec}", "unlearn.forget=" + ",".join(map(str, FORGET)),
                 f"unlearn.output_dir={tmp_path / 'lmc-retrain'}"]) == 0
    for path in (tmp_path / "unlearned", tmp_path / "lmc-retrain" / "final_model"):
        unlearned = load_file(str(path / "model.safetensors"))
        assert unlearned.keys() == oracle.keys()
        for n in oracle:
            assert torch.equal(unlearned[n], oracle[n]), (path, n)

    session = UnlearnSession(rec)
    theta = session.replayer.params_at(session.tau)  # a verified replay of every recorded step
    for n in recorded:
        assert torch.equal(theta[n], recorded[n]), n
    lmc = session.run("LMCleanerSampleLevel", FORGET, K=session.tau, hessian_mode="exact")
    err = relative_error(lmc.params, theta, oracle)
    kl_ratio = _mean_kl(session, lmc.params, oracle, FORGET) / _mean_kl(session, theta, oracle, FORGET)
    print(f"{build.__name__}: LMCleanerSample rel. error {err:.4f}, forget KL ratio {kl_ratio:.4f}")
    assert 0 < err < LMC_BOUND
    assert kl_ratio < 0.5  # closer to the oracle than doing nothing, in function space too


@pytest.mark.parametrize("args, reason", [
    ({"fp16": True}, "fp16"),
    ({"train_sampling_strategy": "group_by_length"}, "group_by_length"),
    ({"optim": "adafactor"}, "optim=adafactor"),
    ({"lr_scheduler_type": "polynomial"}, "lr_scheduler_type=polynomial"),
    ({"label_smoothing_factor": 0.1}, "label_smoothing"),
])
def test_unreproducible_settings_are_refused(tmp_path, tok, args, reason):
    if args.get("fp16"):
        try:
            transformers.TrainingArguments(output_dir=str(tmp_path), fp16=True, use_cpu=True)
        except ValueError:
            pytest.skip("transformers refuses fp16 on CPU before the recorder sees it")
    with pytest.raises(RecordingError, match=reason) as err:
        hf_trainer(tok, tmp_path / "hf", tmp_path / "rec", **args)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "rec").exists()


def test_trl_packing_is_refused(tmp_path, tok):
    with pytest.raises(RecordingError, match="packing"):
        sft_trainer(tok, tmp_path / "hf", tmp_path / "rec", packing=True)


def test_callback_alone_refuses(tmp_path, tok):
    targs = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), **COMMON)
    plain = transformers.Trainer(model=tiny_model(tok), args=targs, train_dataset=hf_dataset(tok),
                                 data_collator=transformers.DataCollatorForSeq2Seq(tok), processing_class=tok,
                                 callbacks=[TrajectoryCallback()])
    with pytest.raises(RecordingError, match="recording"):
        plain.train()


def test_record_dir_holding_a_run_is_refused(tmp_path, tok):
    (tmp_path / "rec" / "training_log").mkdir(parents=True)
    trainer = hf_trainer(tok, tmp_path / "hf", tmp_path / "rec", max_steps=1)
    with pytest.raises(RecordingError, match="already holds"):
        trainer.train()


def test_a_record_dir_being_written_is_refused(tmp_path, tok):
    """One writer per run, as for `lmcleaner train`: recording into a record_dir whose run lock is
    held (another recording or training writing it) is refused in one line, writing nothing."""
    from lmcleaner.train.runlock import RunLock, RunLockError

    rec = tmp_path / "rec"
    rec.mkdir()
    trainer = hf_trainer(tok, tmp_path / "hf", rec, max_steps=1)
    with RunLock(rec):  # flock is per open file: a second open in this process is a second writer
        with pytest.raises(RunLockError, match="being written by .*choose another record_dir") as err:
            trainer.train()
    assert "\n" not in str(err.value)
    assert list(rec.iterdir()) == []
