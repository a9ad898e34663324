"""evaluate_models end to end on tiny saved Llama directories."""

import json
import math

import numpy as np
import pytest
from scipy.stats import hmean

from lmcleaner.data import load_records
from lmcleaner.evaluate import EvalData, ModelLoadError, evaluate_models, load_eval_tokenizer
from lmcleaner.evaluate.runner import METRIC_KEYS

FAST = dict(max_new_tokens=4, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def small_data():
    return EvalData.embedded(forget_ids=[0, 1, 2], max_retain=3, max_holdout=3)


@pytest.fixture(scope="module")
def full_run(model_dirs, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    per_sample, summary = evaluate_models(model_dirs, small_data, oracle="retrain", original="original",
                                          out_dir=out, **FAST)
    return out, per_sample, summary


def test_end_to_end_summary(full_run):
    out, per_sample, summary = full_run
    models = summary["models"]
    assert list(models) == ["original", "unlearned", "retrain"]
    for res in models.values():
        assert set(METRIC_KEYS) <= set(res)
        for key in ("forget_prob", "forget_rougeL", "forget_truth_ratio", "retain_truth_ratio", "forget_quality",
                    "model_utility", "mia_auc", "mia_auc_zlib", "mia_auc_min_k_plus_plus", "privleak_loss",
                    "kl_forget", "kl_retain", "rel_param_error", "forget_extraction_strength",
                    "forget_exact_memorization", "holdout_loss"):
            assert res[key] is not None, key
        general = {k for k in METRIC_KEYS if k.startswith(("real_authors", "world_facts"))}
        assert general <= set(res["reasons"])
        # with 3 vs 3 samples the oracle's attack AUC can be exactly 1: privleak is then undefined
        for key in set(res["reasons"]) - general:
            assert key.startswith("privleak") and res[key] is None and "oracle AUC" in res["reasons"][key]
    oracle = models["retrain"]
    assert oracle["forget_quality"] == pytest.approx(1.0)
    assert oracle["kl_forget"] == 0.0 and oracle["rel_param_error"] == 0.0 and oracle["forget_loss_gap"] == 0.0
    assert oracle["privleak"] is None or oracle["privleak"] == pytest.approx(0.0)
    assert models["original"]["rel_param_error"] == pytest.approx(1.0)
    assert models["unlearned"]["rel_param_error"] == pytest.approx(0.5, abs=1e-6)
    assert models["original"]["kl_forget"] > 0 and models["unlearned"]["kl_retain"] > 0
    assert 0.0 <= models["original"]["mia_auc"] <= 1.0


def test_per_sample_and_files(full_run, small_data):
    out, per_sample, summary = full_run
    assert json.loads((out / "summary.json").read_text())["models"]["unlearned"]["rel_param_error"] == \
        pytest.approx(summary["models"]["unlearned"]["rel_param_error"])
    saved = json.loads((out / "eval.json").read_text())
    forget = saved["models"]["original"]["forget"]
    assert forget["ids"] == [0, 1, 2]
    for key in ("prob", "loss", "truth_ratio", "rougeL_recall", "generation", "mia_min_k", "kl_sum",
                "extraction_strength", "exact_memorization", "perturbed_loss"):
        assert len(forget[key]) == 3, key
    assert len(forget["perturbed_loss"][0]) == len(small_data.forget[0]["perturbed_answer"])
    assert np.mean(forget["prob"]) == pytest.approx(summary["models"]["original"]["forget_prob"])
    assert "mia_loss" in saved["models"]["original"]["holdout"]
    assert saved["splits"]["forget"]["question"] == [r["question"] for r in small_data.forget]
    assert not list(out.glob("*.tmp"))


def test_missing_oracle_gives_null_with_reason(model_dirs, small_data):
    _, summary = evaluate_models({"m": model_dirs["original"]}, small_data, **FAST)
    res = summary["models"]["m"]
    for key in ("forget_quality", "privleak", "kl_forget", "kl_retain", "rel_param_error", "forget_loss_gap"):
        assert res[key] is None
        assert "oracle" in res["reasons"][key]
    assert res["mia_auc"] is not None and res["model_utility"] is not None


def test_missing_original_gives_null_rel_error(model_dirs, small_data, llama, tokenizer):
    _, summary = evaluate_models({"m": llama, "o": llama}, small_data, oracle="o", tokenizer=tokenizer, **FAST)
    assert summary["models"]["m"]["rel_param_error"] is None
    assert "original" in summary["models"]["m"]["reasons"]["rel_param_error"]


def test_bad_model_path_is_one_line_error(tmp_path, small_data):
    with pytest.raises(ModelLoadError) as err:
        evaluate_models({"ghost": str(tmp_path / "nowhere")}, small_data, **FAST)
    msg = str(err.value)
    assert "ghost" in msg and "nowhere" in msg and "\n" not in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        evaluate_models({"empty": str(tmp_path / "empty")}, small_data, **FAST)


def test_unknown_oracle_name(model_dirs, small_data):
    with pytest.raises(ValueError, match="oracle 'nope'"):
        evaluate_models({"m": model_dirs["original"]}, small_data, oracle="nope", **FAST)


def test_missing_fields_give_null_with_reason(llama, tokenizer):
    rows = [{"question": r["question"], "answer": r["answer"]} for r in load_records("embedded", "train")[:3]]
    data = EvalData(forget=rows, retain=rows, holdout=rows)
    _, summary = evaluate_models({"m": llama, "o": llama}, data, oracle="o", tokenizer=tokenizer, **FAST)
    res = summary["models"]["m"]
    assert res["forget_truth_ratio"] is None and "paraphrased_answer" in res["reasons"]["forget_truth_ratio"]
    assert res["forget_quality"] is None and "paraphrased_answer" in res["reasons"]["forget_quality"]
    assert res["model_utility"] is None and "retain_truth_ratio" in res["reasons"]["model_utility"]
    assert res["forget_prob"] is not None and res["kl_forget"] == 0.0  # model is the oracle object


def test_general_knowledge_sets_enter_model_utility(llama, tokenizer):
    train = load_records("embedded", "train")
    ra = [{"question": r["question"], "answer": r["answer"], "perturbed_answer": r["perturbed_answer"]}
          for r in train[8:10]]
    data = EvalData(forget=train[:2], retain=train[2:4], holdout=load_records("embedded", "holdout")[:2],
                    real_authors=ra)
    per_sample, summary = evaluate_models({"m": llama}, data, tokenizer=tokenizer, **FAST)
    res = summary["models"]["m"]
    comps = [res[k] for k in ("retain_prob", "retain_rougeL", "retain_truth_ratio", "real_authors_prob",
                              "real_authors_rougeL", "real_authors_truth_ratio")]
    if min(comps) > 0:
        assert res["model_utility"] == pytest.approx(hmean(comps))
    else:
        assert res["model_utility"] == 0.0
    ra_ps = per_sample["models"]["m"]["real_authors"]
    loss, pert = ra_ps["loss"][0], ra_ps["perturbed_loss"][0]
    expected = math.exp(-loss) / (math.exp(-loss) + sum(math.exp(-p) for p in pert))
    assert ra_ps["normalised_prob"][0] == pytest.approx(expected)
    assert ra_ps["base_loss"] == ra_ps["loss"]  # truth-ratio base is the answer itself
    assert "world_facts" in res["reasons"]["world_facts_prob"]


def test_tokenizer_fallback(model_dirs, tokenizer):
    tok = load_eval_tokenizer(model_dirs["unlearned"])  # saved without a tokenizer
    assert tok.get_vocab() == tokenizer.get_vocab()
    tok = load_eval_tokenizer(model_dirs["original"])
    assert tok("Where was Amara born?")["input_ids"] == tokenizer("Where was Amara born?")["input_ids"]


def test_tofu_layout_end_to_end(llama, tokenizer):
    from .test_data import TOFU

    if not TOFU.is_dir():
        pytest.skip("TOFU data not available")
    data = EvalData.tofu(TOFU, forget="forget01", max_rows=2)
    _, summary = evaluate_models({"m": llama}, data, tokenizer=tokenizer, max_new_tokens=2, progress=False)
    res = summary["models"]["m"]
    for split in ("retain", "real_authors", "world_facts"):
        assert res[f"{split}_prob"] is not None and res[f"{split}_truth_ratio"] is not None
    assert 0 < res["real_authors_prob"] < 1  # normalised over 1 true + 3 wrong options
    assert res["model_utility"] is not None or "model_utility" in res["reasons"]
