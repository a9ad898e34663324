"""Command-line paths that used to break (issue 13, section 4), each from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmcleaner.cli.main import main
from lmcleaner.data import embedded_tokenizer, load_records

REPO = Path(__file__).resolve().parents[2]
TINY = ["model=micro-llama", "training.batch_size=4", "training.progress_bar=false", "training.logging_steps=0",
        "training.torch_threads=1"]


def _err_line(capsys) -> str:
    err = [l for l in capsys.readouterr().err.strip().splitlines() if l.startswith("lmcleaner")]
    assert len(err) == 1, err
    return err[0]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- config parsing
def test_mixed_precision_no_from_cli_and_yaml(tmp_path, capsys):
    assert main(["train", "--print-config", "training.mixed_precision=no"]) == 0
    assert "mixed_precision: 'no'" in capsys.readouterr().out
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  mixed_precision: no\n")
    assert main(["train", "--print-config", "--config", str(cfg)]) == 0
    assert "mixed_precision: 'no'" in capsys.readouterr().out


def test_text_field_list_from_cli_trains(tmp_path, capsys):
    data = _jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Translate", "input": f"word {i}", "output": f"mot {i}"}
                                              for i in range(8)])
    assert main(["train", *TINY, f"training.dataset_name={data}", "training.text_field=[instruction,input,output]",
                 "training.max_steps=2", "training_logger.enabled=false",
                 f"training.output_dir={tmp_path / 'run'}"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="fp16 is real on a GPU")
def test_fp16_on_cpu_is_refused(tmp_path, capsys):
    assert main(["train", *TINY, "training.mixed_precision=fp16", f"training.output_dir={tmp_path / 'run'}"]) == 2
    assert "fp16 needs a GPU" in _err_line(capsys)
    assert not (tmp_path / "run").exists()


def test_lr_find_plot_goes_to_the_output_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["lr-find", *TINY, "training.num_samples=16", f"training.output_dir={out}", "--num-steps", "6"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Path(result["plot"]) == out / "lr_find.png" and (out / "lr_find.png").is_file()
    assert not (tmp_path / "lr_find.png").exists()


# --------------------------------------------------------------------------- model loading
def test_bad_model_path_is_one_line(tmp_path, capsys):
    assert main(["train", "model.name_or_path=/no/such/model", f"training.output_dir={tmp_path / 'run'}"]) == 2
    line = _err_line(capsys)
    assert "model.name_or_path='/no/such/model'" in line and "no such directory" in line


@pytest.mark.slow
def test_offline_hub_id_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-m", "lmcleaner.cli.main", "train", "model.name_or_path=nobody/no-model",
                           f"training.output_dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.name_or_path='nobody/no-model'" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = embedded_tokenizer()
    path = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=128,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_lora_defaults_to_the_model_types_targets(tmp_path, gpt2_dir, capsys):
    args = [*TINY, f"model.name_or_path={gpt2_dir}", "lora.enabled=true", "training.num_samples=8",
            "training.max_steps=1", "training_logger.enabled=false"]
    assert main(["train", *args, f"training.output_dir={tmp_path / 'ok'}"]) == 0  # GPT-2: c_attn
    capsys.readouterr()
    assert main(["train", *args, "lora.target_modules=[q_proj,v_proj]", f"training.output_dir={tmp_path / 'bad'}"]) == 2
    line = _err_line(capsys)
    assert "lora.target_modules" in line and "'c_attn'" in line and "'c_fc'" in line


# --------------------------------------------------------------------------- start-up
def test_help_and_argument_errors_do_not_import_torch():
    """`--help` and bad arguments answer without importing torch/transformers (seconds at start-up)."""
    code = """
import json, sys
from lmcleaner.cli.main import main
codes = []
for argv in (["--help"], ["train", "--help"], ["unlearn", "--help"], ["retrain", "--help"], ["eval", "--help"],
             ["inspect", "--help"], ["demo", "--help"], ["lr-find", "--help"], ["eval", "--bogus"], ["nosuch"]):
    try:
        codes.append(main(argv))
    except SystemExit as e:
        codes.append(e.code)
