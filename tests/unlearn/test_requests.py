"""``lmcleaner unlearn unlearn.requests=FILE``: several deletion requests answered by one joint
computation, one audit record each; a bad requests file is a one-line error with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmcleaner.unlearn.requests import joint_records, read_requests, union_ids
from lmcleaner.unlearn.result import UnlearnError

from ..reliability.conftest import RUN, assert_one_line_error, cli, tree_hash

REQUESTS = [{"request_id": "r1", "ids": [3]}, {"request_id": "r2", "ids": [17, 40]}, {"request_id": "r3", "ids": [40]}]


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from lmcleaner.cli.main import main

    root = tmp_path_factory.mktemp("requests")
    assert main(["train", *RUN, f"training.output_dir={root / 'run'}"]) == 0
    return root / "run"


def test_read_requests_keeps_order_and_merges_ids(tmp_path):
    path = write(tmp_path / "r.jsonl", [*REQUESTS[:2], "", {"request_id": "r4", "ids": [9, 9, 2]}])
    reqs = read_requests(path)
    assert [r["request_id"] for r in reqs] == ["r1", "r2", "r4"]
    assert reqs[2]["ids"] == [2, 9] and union_ids(reqs) == [2, 3, 9, 17, 40]


@pytest.mark.parametrize("lines, needle", [
    (["{not json"], ":1: not JSON"),
    ([{"request_id": "r1"}], "needs \"ids\""),
    ([{"request_id": "r1", "ids": []}], "needs \"ids\""),
    ([{"request_id": "r1", "ids": [True]}], "needs \"ids\""),
    ([{"request_id": "r1", "ids": [-1]}], "needs \"ids\""),
    ([{"ids": [1]}], "request_id"),
    ([{"request_id": "", "ids": [1]}], "request_id"),
    ([{"request_id": "r1", "ids": [1]}, {"request_id": "r1", "ids": [2]}], ":2: request_id 'r1' appears twice"),
    ([[1, 2]], "needs \"ids\""),
    ([""], "holds no request"),
])
def test_bad_requests_file_names_the_line_and_the_format(tmp_path, lines, needle):
    with pytest.raises(UnlearnError) as err:
        read_requests(write(tmp_path / "r.jsonl", lines))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_joint_records_split_the_cost():
    base = {"request_id": "joint", "forget_ids": [3, 17, 40], "grad_equivalents_total": 30.0, "method": "replay"}
    recs = joint_records(base, REQUESTS)
    assert [r["request_id"] for r in recs] == ["r1", "r2", "r3"]
    assert recs[1]["forget_ids"] == [17, 40] and recs[1]["joint_forget_ids"] == [3, 17, 40]
    assert recs[0]["joint_with"] == ["r2", "r3"] and recs[2]["joint_with"] == ["r1", "r2"]
    assert sum(r["grad_equivalents_share"] for r in recs) == pytest.approx(30.0)
    assert all(r["method"] == "replay" for r in recs)


def test_cli_answers_requests_jointly_bit_identical_to_forgetting_their_union(run, tmp_path, capsys):
    reqs = write(tmp_path / "requests.jsonl", REQUESTS)
    before = tree_hash(run)
    rc, out, err = cli(capsys, "unlearn", "trainer=replay", f"unlearn.model_dir={run}", f"unlearn.requests={reqs}",
                       f"unlearn.output_dir={tmp_path / 'joint'}")
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["requests"] == ["r1", "r2", "r3"] and summary["forget_ids"] == [3, 17, 40]
    assert summary["grad_equivalents_share"] == pytest.approx(summary["grad_equivalents_total"] / 3)
    rc, _, err = cli(capsys, "unlearn", "trainer=replay", f"unlearn.model_dir={run}", "unlearn.forget=3,17,40",
                     f"unlearn.output_dir={tmp_path / 'union'}")
    assert rc == 0, err
    joint = (tmp_path / "joint" / "model.safetensors").read_bytes()
    assert joint == (tmp_path / "union" / "model.safetensors").read_bytes()
    records = json.loads((tmp_path / "joint" / "audit" / "audit_records.json").read_text())
    assert [r["request_id"] for r in records] == ["r1", "r2", "r3"]
    assert [r["forget_ids"] for r in records] == [[3], [17, 40], [40]]
    assert all(r["joint_forget_ids"] == [3, 17, 40] and len(r["joint_with"]) == 2 for r in records)
    # the oracle for the requests: `lmcleaner retrain unlearn.requests=...` retrains without their union
    rc, _, err = cli(capsys, "retrain", f"unlearn.model_dir={run}", f"unlearn.requests={reqs}",
                     f"unlearn.output_dir={tmp_path / 'oracle'}")
    assert rc == 0, err
    from safetensors.torch import load_file

    oracle = load_file(str(tmp_path / "oracle" / "final_model" / "model.safetensors"))
    answer = load_file(str(tmp_path / "joint" / "model.safetensors"))
    assert oracle.keys() == answer.keys() and all(oracle[n].equal(answer[n]) for n in oracle)
    assert tree_hash(run) == before  # the source run is untouched


@pytest.mark.parametrize("lines, extra, needle", [
    ([{"request_id": "r1", "ids": [3]}, "{oops"], [], "requests.jsonl:2: not JSON"),
    ([{"request_id": "r1", "ids": [10_000]}], [], "request 'r1': unknown sample ids [10000]"),
    ([{"request_id": "r1", "ids": [3]}], ["unlearn.forget=3"], "either unlearn.forget or unlearn.requests"),
])
def test_cli_bad_requests_one_line_error_nothing_written(run, tmp_path, capsys, lines, extra, needle):
    reqs = write(tmp_path / "requests.jsonl", lines)
    before = tree_hash(run)
    out_dir = tmp_path / "out"
    rc, out, err = cli(capsys, "unlearn", "trainer=replay", f"unlearn.model_dir={run}", f"unlearn.requests={reqs}",
                       f"unlearn.output_dir={out_dir}", *extra)
    assert_one_line_error(rc, out, err, needle)
    assert not out_dir.exists() and tree_hash(run) == before
