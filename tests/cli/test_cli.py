import json
import subprocess
import sys

import pytest

from lmcleaner.cli.main import main

from ..conftest import FAST


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ["train", "lr-find"]:
        assert cmd in out


def test_train_help_explains_overrides(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "key=value" in out and "training.max_steps" in out


def test_train_runs_and_prints_json(tmp_path, capsys):
    assert main(["train", *FAST, f"training.output_dir={tmp_path / 'r'}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 12 and (tmp_path / "r" / "final_model").is_dir()


@pytest.mark.parametrize("override, needle", [
    ("training.dataset_name=/does/not/exist.jsonl", "not found"),
    ("training.text_field=nope", "text_field"),
    ("training.scheduler=bogus", "scheduler"),
    ("training.optimizer=bogus", "optimizer"),
    ("training.max_length=4", "max_length"),
])
def test_bad_input_one_line_error_nothing_written(tmp_path, capsys, override, needle):
    out_dir = tmp_path / "out"
    rc = main(["train", *FAST, f"training.output_dir={out_dir}", override])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and needle in err and len(err.splitlines()) == 1
    assert not out_dir.exists()


def test_empty_dataset_and_bad_resume(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["train", *FAST, f"training.output_dir={tmp_path / 'o'}", f"training.dataset_name={empty}"]) == 2
    assert main(["train", *FAST, f"training.output_dir={tmp_path / 'o'}",
                 f"training.resume_from_checkpoint={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "empty" in err and "no checkpoint" in err
    assert not (tmp_path / "o").exists()


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "lmcleaner.cli.main", "train", "--print-config", "training.max_steps=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "max_steps: 3" in proc.stdout