print(json.dumps({"codes": codes, "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert result["codes"] == [0] * 8 + [2, 2]


def test_eval_help_names_the_fields_metrics_need(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    for needle in ("paraphrased_answer", "perturbed_answer", "messages", "conversations", "prompt/response",
                   "--text-field", "--convention"):
        assert needle in text, needle


# --------------------------------------------------------------------------- a recorded run
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny recorded run whose data holds two identical rows (0 and 16)."""
    root = tmp_path_factory.mktemp("cli-run")
    rows = [{"question": r["question"], "answer": r["answer"]} for r in load_records("embedded", num_samples=16)]
    data = _jsonl(root / "train.jsonl", rows + [rows[0]])
    assert main(["train", *TINY, f"training.dataset_name={data}", "training.max_steps=8",
                 "training_logger.checkpoint_interval=4", f"training.output_dir={root / 'run'}"]) == 0
    return root


def test_unlearn_shows_progress_and_names_duplicate_rows(run, tmp_path, capsys, caplog):
    forget = _jsonl(tmp_path / "forget.jsonl", [json.loads((run / "train.jsonl").read_text().splitlines()[0])])
    capsys.readouterr()
    assert main(["unlearn", "trainer=replay", f"unlearn.model_dir={run / 'run'}", f"unlearn.forget={forget}",
                 f"unlearn.output_dir={tmp_path / 'u'}"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["forget_ids"] == [0, 16]
    warned = " ".join(r.getMessage() for r in caplog.records) + err
    assert "1 row resolves to 2 training sample ids" in warned and "identical training rows" in warned
    progress = [l for l in err.splitlines() if l.startswith("unlearn replay:")]
    assert progress and "\r" not in err and ("ETA" in progress[0] or "done in" in progress[-1])


def test_retrain_shows_progress(run, tmp_path, capsys):
    assert main(["retrain", f"unlearn.model_dir={run / 'run'}", "unlearn.forget=3",
                 f"unlearn.output_dir={tmp_path / 'r'}"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and any(l.startswith("train:") and ("ETA" in l or "done in" in l) for l in err.splitlines())


def test_eval_reads_every_training_format(run, tmp_path, capsys):
    qa = [{"question": r["question"], "answer": r["answer"]} for r in load_records("embedded", num_samples=4)]
    files = {
        "messages": [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": r["question"]},
                                   {"role": "assistant", "content": r["answer"]}]} for r in qa],
        "conversations": [{"conversations": [{"from": "human", "value": r["question"]},
                                             {"from": "gpt", "value": r["answer"]}]} for r in qa],
        "prompt_response": [{"prompt": r["question"], "response": r["answer"]} for r in qa],
        "fields": [{"instruction": "Answer", "input": r["question"], "output": r["answer"]} for r in qa],
    }
    model = run / "run" / "final_model"
    for kind, rows in files.items():
        path = _jsonl(tmp_path / f"{kind}.jsonl", rows)
        extra = ["--text-field", "instruction,input,output"] if kind == "fields" else []
        gen = "2" if kind == "messages" else "0"  # generation renders the conversation as the prompt
        assert main(["eval", "--model", f"m={model}", "--data", f"forget={path},holdout={path}", *extra,
                     "--max-new-tokens", gen, "--no-progress", "--out", str(tmp_path / kind)]) == 0, kind
        summary = json.loads((tmp_path / kind / "summary.json").read_text())["models"]["m"]
        assert summary["forget_loss"] is not None and summary["mia_auc"] is not None
        # no TOFU paraphrased/perturbed answers: the truth ratio is null and says which field is missing
        assert summary["forget_truth_ratio"] is None
        assert "paraphrased_answer" in summary["reasons"]["forget_truth_ratio"]
    capsys.readouterr()
    # a system prompt and the chat template's rendering are part of the scored prompt
    from lmcleaner.evaluate import EvalData

    data = EvalData.from_paths(tmp_path / "messages.jsonl")
    assert data.forget[0]["question"] == qa[0]["question"] and data.forget[0]["prompt_messages"][0]["role"] == "system"


# --------------------------------------------------------------------------- CI
def test_ci_smoke_run_says_when_it_times_out(tmp_path):
    proc = subprocess.run([str(REPO / ".ci" / "demo_smoke.sh"), str(tmp_path / "smoke")], capture_output=True,
                          text=True, timeout=120, check=False, env={**os.environ, "DEMO_TIMEOUT": "1"})
    assert proc.returncode == 1
    assert "CI: lmcleaner demo smoke run timed out after 1 s" in proc.stdout
