"""The ``lmcleaner eval`` subcommand."""

import argparse
import json

import pytest

from lmcleaner.evaluate import cli

FAST = ["--data", "embedded", "--forget-ids", "0,1,2", "--max-rows", "3", "--max-new-tokens", "3",
        "--batch-size", "4", "--no-progress"]


def _parser():
    parser = argparse.ArgumentParser(prog="lmcleaner")
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    return parser


def test_register_and_help(capsys):
    parser = _parser()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["eval", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--model", "--oracle", "--original", "--data", "--forget-authors", "--out", "--max-new-tokens",
                "--batch-size", "NAME=DIR", "tofu:DIR"):
        assert opt in out
    args = parser.parse_args(["eval", "--model", "a=/x", "--model", "b=/y", "--oracle", "b", "--forget-authors", "0,1"])
    assert args.models == [("a", "/x"), ("b", "/y")] and args.forget_authors == [0, 1] and args.func is cli.run


def test_bad_model_spec_is_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["eval", "--model", "no-equals-sign"])
    assert exit_.value.code == 2
    assert "NAME=DIR" in capsys.readouterr().err


def test_run_end_to_end(model_dirs, tmp_path, capsys):
    out = tmp_path / "ev"
    code = cli.main(["--model", f"orig={model_dirs['original']}", "--model", f"retrain={model_dirs['retrain']}",
                     "--oracle", "retrain", "--original", "orig", "--out", str(out), *FAST])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| model" in printed and "orig" in printed and "forget_quality" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["orig"]["rel_param_error"] == pytest.approx(1.0)
    assert summary["splits"] == {"forget": 3, "retain": 3, "holdout": 3}
    assert (out / "eval.json").is_file()


def test_bad_model_path_exit_code(tmp_path, capsys):
    code = cli.main(["--model", f"ghost={tmp_path / 'missing'}", "--out", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "ghost" in err and "missing" in err


@pytest.mark.parametrize("extra, message", [
    (["--oracle", "nope"], "--oracle 'nope'"),
    (["--data", "forget=a.jsonl,bogus=b.jsonl"], "bad --data"),
    (["--data", "tofu:/definitely/not/here"], "not found"),
])
def test_argument_errors(model_dirs, tmp_path, capsys, extra, message):
    args = ["--model", f"m={model_dirs['original']}", "--out", str(tmp_path), *FAST, *extra]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
