"""TelemetryCallback inside a real transformers.Trainer run on a tiny Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from lmcleaner import telemetry
from lmcleaner.telemetry import TelemetryCallback

from ._helpers import read_csv


class RandomTokens(Dataset):
    """Fixed random token sequences; labels = inputs (causal LM loss)."""

    def __init__(self, n: int = 16, length: int = 8, vocab: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def _trainer(tmp_path: Path, callback: TelemetryCallback, eval_dataset: Dataset | None = None) -> Trainer:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2,
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=4,
        logging_steps=1,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    return Trainer(
        model=LlamaForCausalLM(config),
        args=args,
        train_dataset=RandomTokens(),
        eval_dataset=eval_dataset,
        callbacks=[callback],
    )


def test_every_log_step_reaches_csv_and_tensorboard(tmp_path: Path) -> None:
    session = telemetry.initialize(output_dir=tmp_path / "telemetry")
    trainer = _trainer(tmp_path, TelemetryCallback())
    trainer.train()
    # on_train_end flushed: the rows are on disk before shutdown.
    header, rows = read_csv(session.output_dir / "training.csv")
    trainer_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(trainer_losses) == 4
    loss_rows = [r for r in rows if r["loss"]]
    assert [int(r["step"]) for r in loss_rows] == [1, 2, 3, 4]
    assert [float(r["loss"]) for r in loss_rows] == pytest.approx(trainer_losses)
    assert {"loss", "learning_rate", "grad_norm", "epoch"} <= set(header)
    (summary,) = [r for r in rows if r.get("train_runtime")]  # end-of-training summary kept once
    assert int(summary["step"]) == 4
    telemetry.shutdown()

    acc = EventAccumulator(str(session.tensorboard_dir), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("training/loss")] == [1, 2, 3, 4]
    log_text = (session.log_dir / "lmcleaner.log").read_text()
    assert "training started" in log_text and "training finished at step 4" in log_text


def test_reduced_frequency_and_evaluation(tmp_path: Path) -> None:
    session = telemetry.initialize(output_dir=tmp_path / "telemetry")
    trainer = _trainer(tmp_path, TelemetryCallback(log_every_n=2), eval_dataset=RandomTokens(n=8, seed=1))
    trainer.train()
    eval_metrics = trainer.evaluate()
    telemetry.shutdown()

    _, rows = read_csv(session.output_dir / "training.csv")
    assert [int(r["step"]) for r in rows if r["loss"]] == [1, 3]  # every 2nd on_log
    assert all("eval_loss" not in r for r in rows)  # evaluation goes to metrics.csv only
    _, eval_rows = read_csv(session.output_dir / "metrics.csv")
    assert len(eval_rows) == 1
    assert int(eval_rows[0]["step"]) == 4
    assert float(eval_rows[0]["eval_loss"]) == pytest.approx(eval_metrics["eval_loss"])


def test_callback_without_session_does_not_fail(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, TelemetryCallback())
    trainer.train()
    assert trainer.state.global_step == 4
    assert not (tmp_path / "telemetry").exists()


def test_invalid_frequency_rejected() -> None:
    with pytest.raises(ValueError):
        TelemetryCallback(log_every_n=0)
