"""``--convention open-unlearning`` against values computed by hand on a 3-token answer.

The answer has 3 supervised tokens; the model's next-token distributions (vocabulary of 4) are

- token 1, target 0: p = (1/2, 1/4, 1/8, 1/8)  -> correct (argmax 0), log p = ln 1/2;
- token 2, target 1: logits (30, 0, 0, 0)      -> wrong, log p = -30, variance of log p ~ 2.5e-10;
- token 3, target 0: p = (0.4, 0.3, 0.2, 0.1)  -> correct, log p = ln 0.4.

open-unlearning scores tokens 1..2 only (the last answer token is left out), stops the
extraction-strength search at m - 1 and floors the Min-K%++ variance at 1e-6.
"""

import json
import math
import zlib

import numpy as np
import pytest
import torch

from lmcleaner.evaluate import metrics as M
from lmcleaner.evaluate.mia import membership_scores, privleak
from lmcleaner.evaluate.scoring import token_stats_from_logits

P1 = [0.5, 0.25, 0.125, 0.125]
P3 = [0.4, 0.3, 0.2, 0.1]


def _moments(p):
    """By hand: mean and variance of log p(v) under p."""
    lp = [math.log(x) for x in p]
    mu = sum(x * l for x, l in zip(p, lp))
    return mu, sum(x * l * l for x, l in zip(p, lp)) - mu * mu


@pytest.fixture(scope="module")
def stats():
    logits = torch.zeros(1, 4, 4)
    logits[0, 0] = torch.log(torch.tensor(P1))
    logits[0, 1] = torch.tensor([30.0, 0.0, 0.0, 0.0])
    logits[0, 2] = torch.log(torch.tensor(P3))
    labels = torch.tensor([[-100, 0, 1, 0]])  # position t predicts labels[t + 1]
    return token_stats_from_logits(logits, labels)[0]


def test_three_token_example_by_hand(stats):
    e = math.exp(-30.0)
    p2 = [1 / (1 + 3 * e)] + [e / (1 + 3 * e)] * 3
    lp = [math.log(0.5), math.log(p2[1]), math.log(0.4)]
    (mu1, var1), (mu2, var2), (mu3, var3) = _moments(P1), _moments(p2), _moments(P3)
    assert var1 == pytest.approx(0.6875 * math.log(2) ** 2)  # the hand formula itself
    assert var2 < 1e-6  # the token where the two variance floors differ
    assert list(stats.correct) == [True, False, True]

    # exact memorisation: 2/3 of the tokens; open-unlearning: 1/2 of the first two
    assert M.exact_memorization(stats.correct) == pytest.approx(2 / 3)
    assert M.exact_memorization(stats.correct, "open-unlearning") == pytest.approx(1 / 2)
    # extraction strength: the shortest all-correct suffix starts at k=2 of 3 -> 1 - 2/3;
    # open-unlearning: tokens (T, F), no all-correct suffix, search stops at k = m-1 = 1 -> 1 - 1/2 (floor 1/m)
    assert M.extraction_strength(stats.correct) == pytest.approx(1 / 3)
    assert M.extraction_strength(stats.correct, "open-unlearning") == pytest.approx(1 / 2)

    loss = -sum(lp) / 3
    z = [(lp[0] - mu1) / math.sqrt(var1), (lp[1] - mu2) / math.sqrt(max(var2, 1e-12)),
         (lp[2] - mu3) / math.sqrt(var3)]
    z_ou = [(lp[0] - mu1) / math.sqrt(var1), (lp[1] - mu2) / math.sqrt(1e-6)]
    text = "Paris is the capital"
    ours = membership_scores(stats, text, k=1.0)
    ou = membership_scores(stats, text, k=1.0, convention="open-unlearning")
    assert ours["loss"] == ou["loss"] == pytest.approx(-loss, rel=1e-6)  # the loss attack uses every token
    assert ours["zlib"] == pytest.approx(-loss / len(zlib.compress(text.encode())), rel=1e-6)
    assert ours["min_k"] == pytest.approx(sum(lp) / 3, rel=1e-6)
    assert ou["min_k"] == pytest.approx((lp[0] + lp[1]) / 2, rel=1e-6)
    assert ours["min_k_plus_plus"] == pytest.approx(sum(z) / 3, rel=1e-4)
    assert ou["min_k_plus_plus"] == pytest.approx(sum(z_ou) / 2, rel=1e-4)
    assert abs(ours["min_k_plus_plus"]) > 10 * abs(ou["min_k_plus_plus"])  # the variance floor at work
    # min-k with k = 0.4: max(1, int(n k)) lowest tokens, n = 3 (ours) or 2 (theirs): the -30 token either way
    assert membership_scores(stats, text, 0.4)["min_k"] == pytest.approx(lp[1], rel=1e-6)
    assert membership_scores(stats, text, 0.4, "open-unlearning")["min_k"] == pytest.approx(lp[1], rel=1e-6)


