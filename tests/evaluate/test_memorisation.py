"""Orientation check on a model that really memorised the forget set: every
forgetting metric must move in the documented direction."""

import copy

import pytest
import torch

from lmcleaner.data import Collator
from lmcleaner.evaluate import EvalData, encode_pairs, evaluate_models
from lmcleaner.train.loss import token_nll_sum, count_supervised

from .conftest import tiny_llama


@pytest.fixture(scope="module")
def memorised(tokenizer):
    data = EvalData.embedded(forget_ids=[0, 9, 18, 27], max_retain=4, max_holdout=4)
    base = tiny_llama(tokenizer, seed=3)
    model = copy.deepcopy(base).train()
    items = encode_pairs(tokenizer, [r["question"] for r in data.forget], [r["answer"] for r in data.forget])
    batch = Collator(tokenizer.pad_token_id)([{**x, "sample_id": i} for i, x in enumerate(items)])
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    torch.manual_seed(0)
    for _ in range(30):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = token_nll_sum(logits, batch["labels"]) / count_supervised(batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2
    return data, model.eval(), base


def test_metrics_detect_memorisation(memorised, tokenizer):
    data, trained, base = memorised
    _, summary = evaluate_models({"trained": trained, "never_saw": base}, data, oracle="never_saw",
                                 original="trained", tokenizer=tokenizer, max_new_tokens=24, batch_size=4,
                                 progress=False)
    t, o = summary["models"]["trained"], summary["models"]["never_saw"]
    for attack in ("loss", "zlib", "min_k", "min_k_plus_plus"):
        assert t[f"mia_auc_{attack}"] == 1.0, attack  # members score higher than non-members
        assert t[f"privleak_{attack}"] is None or t[f"privleak_{attack}"] < 0
    assert t["forget_prob"] > 0.8 > o["forget_prob"]
    assert t["forget_exact_memorization"] > 0.9 and t["forget_extraction_strength"] > 0.5
    assert t["holdout_exact_memorization"] < t["forget_exact_memorization"]
    assert t["forget_rougeL"] > 0.8 > o["forget_rougeL"]
    assert t["forget_loss_gap"] < 0 and t["kl_forget"] > 0
    assert t["rel_param_error"] == pytest.approx(1.0) and o["rel_param_error"] == 0.0
