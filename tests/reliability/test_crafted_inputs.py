"""Issue 10 §7: hostile or damaged files in a received run give one line (exit 2) naming the
file, never a traceback, never an allocation the header asks for, never unpickling."""

from __future__ import annotations

import json
import pickle

import pytest

from .conftest import (FORGET, RUN, assert_one_line_error, cli, edit_json, rehash_checkpoint,
                       safetensors_claiming, safetensors_header_length, tree_hash)


class _Payload:
    """Unpickling this creates a directory: proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


CRAFTED = {
    "model claims 4 TB": ("model.safetensors", lambda m: safetensors_claiming(4 << 40)),
    "header length 2^62": ("model.safetensors", lambda m: safetensors_header_length(1 << 62)),
    "truncated model": ("model.safetensors", None),
    "pickle as optimizer": ("optimizer.safetensors", lambda m: pickle.dumps(_Payload(m))),
    "broken optimizer.json": ("optimizer.json", lambda m: b'{"param_groups": 5}'),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_checkpoint_files(run_copy, tmp_path, capsys, case):
    name, make = CRAFTED[case]
    marker = tmp_path / "UNPICKLED"
    f = run_copy / "checkpoint-8" / name
    f.write_bytes(make(marker) if make else f.read_bytes()[:-100])
    rehash_checkpoint(run_copy, 8)  # the sender made the hashes agree: only the loader can tell
    before = tree_hash(run_copy)
    rc, out, err = cli(capsys, "unlearn", "trainer=replay", f"unlearn.model_dir={run_copy}",
                       f"unlearn.forget={FORGET}", f"unlearn.output_dir={tmp_path / 'out'}")
    assert_one_line_error(rc, out, err, f"checkpoint-8/{name}" if name.endswith("safetensors") else "checkpoint-8")
    rc, out, err = cli(capsys, "train", *RUN, f"training.output_dir={tmp_path / 'resumed'}",
                       f"training.resume_from_checkpoint={run_copy / 'checkpoint-8'}")
    assert_one_line_error(rc, out, err, "checkpoint-8")
    assert not marker.exists(), "a pickle was loaded"
    assert tree_hash(run_copy) == before and not (tmp_path / "out").exists()


def _meta_variants():
    def drop(key):
        return lambda m: m.pop(key)

    def setter(path, value):
        def f(m):
            d = m
            for k in path[:-1]:
                d = d[k]
            d[path[-1]] = value
        return f

    # (edit, expected words, whether `inspect` fails too: it reads the format, not the recorded
    # config's schema, so a log from another lmcleaner version still shows)
    return {
        "not an object": (None, "expected a JSON object", True),
        "not JSON": ("raw", "corrupted JSON", True),
        "no config": (drop("config"), "key 'config' is missing", True),
        "config is a list": (setter(["config"], [1]), "key 'config' must be dict", True),
        "config.training is a string": (setter(["config", "training"], "x"), "meta.json", False),
        "unknown config key": (setter(["config", "training", "bogus"], 1), "unknown config key", False),
        "optimizer empty": (setter(["optimizer"], {}), "malformed 'optimizer'", True),
        "storage unknown": (setter(["storage"], "floppy"), "key 'storage'", True),
        "seed a string": (setter(["seed"], "42"), "key 'seed' must be int", True),
        "resume entry without step": (setter(["resumes"], [{"time": 1}]), "key 'resumes'", True),
    }


@pytest.mark.parametrize("variant", list(_meta_variants()))
def test_malformed_meta_json(run_copy, tmp_path, capsys, variant):
    fn, words, inspect_fails = _meta_variants()[variant]
    meta = run_copy / "training_log" / "meta.json"
    if fn is None:
        meta.write_text(json.dumps([1, 2]))
    elif fn == "raw":
        meta.write_text('{"format_version": 1, "config": ')
    else:
        edit_json(meta, fn)
    before = tree_hash(run_copy)
    for args in (["unlearn", "trainer=replay", f"unlearn.model_dir={run_copy}", f"unlearn.forget={FORGET}",
                  f"unlearn.output_dir={tmp_path / 'out'}"],
                 ["retrain", f"unlearn.model_dir={run_copy}", f"unlearn.forget={FORGET}",
                  f"unlearn.output_dir={tmp_path / 'out'}"],
                 ["inspect", run_copy / "training_log"]):
        rc, out, err = cli(capsys, *args)
        if args[0] == "inspect" and not inspect_fails:
            assert rc == 0, err
            continue
        assert_one_line_error(rc, out, err, words)
        assert "meta.json" in err, err
    assert tree_hash(run_copy) == before and not (tmp_path / "out").exists()
