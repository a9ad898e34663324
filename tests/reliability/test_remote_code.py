"""Issue 10 §1: a received run is data. Rebuilding its model never runs the run's code:
neither a recorded ``trust_remote_code`` with a model that ships Python (``auto_map``),
nor a recorded telemetry YAML whose logging factories call functions. Only the current
user's ``--trust-remote-code`` enables remote code, with a warning."""

from __future__ import annotations

import json
import logging

import pytest

from lmcleaner.config.received import RemoteCodeError, guard_remote_code

from .conftest import FORGET, assert_one_line_error, cli, edit_json, tree_hash, write_evil_model


@pytest.fixture
def crafted_run(run_copy, tmp_path):
    """The run's meta.json now names a model that ships code, with trust_remote_code=true."""
    marker = tmp_path / "PWNED"
    evil = write_evil_model(run_copy / "evil_model", marker)

    def craft(meta):
        meta["config"]["model"].update(name_or_path=str(evil), trust_remote_code=True, tokenizer="embedded")

    edit_json(run_copy / "training_log" / "meta.json", craft)
    return run_copy, marker


def test_unlearn_and_retrain_never_run_the_runs_code(crafted_run, tmp_path, capsys):
    run, marker = crafted_run
    before = tree_hash(run)
    for command in (["unlearn", "trainer=replay"], ["retrain"]):
        rc, out, err = cli(capsys, *command, f"unlearn.model_dir={run}", f"unlearn.forget={FORGET}",
                           f"unlearn.output_dir={tmp_path / 'out'}")
        assert_one_line_error(rc, out, err, "ships its own Python code", "--trust-remote-code")
        assert not marker.exists(), f"{command[0]} ran the run's code"
        assert not (tmp_path / "out").exists()
    assert tree_hash(run) == before


def test_replay_and_reconstruction_ignore_the_recorded_flag(crafted_run):
    from lmcleaner.trajectory import BatchReconstructor, TrajectoryLog, TrajectoryReplayer
    from lmcleaner.trajectory.reconstruct import replay_config

    run, marker = crafted_run
    log = TrajectoryLog(run / "training_log")
    assert replay_config(log).model.trust_remote_code is False
    with pytest.raises(RemoteCodeError):
        TrajectoryReplayer(log).trainer
    BatchReconstructor.from_log(log)  # the embedded tokenizer: no model is built, no code runs
    assert not marker.exists()


def test_eval_refuses_a_model_that_ships_code(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = write_evil_model(tmp_path / "evil_model", marker)
    rc, out, err = cli(capsys, "eval", "--model", f"m={evil}", "--out", tmp_path / "eval", "--max-rows", "2",
                       "--no-progress")
    assert_one_line_error(rc, out, err, "ships its own Python code", "--trust-remote-code")
    assert not marker.exists() and not (tmp_path / "eval").exists()


def test_recorded_telemetry_config_is_not_honoured_by_retrain(run_copy, tmp_path, capsys):
    """A logging YAML with a ``()`` factory calls any function (here os.mkdir) when configured."""
    marker = tmp_path / "PWNED_BY_TELEMETRY"
    yaml = run_copy / "telemetry.yaml"
    yaml.write_text(f'version: 1\nhandlers:\n  evil:\n    "()": os.mkdir\n    path: {marker}\n'
                    "loggers:\n  lmcleaner:\n    handlers: [evil]\n")

    def craft(meta):
        meta["config"]["telemetry_config"] = str(yaml)

    edit_json(run_copy / "training_log" / "meta.json", craft)
    out = tmp_path / "retrain"
    rc, stdout, err = cli(capsys, "retrain", f"unlearn.model_dir={run_copy}", f"unlearn.forget={FORGET}",
                          f"unlearn.output_dir={out}")
    assert rc == 0, err[-2000:]
    assert not marker.exists(), "retrain configured logging from the run's YAML"
    assert json.loads(stdout.strip().splitlines()[-1])["steps"] == 24


def test_only_the_users_flag_enables_remote_code(tmp_path, caplog):
    marker = tmp_path / "PWNED"
    evil = write_evil_model(tmp_path / "evil_model", marker)
    with pytest.raises(RemoteCodeError, match="auto_map"):
        guard_remote_code(evil, False)
    with caplog.at_level(logging.WARNING, logger="lmcleaner"):
        assert guard_remote_code(evil, True) is True
    assert "trusting remote code" in caplog.text
    assert guard_remote_code(tmp_path, False) is False  # no auto_map: nothing to trust
    assert not marker.exists()  # deciding never imports anything


def test_trust_flag_prints_a_warning(crafted_run, tmp_path, capsys, monkeypatch):
    """With --trust-remote-code the user's decision is passed on (and announced); the session
    never reads it from the run."""
    from lmcleaner.unlearn import session as session_mod

    run, _ = crafted_run
    seen = {}

    class Probe:
        def __init__(self, run_dir, log_dir=None, trust_remote_code=False):
            seen["trust"] = trust_remote_code
            raise session_mod.UnlearnError("stop here")

    monkeypatch.setattr(session_mod, "UnlearnSession", Probe)
    rc, _, err = cli(capsys, "unlearn", "--trust-remote-code", f"unlearn.model_dir={run}", "unlearn.forget=3")
    assert rc == 2 and seen["trust"] is True and "warning: --trust-remote-code" in err
    rc, _, err = cli(capsys, "unlearn", f"unlearn.model_dir={run}", "unlearn.forget=3")
    assert rc == 2 and seen["trust"] is False and "warning" not in err


def test_a_model_config_file_that_ships_code_is_refused(run_copy, tmp_path, capsys):
    """``model.name_or_path=<config>.json`` builds fresh weights from the file: an ``auto_map`` in it
    maps classes to code, refused like a model directory's (train, plan, and a received run)."""
    marker = tmp_path / "PWNED"
    config = write_evil_model(tmp_path / "evil_model", marker) / "config.json"
    rc, out, err = cli(capsys, "train", f"model.name_or_path={config}", "training.max_steps=1",
                       "training.progress_bar=false", f"training.output_dir={tmp_path / 'train'}")
    assert_one_line_error(rc, out, err, "ships its own Python code", "--trust-remote-code")
    rc, out, err = cli(capsys, "plan", "--model", config, "--samples", "10")
    assert_one_line_error(rc, out, err, "ships its own Python code")

    def craft(meta):
        meta["config"]["model"].update(name_or_path=str(config), trust_remote_code=True)

    edit_json(run_copy / "training_log" / "meta.json", craft)
    rc, out, err = cli(capsys, "unlearn", "trainer=replay", f"unlearn.model_dir={run_copy}", f"unlearn.forget={FORGET}",
                       f"unlearn.output_dir={tmp_path / 'out'}")
    assert_one_line_error(rc, out, err, "ships its own Python code", "--trust-remote-code")
    assert not marker.exists() and not (tmp_path / "out").exists() and not (tmp_path / "train").exists()
