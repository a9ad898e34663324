"""Benchmark report: markdown table and PNG plots."""

import struct

from lmcleaner.evaluate.report import REPORT_COLUMNS, format_table, format_value, write_report

ROWS = [
    {"method": "replay", "hessian_mode": None, "K": None, "rel_param_error": 0.0, "kl_forget": 0.0,
     "kl_retain": 0.0, "seconds": 12.0, "grad_equivalents": 40.0, "cost_vs_replay": 1.0, "forget_quality": 1.0,
     "model_utility": 0.61, "mia_auc": 0.52},
    {"method": "rollback", "hessian_mode": None, "K": None, "rel_param_error": 1.3, "kl_forget": 0.2,
     "kl_retain": 0.05, "seconds": 0.1, "grad_equivalents": 2.0, "cost_vs_replay": 0.05, "forget_quality": 0.01,
     "model_utility": 0.6, "mia_auc": 0.8},
    *[{"method": "lmcleaner", "hessian_mode": mode, "K": k, "rel_param_error": err / k, "kl_forget": None,
       "kl_retain": None, "seconds": k * 0.5, "grad_equivalents": k * 4.7, "cost_vs_replay": k * 4.7 / 40,
       "forget_quality": None, "model_utility": None, "mia_auc": None}
      for mode, err in (("exact", 0.5), ("GGN", 0.9)) for k in (2, 4, 8)],
]


def _png_size(path):
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_write_report(tmp_path):
    history = [(s, 3.0 / (1 + s)) for s in range(50)]
    paths = write_report(ROWS, tmp_path / "rep", loss_history=history, title="demo")
    plots = ("training_loss", "error_vs_k", "error_vs_cost", "forget_vs_utility", "mia_auc")
    assert set(paths) == {"report", *plots}
    for key in plots:
        w, h = _png_size(paths[key])
        assert w >= 600 and h >= 400
    md = paths["report"].read_text()
    assert md.startswith("# demo")
    for name in plots:
        assert f"]({name}.png)" in md
    assert "| method" in md and "lmcleaner" in md and "GGN" in md


def test_report_skips_plots_without_data(tmp_path):
    rows = [{"method": "replay", "rel_param_error": None, "K": None}]
    paths = write_report(rows, tmp_path, loss_history=None)
    assert set(paths) == {"report"}
    assert "not drawn" in paths["report"].read_text()


def test_format_table():
    text = format_table(ROWS[:2])
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(l) for l in lines}) == 1  # aligned
    assert lines[0].split("|")[1].strip() == "method"
    assert [c.strip() for c in lines[0].strip("|").split("|")] == REPORT_COLUMNS
    assert "| replay" in lines[2] and " - " in lines[2]  # None shown as '-'
    assert format_table([{"a": 1, "b": None}], ["a", "b"]).splitlines()[2] == "| 1 | - |"
    assert format_value(float("nan")) == "-" and format_value(0.123456) == "0.1235"
