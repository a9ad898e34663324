"""Fixtures for the evaluation tests: a fake model with hand-set logits and
tiny random Llama directories (built from a config; no hub access)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import lmcleaner.evaluate  # noqa: F401  (initialises lmcleaner.train/data in a working order)


class BigramLM(torch.nn.Module):
    """Logits at position t depend only on the token at t: ``logits = table[input_ids]``.

    Every next-token distribution is then a row of ``softmax(table)``, so
    probabilities, argmaxes and KLs can be computed by hand.
    """

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone().float())

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.fixture
def bigram():
    return BigramLM


def tiny_llama(tokenizer, seed: int, init: float = 0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, initializer_range=init,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tokenizer():
    from lmcleaner.data import embedded_tokenizer

    return embedded_tokenizer()


@pytest.fixture(scope="session")
def llama(tokenizer):
    """A tiny random Llama with spread-out logits (fewer greedy near-ties)."""
    return tiny_llama(tokenizer, seed=0, init=0.3)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """original / unlearned / retrain directories; unlearned = midway between
    original and retrain, so its relative parameter error is 0.5 exactly."""
    root = tmp_path_factory.mktemp("models")
    oracle, original = tiny_llama(tokenizer, 0), tiny_llama(tokenizer, 1)
    unlearned = tiny_llama(tokenizer, 2)
    with torch.no_grad():
        for p, po, pr in zip(unlearned.parameters(), oracle.parameters(), original.parameters()):
            p.copy_(po.double().add(pr.double().sub(po.double()), alpha=0.5).float())
    dirs = {}
    for name, model in (("original", original), ("unlearned", unlearned), ("retrain", oracle)):
        path = root / name
        model.save_pretrained(str(path))
        if name != "unlearned":  # one directory without a tokenizer: embedded fallback
            tokenizer.save_pretrained(str(path))
        dirs[name] = str(path)
    return dirs