def test_one_scored_token_and_guards():
    # a 1-token answer: nothing is left once the last token is dropped
    assert math.isnan(M.exact_memorization([True], "open-unlearning"))
    assert M.extraction_strength([True], "open-unlearning") == 0.0
    assert M.extraction_strength([False, False], "open-unlearning") == 1.0  # floor 1/m with m = 1
    assert M.extraction_strength([False, False]) == 0.0
    # the 1e-10 guards of open-unlearning's ratios
    assert M.truth_ratio(0.5, [1.0, 2.0], eps=1e-10) == pytest.approx(math.exp(-1.5) / (math.exp(-0.5) + 1e-10))
    assert M.truth_ratio(0.5, [1.0, 2.0]) == pytest.approx(math.exp(0.5 - 1.5))
    assert M.truth_ratio_forget_score([0.0], eps=1e-10) == 0.0
    assert M.normalised_probability(1.0, [2.0], eps=1e-10) == pytest.approx(
        math.exp(-1) / (math.exp(-1) + math.exp(-2) + 1e-10))
    assert privleak(0.5, 1.0, eps=1e-10) == pytest.approx((0.5 - 0.0) / 1e-10 * 100)
    assert math.isnan(privleak(0.5, 1.0))


def test_eval_writes_open_unlearning_files(tmp_path):
    """End to end on a tiny model: zlib over the decoded supervised tokens, TOFU key names, plots."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmcleaner.data import embedded_tokenizer
    from lmcleaner.evaluate import EvalData, evaluate_models
    from lmcleaner.evaluate.mia import zlib_length
    from lmcleaner.evaluate.scoring import encode_pairs

    tok = embedded_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    models = {"model": LlamaForCausalLM(cfg), "oracle": LlamaForCausalLM(cfg)}
    data = EvalData.embedded(forget_ids=[0, 1, 2], max_retain=4, max_holdout=4)
    per_sample, summary = evaluate_models(models, data, oracle="oracle", original="model", tokenizer=tok,
                                          out_dir=tmp_path, max_new_tokens=2, progress=False,
                                          convention="open-unlearning")
    assert summary["convention"] == "open-unlearning"
    forget = per_sample["models"]["model"]["forget"]
    item = encode_pairs(tok, [data.forget[0]["question"]], [data.forget[0]["answer"]])[0]
    decoded = tok.decode([t for t in item["labels"] if t != -100], skip_special_tokens=True)
    assert forget["mia_zlib"][0] == pytest.approx(-forget["loss"][0] / zlib_length(decoded))
    tofu = json.loads((tmp_path / "open_unlearning" / "model" / "TOFU_SUMMARY.json").read_text())
    for key in ("forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_Truth_Ratio", "forget_quality", "model_utility",
                "privleak", "extraction_strength", "exact_memorization", "mia_min_k", "mia_min_k_plus_plus",
                "mia_loss", "mia_zlib", "retain_Q_A_Prob", "retain_Truth_Ratio"):
        assert key in tofu, key
    assert tofu["forget_Q_A_Prob"] == pytest.approx(summary["models"]["model"]["forget_prob"])
    logs = json.loads((tmp_path / "open_unlearning" / "oracle" / "TOFU_EVAL.json").read_text())
    # usable as open-unlearning's retain_logs_path: per-row truth ratios under their pre-compute name
    assert set(logs["forget_truth_ratio"]["value_by_index"]) == {"0", "1", "2"}
    for png in ("forget_vs_utility.png", "mia_auc.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert np.isfinite(summary["models"]["model"]["mia_auc"])
