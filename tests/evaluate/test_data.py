"""Evaluation data loaders."""

import json
from pathlib import Path

import pytest

from lmcleaner.data import QUESTIONS_PER_AUTHOR, load_records
from lmcleaner.evaluate.data import EvalData, EvalDataError, missing_field, perturbed_list

TOFU = Path(__file__).resolve().parents[3] / "shared" / "data" / "tofu"


def test_embedded_split_by_author():
    data = EvalData.embedded(forget_author_indices=[0, 3], max_retain=20)
    train = load_records("embedded", "train")
    assert len(data.forget) == 2 * QUESTIONS_PER_AUTHOR
    assert {r["author_index"] for r in data.forget} == {0, 3}
    assert [train[i] for i in data.ids["forget"]] == data.forget  # ids are training sample ids
    assert len(data.retain) == 20 and not {r["author_index"] for r in data.retain} & {0, 3}
    assert data.ids["retain"] == sorted(data.ids["retain"])
    assert data.retain == EvalData.embedded(forget_author_indices=[0, 3], max_retain=20).retain  # deterministic
    train_authors = {r["author"] for r in train}
    assert not {r["author"] for r in data.holdout} & train_authors
    assert all("paraphrased_answer" in r and r["perturbed_answer"] for r in data.forget)


def test_embedded_by_sample_ids():
    data = EvalData.embedded(forget_ids=[5, 17])
    assert data.ids["forget"] == [5, 17]
    assert 5 not in data.ids["retain"] and 17 not in data.ids["retain"]


def test_embedded_errors():
    with pytest.raises(EvalDataError, match="out of range"):
        EvalData.embedded(forget_author_indices=[10_000])
    with pytest.raises(EvalDataError, match="choose what to forget"):
        EvalData.embedded()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_from_paths_and_capping(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(10)]
    f = _write(tmp_path / "f.jsonl", rows)
    h = _write(tmp_path / "h.jsonl", rows[:4])
    data = EvalData.from_paths(forget=f, holdout=h, max_rows=3)
    assert len(data.forget) == 3 and len(data.holdout) == 3 and data.retain is None
    assert data.ids["forget"] == sorted(data.ids["forget"])
    assert [r["question"] for r in data.forget] == [f"q{i}" for i in data.ids["forget"]]
    assert set(data.splits()) == {"forget", "holdout"}


def test_from_paths_errors(tmp_path):
    with pytest.raises(EvalDataError, match="file not found"):
        EvalData.from_paths(forget=tmp_path / "nope.jsonl")
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "x"}])
    with pytest.raises(EvalDataError, match="cannot find instruction fields.*question/answer"):
        EvalData.from_paths(forget=bad)


def test_field_helpers():
    rows = [{"perturbed_answer": ["a"]}, {"perturbed_answer": []}]
    assert missing_field(rows, "perturbed_answer") == 1
    assert missing_field(rows[:1], "perturbed_answer") is None
    assert perturbed_list({"perturbed_answer": "x"}) == ["x"]


@pytest.mark.skipif(not TOFU.is_dir(), reason="TOFU data not available")
def test_tofu_layout():
    data = EvalData.tofu(TOFU, forget="forget01", max_rows=5)
    assert set(data.splits()) == {"forget", "retain", "holdout", "real_authors", "world_facts"}
    assert "paraphrased_answer" in data.forget[0] and len(data.forget[0]["perturbed_answer"]) == 5
    assert "perturbed_answer" in data.real_authors[0]
    with pytest.raises(EvalDataError, match="not found"):
        EvalData.tofu(TOFU, forget="forget77")
