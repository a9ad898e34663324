"""Issue 10, done-when: every CLI command with its bad inputs. Each case must exit 2, print
exactly one line (stderr; nothing on stdout), write nothing anywhere in the sandbox (the
working directory holds the source run and every output location), and leave the source
bytes unchanged (hash of names and contents before/after).

Runs in-process through ``lmcleaner.cli.main.main``; argparse usage errors raise
``SystemExit(2)`` there, as on the command line."""

from __future__ import annotations

import json
import shutil

import pytest

from lmcleaner.cli.main import main

from .conftest import RUN, tree_hash, write_evil_model

# {run}: a finished recorded run; {taken}: an existing directory that is not a run or model;
# {evil}: a model directory that ships Python code; {evals}: a directory with earlier eval results.
CASES = {
    "train": [
        (["training.bogus=1"], "unknown config key 'training.bogus'"),
        (["training.max_steps=abc"], "bad value for config key 'training.max_steps'"),
        (["training.dataset_name=missing.jsonl", "training.output_dir=new"], "missing.jsonl"),
        (["training.output_dir={run}"], "already holds checkpoints"),
        (["training.output_dir=new", "training.resume_from_checkpoint=latest"], "no checkpoint in new"),
        (["training.output_dir=new", "training.resume_from_checkpoint={run}/final_model"], "no checkpoint at"),
        (["training.output_dir=new", "model.name_or_path={evil}"], "ships its own Python code"),
        (["--config", "missing.yaml"], "config file not found"),
        (["--bogus-flag"], "unrecognized arguments"),
    ],
    "lr-find": [
        (["--start-lr", "1", "--end-lr", "0.1"], "--start-lr"),
        (["--num-steps", "1"], "at least 2 steps"),
        (["--plot", "{taken}"], "is a directory"),
        (["--num-steps", "ten"], "invalid int value"),
        (["training.bogus=1"], "unknown config key"),
    ],
    "unlearn": [
        (["unlearn.model_dir={run}", "unlearn.forget=999"], "unknown sample ids [999]"),
        (["unlearn.model_dir={run}", "unlearn.forget="], "nothing to forget"),
        (["unlearn.model_dir={run}", "unlearn.forget=missing.txt"], "forget file not found"),
        (["unlearn.model_dir=missing", "unlearn.forget=3"], "no such directory"),
        (["unlearn.model_dir={taken}", "unlearn.forget=3"], "no trajectory log"),
        (["unlearn.model_dir={run}", "unlearn.forget=3", "trainer=bogus"], "unknown unlearning method 'bogus'"),
        (["unlearn.model_dir={run}", "unlearn.forget=3", "trainer.method_args.K=0"], "K=0"),
        (["unlearn.model_dir={run}", "unlearn.forget=3", "unlearn.output_dir={run}"], "is the source run"),
        (["unlearn.model_dir={run}", "unlearn.forget=3", "unlearn.output_dir={run}/final_model",
          "unlearn.overwrite=true"], "inside the source run"),
        (["unlearn.model_dir={run}", "unlearn.forget=3", "unlearn.output_dir={taken}"], "already exists"),
    ],
    "retrain": [
        (["unlearn.model_dir=missing", "unlearn.forget=3"], "no such directory"),
        (["unlearn.model_dir={taken}", "unlearn.forget=3"], "not a trained run"),
        (["unlearn.model_dir={run}", "unlearn.forget=999"], "unknown sample ids [999]"),
        (["unlearn.model_dir={run}", "unlearn.forget=3", "unlearn.output_dir={run}"], "is the source run"),
        (["unlearn.model_dir={run}", "unlearn.forget=3", "unlearn.output_dir={run}/checkpoint-8",
          "unlearn.overwrite=true"], "inside the source run"),
        (["unlearn.model_dir={run}", "unlearn.forget=3", "unlearn.output_dir={taken}"], "already exists"),
    ],
    "eval": [
        (["--model", "m=missing"], "directory not found"),
        (["--model", "no-equals-sign"], "expected NAME=DIR"),
        (["--model", "m={run}/final_model", "--oracle", "x"], "not a --model name"),
        (["--model", "m={run}/final_model", "--model", "m={run}/final_model"], "given twice"),
        (["--model", "m={run}/final_model", "--data", "bogus"], "bad --data"),
        (["--model", "m={run}/final_model", "--data", "forget=missing.jsonl"], "missing.jsonl"),
        (["--model", "m={run}/final_model", "--out", "{run}/final_model/eval"], "inside the source"),
        (["--model", "m={run}/final_model", "--out", "{evals}"], "already holds eval.json"),
        (["--model", "m={evil}"], "ships its own Python code"),
        (["--model", "m={run}/final_model", "--max-rows", "abc"], "invalid int value"),
    ],
    "inspect": [
        (["{taken}"], "not a training log"),
        (["missing"], "not a training log"),
        ([], "the following arguments are required: LOG_DIR"),
    ],
    "pretrain": [  # pretrain.cache_dir inside the sandbox: a refusal must not create the cache either
        (["pretrain.model=bogus", "pretrain.cache_dir=cache"], "neither a model preset"),
        (["pretrain.steps=0", "pretrain.cache_dir=cache"], "pretrain.steps=0"),
        (["pretrain.steps=abc"], "bad value for config key 'pretrain.steps'"),
        (["pretrain.bogus=1"], "unknown config key 'pretrain.bogus'"),
    ],
    "demo": [
        (["demo.out_dir={taken}"], "is not a demo output"),
        (["demo.model=bogus", "demo.out_dir=new"], "neither a model preset"),
        (["demo.steps=abc"], "bad value for config key 'demo.steps'"),
    ],
}
CONFIG_COMMANDS = {"train", "lr-find"}  # given the tiny recorded-run config so a case fails only for its reason


@pytest.fixture(scope="module")
def sandbox(base_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("sandbox")
    shutil.copytree(base_run, root / "run")
    (root / "taken").mkdir()
    (root / "taken" / "notes.txt").write_text("someone's files")
    (root / "evals").mkdir()
    (root / "evals" / "summary.json").write_text(json.dumps({"earlier": "results"}))
    write_evil_model(root / "evil", root / "PWNED")
    return root


def _expand(args: list[str], root) -> list[str]:
    return [a.format(run=root / "run", taken=root / "taken", evil=root / "evil", evals=root / "evals") for a in args]


@pytest.mark.parametrize("command, args, needle",
                         [(c, a, n) for c, cases in CASES.items() for a, n in cases],
                         ids=[f"{c}-{i}" for c, cases in CASES.items() for i in range(len(cases))])
def test_bad_input(sandbox, capsys, monkeypatch, command, args, needle):
    monkeypatch.chdir(sandbox)
    before = tree_hash(sandbox)
    argv = [command, *(RUN if command in CONFIG_COMMANDS and not args[0].startswith("--config") else []),
            *_expand(args, sandbox)]
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse usage errors
        rc = exit_.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err[-2000:])
    assert len(lines) == 1 and out.strip() == "", (out[-1000:], err[-3000:])
    assert needle in lines[0], lines[0]
    assert lines[0].startswith("lmcleaner") and ": error: " in lines[0], lines[0]
    assert tree_hash(sandbox) == before, "a failed command wrote something"
    assert not (sandbox / "PWNED").exists()
