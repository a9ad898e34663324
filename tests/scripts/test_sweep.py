"""scripts/sweep.py end to end on the tiniest setting (one optimizer, seed, split, K, mode)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "sweep.py"


def load_sweep():
    spec = importlib.util.spec_from_file_location("lmcleaner_scripts_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_grid_and_splits():
    sweep = load_sweep()
    assert sweep.resolve_Ks(["5", "full", "99"], tau=40) == [5, 40]
    grid = sweep.build_grid(40, ["5", "full"], ["exact", "GGN"])
    methods = [m for m, _ in grid]
    assert methods[0] == "replay" and methods.count("LMCleanerSampleLevel") == 4
    assert {"LMCleanerBatchLevel", "rollback", "sgd_formula", "GradAscent"} <= set(methods)
    assert len(sweep.build_grid(40, ["full"], ["exact"], baselines=False, batch_level=False)) == 2
    rows = [{"author_index": a} for a in (0, 0, 1, 1, 2)]
    assert sweep.forget_ids_for_split(rows, 2) == [0, 1, 2, 3]
    with pytest.raises(SystemExit):
        sweep.build_parser().parse_args(["--out", "x", "--Ks", "0"])


@pytest.mark.slow
def test_sweep_tiny(tmp_path):
    sweep = load_sweep()
    out = tmp_path / "sweep"
    result = sweep.main([
        "--out", str(out), "--Ks", "full", "--modes", "exact", "--splits", "1", "--optimizers", "adamw",
        "--seeds", "0", "--steps", "12", "--model", "micro-llama", "--no-progress",
        "training.num_samples=48", "training.batch_size=4",
    ])
    tau = result["runs"][0]["tau"]
    assert tau == 12
    expected = len(sweep.build_grid(tau, ["full"], ["exact"]))

    with (out / "sweep.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    data = json.loads((out / "sweep.json").read_text())
    rows = data["rows"]
    assert len(csv_rows) == len(rows) == expected
    for key in ("optimizer", "seed", "split", "method", "hessian_mode", "K", "rel_param_error", "kl_forget",
                "kl_retain", "seconds", "grad_equivalents", "cost_vs_replay"):
        assert key in csv_rows[0] and all(key in r for r in rows)
    assert {(r["optimizer"], r["seed"], r["split"]) for r in rows} == {("adamw", 0, 1)}
    assert {r["optimizer"] for r in csv_rows} == {"adamw"}

    replay = [r for r in rows if r["method"] == "replay"]
    assert len(replay) == 1 and replay[0]["rel_param_error"] == 0.0 and replay[0]["cost_vs_replay"] == 1.0
    assert float([r for r in csv_rows if r["method"] == "replay"][0]["rel_param_error"]) == 0.0
    lmc = [r for r in rows if r["method"].startswith("LMCleaner")]
    assert lmc, "no LMCleaner rows"
    for r in lmc:
        assert r["rel_param_error"] is not None and math.isfinite(r["rel_param_error"]), r
        assert r["cost_vs_replay"] is not None and r["cost_vs_replay"] > 0
    sample = [r for r in lmc if r["method"] == "LMCleanerSampleLevel"]
    assert [r["K_label"] for r in sample] == ["full"]
    # the correction must change something (not a no-op returning the original model)
    assert sample[0]["rel_param_error"] != 1.0

    png = out / "sweep.png"
    assert png.is_file() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        w, h = im.size
        assert w > 400 and h > 300
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 16  # not a blank canvas
    assert not (out / "runs").exists()  # cleaned up without --keep-runs
