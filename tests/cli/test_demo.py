import json

import pytest

from lmcleaner.cli.main import main


@pytest.mark.slow
def test_demo_small_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", f"demo.out_dir={out}", "demo.steps=16", "demo.model=micro-llama", "demo.Ks=[4]", "demo.init=scratch",
               "demo.hessian_modes=[exact]", "demo.forget_authors=[0]", "demo.eval_max_retain=8",
               "demo.eval_max_holdout=8", "demo.eval_max_new_tokens=4", "training.progress_bar=false",
               "training.num_samples=64"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "replay" in printed
    results = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert rows["replay"]["rel_param_error"] == 0.0
    lmc = [r for r in results["rows"] if r["method"] == "LMCleanerSampleLevel"]
    assert len(lmc) == 4 and all(0 <= r["rel_param_error"] < 5 for r in lmc)  # linear K, full; window K, adaptive
    assert {"LMC-window-K4-frozen", "LMC-window-K4-frozen-tol0.1"} <= set(rows)
    assert rows["auto"]["chosen"] in ("replay", "LMCleanerSampleLevel")
    assert all(r.get("forget_quality") is not None for r in results["rows"])
    report = (out / "report.md").read_text()
    assert "rel_param_error" in report
    pngs = list(out.glob("*.png"))
    assert len(pngs) >= 3 and all(p.stat().st_size > 5000 for p in pngs)
    # re-running into the same directory replaces the previous demo output
    assert main(["demo", f"demo.out_dir={out}", "demo.steps=4", "demo.model=micro-llama", "demo.Ks=[2]", "demo.init=scratch",
                 "demo.hessian_modes=[exact]", "demo.eval_max_retain=4", "demo.eval_max_holdout=4",
                 "demo.eval_max_new_tokens=2", "training.progress_bar=false", "training.num_samples=64",
                 "demo.forget_authors=[0]"]) == 0


def test_demo_refuses_foreign_directory(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("x")
    assert main(["demo", f"demo.out_dir={foreign}"]) == 2
    assert (foreign / "precious.txt").exists()
    assert "not a demo output" in capsys.readouterr().err
